"""A small BPE tokenizer that behaves like Phi-3-vision's, for the embedded model.

The embedded model cannot carry a 32k vocabulary (its embedding table would dwarf the model), so it
gets a ~1k BPE vocabulary trained on the synthetic texts. Everything the rest of the code relies on
is kept from the official tokenizer: the same special-token strings with the same roles
(bos ``<s>``, eos = pad = ``<|endoftext|>``, unk ``<unk>``, ``<|assistant|>``/placeholders/``<|image|>``
rstrip), SentencePiece-style ``▁`` word prefix (also after special tokens), byte fallback for unseen
characters (newline -> ``<0x0A>``), a ``<s>`` prepended by the post-processor, and the chat template.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

# Added tokens in the official order (Phi-3 ids 32000..32044), with their rstrip flags.
_PLACEHOLDERS_A = [f"<|placeholder{i}|>" for i in range(1, 5)]
_PLACEHOLDERS_B = [f"<|placeholder{i}|>" for i in range(5, 7)]
_PLACEHOLDERS_C = [f"<|placeholder{i}|>" for i in range(7, 40)]
ADDED_TOKENS = (
    [("<|endoftext|>", False), ("<|assistant|>", True)]
    + [(t, True) for t in _PLACEHOLDERS_A]
    + [("<|system|>", False), ("<|end|>", False)]
    + [(t, True) for t in _PLACEHOLDERS_B]
    + [("<|user|>", False)]
    + [(t, True) for t in _PLACEHOLDERS_C]
    + [("<|image|>", True)]
)
BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\\n' -}}{% endif %}"
)


def _texts_for_training(texts: Iterable[str]) -> Iterable[str]:
    """Lines without special markers: newlines go through byte fallback as in the official tokenizer."""
    markers = [t for t, _ in ADDED_TOKENS] + BASE_SPECIALS
    for text in texts:
        for m in markers:
            text = text.replace(m, "\n")
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024, min_frequency: int = 2) -> str:
    """Train the BPE and write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``vocab_size`` counts the base vocabulary (specials + 256 byte tokens + merges); the 45 added
    tokens come on top. Returns ``out_dir``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    def pipeline(tok: "Tokenizer") -> None:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        # Split before every ▁ so merges stay inside words (SentencePiece's default behaviour).
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")

    # 1) learn merges on the plain text
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    pipeline(trainer_tok)
    n_merged = max(vocab_size - len(BYTE_TOKENS), len(BASE_SPECIALS) + 64)
    trainer = trainers.BpeTrainer(vocab_size=n_merged, min_frequency=min_frequency, special_tokens=BASE_SPECIALS,
                                  limit_alphabet=120, show_progress=False)
    trainer_tok.train_from_iterator(_texts_for_training(texts), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    # 2) rebuild the vocabulary in the official order: <unk> <s> </s>, 256 byte tokens, learned pieces
    vocab: dict[str, int] = {}
    for t in BASE_SPECIALS + BYTE_TOKENS:
        vocab[t] = len(vocab)
    for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    pipeline(tok)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True),
                            AddedToken("<s>", normalized=False, special=True)])
    tok.add_tokens([AddedToken("</s>", normalized=False, rstrip=True, special=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False, rstrip=r, special=True) for t, r in ADDED_TOKENS])
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos_id)]
    )

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_configs(tok, out_dir)
    return out_dir


def _write_configs(tok, out_dir: str) -> None:
    decoder = {}
    for content, rstrip, special in (
        [("<unk>", False, True), ("<s>", False, True), ("</s>", True, False)] + [(t, r, True) for t, r in ADDED_TOKENS]
    ):
        decoder[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False, "special": special,
        }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>"],
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "unk_token": "<unk>",
        # Loaded as-is from tokenizer.json (a Llama class would re-derive the pipeline and drop the ▁).
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    tok_entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>"],
        "bos_token": dict(content="<s>", **tok_entry),
        "eos_token": dict(content="<|endoftext|>", **tok_entry),
        "pad_token": dict(content="<|endoftext|>", **tok_entry),
        "unk_token": dict(content="<unk>", **tok_entry),
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_fast_tokenizer(tokenizer_dir: str):
    """``PreTrainedTokenizerFast`` from ``tokenizer.json`` with the roles of tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
        bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"), pad_token=cfg.get("pad_token"),
        unk_token=cfg.get("unk_token"), padding_side=cfg.get("padding_side", "right"),
    )
