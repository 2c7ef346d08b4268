"""Phi3VProcessor: prompt + images -> input_ids with negative image placeholders, as the reference processor does.

The tokenizer is a PreTrainedTokenizerFast built straight from tokenizer.json: on transformers 5.x AutoTokenizer
makes a LlamaTokenizer (legacy=False) that drops the SentencePiece "▁" after special tokens, so "<|user|>\\n" would
become [1, 32010, 13] instead of the reference [1, 32010, 29871, 13].
"""
from __future__ import annotations

import json
import os
import re

import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

from .image_processing_phi3v import PREPROCESSOR_CONFIG, Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model")
# The reference chat template (tokenizer_config.json of Phi-3-vision); used when the files carry none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)
# The turn/stop tokens of the Phi-3 tokenizer (the model ends turns with <|end|>); generation stops on any of them.
STOP_TOKENS = ("<|end|>", "<|endoftext|>", "</s>")


def _token_content(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """PreTrainedTokenizerFast(tokenizer_file=tokenizer.json) + special tokens / chat template from the json configs."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # tokenizer_config wins
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                cfg.update(json.load(f))
    kwargs = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if cfg.get(key) is not None:
            kwargs[key] = _token_content(cfg[key])
    extra = [_token_content(t) for t in cfg.get("additional_special_tokens", []) or []]
    if extra:
        kwargs["additional_special_tokens"] = list(dict.fromkeys(extra))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=tok_file, padding_side=cfg.get("padding_side", "right"),
        model_max_length=cfg.get("model_max_length", 131072),
        clean_up_tokenization_spaces=cfg.get("clean_up_tokenization_spaces", False), **kwargs,
    )
    tok.chat_template = cfg.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    return tok


class Phi3VProcessor:
    """Tokenizer + image processor. ``processor(text, images)`` -> input_ids, attention_mask, pixel_values, image_sizes."""

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: PreTrainedTokenizerFast,
                 tokenizer_files: dict[str, bytes] | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self._tokenizer_files = dict(tokenizer_files or {})
        self.chat_template = tokenizer.chat_template

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, dir_or_hub_id: str, num_crops: int | None = None, revision: str | None = None,
                        cache_dir: str | None = None, token=None, local_files_only: bool | None = None,
                        **kwargs) -> "Phi3VProcessor":
        """Load tokenizer.json (+ configs) and preprocessor_config.json from a dir or a hub id.

        ``num_crops`` overrides the file (Phi-3.5 card: 4 for multi-frame, 16 for single-frame).
        """
        path = os.fspath(dir_or_hub_id)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            try:
                path = snapshot_download(repo_id=path, revision=revision, cache_dir=cache_dir, token=token,
                                         local_files_only=bool(local_files_only),
                                         allow_patterns=[*TOKENIZER_FILES, PREPROCESSOR_CONFIG, "processor_config.json"])
            except Exception as err:
                raise OSError(f"{dir_or_hub_id!r} is not a local directory and could not be fetched: {err}") from err
        pre = os.path.join(path, PREPROCESSOR_CONFIG)
        if os.path.isfile(pre):
            image_processor = Phi3VImageProcessor.from_pretrained(path, num_crops=num_crops)
        else:
            image_processor = Phi3VImageProcessor(num_crops=num_crops or 1)
        files = {}
        for name in TOKENIZER_FILES:
            p = os.path.join(path, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    files[name] = f.read()
        return cls(image_processor, load_tokenizer(path), files)

    def save_pretrained(self, path: str) -> None:
        """Tokenizer files as loaded (byte for byte) + preprocessor_config.json."""
        os.makedirs(path, exist_ok=True)
        if self._tokenizer_files:
            for name, data in self._tokenizer_files.items():
                with open(os.path.join(path, name), "wb") as f:
                    f.write(data)
        else:
            self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    # ------------------------------------------------------------------ properties
    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @property
    def pad_token_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid) if pid is not None else int(self.tokenizer.eos_token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        """<|end|>, <|endoftext|>, </s>: pass as generate(eos_token_id=...) when the model has no tokenizer next to it."""
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        return [int(i) for i in ids if i is not None and i != self.tokenizer.unk_token_id]

    # ------------------------------------------------------------------ encoding
    def __call__(self, text: str | list[str] | None = None, images=None, return_tensors: str | None = "pt",
                 num_crops: int | None = None, padding_side: str = "right", image_features=None, **kwargs) -> BatchFeature:
        """One prompt (or a list, one image list per prompt, padded) -> BatchFeature.

        ``<|image_k|>`` (k = 1..n, contiguous, may repeat) becomes ``[-k] * num_img_tokens[k-1]``; every text chunk is
        tokenised with BOS, so a ``<s>`` follows each image block, as in the reference.
        ``image_features``: the output of ``self.image_processor(images)``, reused for several prompts about the same
        images (the HD transform then runs once instead of once per prompt).
        """
        if text is None:
            raise ValueError("text is required")
        if return_tensors not in ("pt", None):
            raise ValueError("only return_tensors='pt' is supported")
        if isinstance(text, (list, tuple)):
            if images is None:
                images = [None] * len(text)
            if len(images) != len(text):
                raise ValueError(f"{len(text)} prompts but {len(images)} image lists")
            return self.collate([self(t, im, num_crops=num_crops) for t, im in zip(text, images)],
                                padding_side=padding_side)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images or [])
        tags = IMAGE_TAG.findall(text)
        ids_in_text = [int(t[len("<|image_"):-2]) for t in tags]
        unique = sorted(set(ids_in_text))
        if unique != list(range(1, len(unique) + 1)):
            raise ValueError(f"image tags must be <|image_1|>..<|image_n|> without gaps, got {sorted(set(tags))}")
        if len(unique) != len(images):
            raise ValueError(f"the prompt refers to {len(unique)} image(s) but {len(images)} were given")
        if image_features is not None:
            feats = image_features
        else:
            feats = self.image_processor(images, num_crops=num_crops) if images else None
        chunks = [self.tokenizer(chunk).input_ids for chunk in IMAGE_TAG.split(text)]
        ids: list[int] = list(chunks[0])
        for k, chunk in zip(ids_in_text, chunks[1:]):
            ids.extend([-k] * feats["num_img_tokens"][k - 1])
            ids.extend(chunk)
        input_ids = torch.tensor([ids], dtype=torch.long)
        data = {"input_ids": input_ids, "attention_mask": (input_ids > -1000000).long()}
        if feats is not None:
            data["pixel_values"] = feats["pixel_values"]
            data["image_sizes"] = feats["image_sizes"]
        return BatchFeature(data=data)

    def collate(self, samples: list, padding_side: str = "right", label_pad: int = -100) -> BatchFeature:
        """Batch single-prompt outputs: pad ids with pad_token_id (mask 0, labels -100), stack images of all rows.

        Crops are zero-padded to the largest crop count; each image keeps its own image_sizes. Use
        padding_side="left" for batched generation, "right" for training.
        """
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        if not samples:
            raise ValueError("nothing to collate")
        length = max(s["input_ids"].shape[-1] for s in samples)
        out: dict[str, list] = {"input_ids": [], "attention_mask": []}
        has_labels = any("labels" in s for s in samples)
        if has_labels:
            out["labels"] = []
        for s in samples:
            ids = s["input_ids"].reshape(-1)
            mask = s.get("attention_mask", torch.ones_like(ids)).reshape(-1)
            pad = length - ids.shape[0]
            parts = {"input_ids": (ids, self.pad_token_id), "attention_mask": (mask, 0)}
            if has_labels:
                parts["labels"] = (s["labels"].reshape(-1) if "labels" in s else torch.full_like(ids, label_pad), label_pad)
            for key, (t, fill) in parts.items():
                filler = torch.full((pad,), fill, dtype=t.dtype)
                out[key].append(torch.cat([t, filler] if padding_side == "right" else [filler, t]))
        data = {k: torch.stack(v) for k, v in out.items()}
        pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None and s["pixel_values"].shape[0]]
        if pix:
            n_crops = max(p.shape[1] for p in pix)
            pix = [torch.cat([p, p.new_zeros(p.shape[0], n_crops - p.shape[1], *p.shape[2:])], 1) for p in pix]
            data["pixel_values"] = torch.cat(pix)
            data["image_sizes"] = torch.cat([s["image_sizes"] for s in samples if s.get("pixel_values") is not None
                                             and s["pixel_values"].shape[0]])
        return BatchFeature(data=data)

    # ------------------------------------------------------------------ chat / decoding
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str:
        """Render messages with the Phi-3 template; ``content`` may also be a list of {"type": "image"|"text"} parts,
        whose images are numbered <|image_1|>.. in order of appearance across the conversation."""
        rendered, k = [], 0
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        k += 1
                        parts.append(f"<|image_{k}|>\n")
                    else:
                        parts.append(part.get("text", ""))
                content = "".join(parts)
            rendered.append({**m, "content": content})
        text = self.tokenizer.apply_chat_template(rendered, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)
        if tokenize:
            raise ValueError("call the processor on the rendered text (images need the processor, not the tokenizer)")
        return text

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode token ids; image placeholders (negative ids) are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=skip_special_tokens,
                                     **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]
