"""Incremental detokenisation for streamed answers (the Plan action's feedback, ``ask --stream``).

Decoding token by token cuts multi-byte characters (and SentencePiece's byte fallback) in half; the half shows
up as U+FFFD. ``TextStream`` only publishes text that ends on a complete character, so a robot's UI or log
never sees a replacement character that the final answer does not have.
"""
from __future__ import annotations

from typing import Callable


class TextStream:
    """Collects generated token ids and calls ``on_text(text_so_far, num_tokens)`` whenever complete text grows."""

    def __init__(self, tokenizer, on_text: Callable[[str, int], None] | None = None):
        self._tok = tokenizer
        self._on_text = on_text
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the tokens that finish it
        if text != self.text:
            self.text = text
            if self._on_text:
                self._on_text(text, len(self.ids))

    def finish(self) -> str:
        """The full decoded text, also streamed when it differs from the last emission (generation that stopped at
        the token limit in the middle of a character ends with the tokenizer's replacement character, as the
        answer itself does)."""
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if text != self.text:
            self.text = text
            if self._on_text:
                self._on_text(text, len(self.ids))
        return self.text
