"""Prompt texts shared by the node, the CLI, training and evaluation.

One place on purpose: a LoRA adapter only works if inference asks its questions exactly the way
training asked them, so every caller builds prompts (and answer targets) through these functions.
The chat format is Phi-3-vision's: ``<|user|>\\n<|image_1|>\\n...<|end|>\\n<|assistant|>\\n``.

Prompt structure (roles, turn ends, image placeholders) comes only from these functions: text a user wrote is
passed through :func:`literal_text`, which breaks every special-token spelling (``<|image_1|>``, ``<|user|>``,
``<|end|>``, ``<s>``, ``</s>``, ``<unk>`` ...) by putting a space after its ``<``, so the tokenizer reads it as
plain characters (``< |image_1|>``). :func:`chat_prompt` applies it to its ``user_text``, so every prompt built
here (questions, relation questions, plan requests, training prompts) gets it.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Sequence

END = "<|end|>"
ENDOFTEXT = "<|endoftext|>"

PLAN_STEP_FIELDS = ("action", "target", "reference", "relation", "detail")

YES = "yes"
NO = "no"


# A "<" that starts a special token of the Phi-3 tokenizers: <|...|> (roles, turn ends, images, placeholders),
# <s>, </s>, <unk>. The tokenizer matches these spellings anywhere in a text, also inside user words.
_SPECIAL_START = re.compile(r"<(?=\||/?s>|unk>)")


def literal_text(text: str) -> str:
    """User text as plain text: every special-token spelling gets a space after its ``<`` (``<|end|>`` ->
    ``< |end|>``), so it can never become a chat role, a turn end or an image placeholder. Idempotent, and
    text without such spellings is returned unchanged (training prompts stay byte-identical)."""
    return _SPECIAL_START.sub("< ", text)


def image_placeholders(num_images: int) -> str:
    """``<|image_1|>\\n<|image_2|>\\n...`` for ``num_images`` images (frames in the order given)."""
    return "".join(f"<|image_{i}|>\n" for i in range(1, num_images + 1))


def chat_prompt(user_text: str, num_images: int, system: str | None = None) -> str:
    """A single-turn prompt ending with the assistant tag, ready for generation (``user_text`` and ``system`` are
    rendered as :func:`literal_text`: only this function writes prompt structure)."""
    text = ""
    if system:
        text += f"<|system|>\n{literal_text(system)}{END}\n"
    text += f"<|user|>\n{image_placeholders(num_images)}{literal_text(user_text)}{END}\n<|assistant|>\n"
    return text


def answer_target(answer: str) -> str:
    """The training target that follows a prompt: answer, ``<|end|>``, newline, ``<|endoftext|>``."""
    return f"{answer}{END}\n{ENDOFTEXT}"


def relation_question(subject: str, relation: str, obj: str) -> str:
    """The yes/no question ``query_relations`` scores and the adapter is trained on."""
    return f"Is the {subject} {relation} the {obj}? Answer yes or no."


def caption_question(caption: str) -> str:
    """VSR-style caption verification as a yes/no question."""
    caption = caption.strip().rstrip(".")
    return f"Is this true: {caption}? Answer yes or no."


def choice_question(question: str, choices: Sequence[str]) -> str:
    return f"{question} Choose one of: {', '.join(choices)}."


def plan_request(instruction: str) -> str:
    """Ask for a plan as JSON: the steps with the PlanStep fields, or no steps and why (done / not in view)."""
    fields = ", ".join(f'"{f}"' for f in PLAN_STEP_FIELDS)
    return (
        f"Instruction: {instruction}\n"
        f'Reply with JSON {{"steps": [...]}}; each step is an object with the keys {fields}. '
        f'If it is already done, reply {{"steps": [], "reason": "{PLAN_DONE_REASON}"}}; '
        f'if an object it needs is not in view, {{"steps": [], "missing": [its name]}}.'
    )


PLAN_DONE_REASON = "already done"


def plan_answer(steps: Iterable[dict]) -> str:
    """The canonical JSON list of plan steps (every PlanStep field, as strings)."""
    return json.dumps([{k: str(s.get(k, "")) for k in PLAN_STEP_FIELDS} for s in steps], separators=(", ", ": "))


def plan_reply(steps: Iterable[dict], reason: str = "", missing: Sequence[str] = ()) -> str:
    """The JSON reply a plan request is trained to produce: ``{"steps": [...]}`` with each step's non-empty fields
    only (shorter for a small model; the parser fills the rest), plus ``reason`` and ``missing`` when given."""
    reply: dict = {"steps": [{k: str(s[k]) for k in PLAN_STEP_FIELDS if s.get(k)} for s in steps]}
    if reason:
        reply["reason"] = reason
    if missing:
        reply["missing"] = list(missing)
    return json.dumps(reply, separators=(", ", ": "))
