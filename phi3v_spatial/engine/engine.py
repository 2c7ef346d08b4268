"""SpatialEngine: the model behind the node, the CLI and bag replay (no ROS in here).

It owns one Phi3V model + processor (+ LoRA adapters) and offers the three things robots ask for:
free-form spatial answers, calibrated yes/no probabilities for candidate relations, and JSON plans.
Decoding is an explicit greedy loop over the KV cache so that callers can stream text and cancel
between any two tokens. Callers serialise access (the node's InferenceWorker does); a lock guards
against misuse anyway.
"""
from __future__ import annotations

import gc
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import prompts
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, validate_image
from .parsing import PlanParseError, Relation, parse_plan, relation_from_question, relations_from_text

OnText = Callable[[str, int], None]
ShouldStop = Callable[[], bool]

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EngineError(Exception):
    """Bad input or state a caller can act on; the message is written for a robot operator."""


@dataclass
class AskResult:
    answer: str
    relations: list[Relation] = field(default_factory=list)
    tokens_generated: int = 0
    cancelled: bool = False


@dataclass
class PlanResult:
    steps: list[dict]
    raw_text: str
    error: str = ""
    tokens_generated: int = 0
    cancelled: bool = False


@dataclass
class _Generation:
    text: str
    tokens: int
    cancelled: bool


def validate_images(images: Sequence[np.ndarray], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """RGB uint8 HxWx3 arrays of a sane size (see ``images.validate_image``), or an ``EngineError`` naming the image."""
    if images is None or len(images) == 0:
        raise EngineError("no images: give images in the request or make sure the camera topics are publishing")
    try:
        return [validate_image(img, max_pixels=max_pixels, name=f"image {i}") for i, img in enumerate(images)]
    except ImageDecodeError as e:
        raise EngineError(str(e)) from e


def check_candidates(candidates) -> None:
    """Candidate relations need subject, relation and object; callers may check before queueing a request."""
    if not candidates:
        raise EngineError("no candidate relations given (candidates is empty)")
    for i, c in enumerate(candidates):
        if not (c.subject.strip() and c.relation.strip() and c.object.strip()):
            raise EngineError(f"candidates[{i}] needs subject, relation and object "
                              f"(got {c.subject!r}, {c.relation!r}, {c.object!r})")


def _looks_like_local_path(model_path: str) -> bool:
    return os.path.isabs(model_path) or model_path.startswith(".") or not _HUB_ID_RE.match(model_path)


class SpatialEngine:
    """A loaded Phi3V model answering spatial questions about RGB frames."""

    def __init__(self, model, processor, *, device: str, dtype, attn_implementation: str, model_path: str,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        import torch

        self._torch = torch
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.model_path = model_path
        self.max_image_pixels = max_image_pixels
        self._lock = threading.RLock()
        self._adapters = None
        self.stop_ids = set(processor.stop_token_ids)
        self.yes_id, self.no_id = self._answer_first_tokens(prompts.YES, prompts.NO)
        # Checkpoints trained elsewhere answer "Yes"/"No" as often as "yes"/"no": score every spelling that is a
        # single token, so P(yes) does not collapse to noise when the mass sits on the capitalised form.
        self.yes_ids = self._single_token_spellings(prompts.YES, self.yes_id)
        self.no_ids = self._single_token_spellings(prompts.NO, self.no_id)
        if set(self.yes_ids) & set(self.no_ids):
            raise EngineError("the tokenizer's yes and no spellings share tokens; yes/no scoring impossible")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_path: str, *, adapters: dict[str, str] | None = None, active_adapter: str | None = None,
                        device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto",
                        num_crops: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> "SpatialEngine":
        """Load a checkpoint folder (or hub id) and optional LoRA adapters; errors become ``EngineError``."""
        if not model_path:
            raise EngineError("model_path is empty: set it to a checkpoint folder or a Hugging Face hub id")
        if _looks_like_local_path(model_path) and not os.path.isdir(model_path):
            raise EngineError(f"model directory {model_path!r} does not exist: set model_path to a checkpoint folder "
                              f"(with config.json) or a hub id like microsoft/Phi-3.5-vision-instruct")
        if os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "config.json")):
            raise EngineError(f"{model_path!r} has no config.json: it is not a Phi-3-vision checkpoint folder")
        from ..model import Phi3VForCausalLM, Phi3VProcessor
        from ..model.runtime import resolve_attn, resolve_device, resolve_dtype

        try:
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, dev)
            attn = resolve_attn(attn_implementation, dev, torch_dtype)
        except (RuntimeError, ValueError, ImportError) as e:
            raise EngineError(f"device/dtype/attention settings cannot be used here: {e}") from e
        try:
            processor = Phi3VProcessor.from_pretrained(model_path, **({"num_crops": num_crops} if num_crops else {}))
            model = Phi3VForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype, device_map=str(dev),
                                                     attn_implementation=attn)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise EngineError(f"could not load the model from {model_path!r}: {e}") from e
        model.eval()
        engine = cls(model, processor, device=str(dev), dtype=torch_dtype, attn_implementation=attn,
                     model_path=model_path, max_image_pixels=max_image_pixels)
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
        if active_adapter is not None and (adapters or active_adapter not in ("", "none")):
            engine.set_adapter(active_adapter)
        return engine

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder under ``name`` (it becomes available, not active)."""
        from ..model.adapters import AdapterManager

        if not os.path.isdir(path):
            raise EngineError(f"adapter {name!r}: directory {path!r} does not exist")
        with self._lock:
            if self._adapters is None:
                self._adapters = AdapterManager(self.model)
            try:
                self._adapters.load(name, path)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise EngineError(f"adapter {name!r} at {path!r} could not be loaded: {e}") from e

    @property
    def available_adapters(self) -> list[str]:
        return list(self._adapters.available) if self._adapters else []

    @property
    def active_adapter(self) -> str:
        return self._adapters.active if self._adapters else ""

    def set_adapter(self, name: str | None, scale: float = 1.0) -> None:
        """Activate a loaded adapter; ``None``, "" or "none" runs the base model."""
        off = name is None or name.strip().lower() in ("", "none")
        with self._lock:
            if off:
                if self._adapters:
                    self._adapters.activate(None)
                return
            if name not in self.available_adapters:
                raise EngineError(f"unknown adapter {name!r}; loaded adapters: {self.available_adapters or 'none'}")
            if not (scale > 0):
                raise EngineError(f"adapter scale must be > 0, got {scale}")
            self._adapters.activate(name, scale)

    @property
    def _net(self):
        return self._adapters.model if self._adapters else self.model

    # ------------------------------------------------------------------ public API
    def describe(self) -> dict:
        return {"model_path": self.model_path, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "attn_implementation": self.attn_implementation, "active_adapter": self.active_adapter,
                "adapters": self.available_adapters}

    def ask(self, question: str, images: Sequence[np.ndarray], *, max_new_tokens: int = 128,
            on_text: OnText | None = None, should_stop: ShouldStop | None = None) -> AskResult:
        """Answer a free-form question; ``relations`` holds what the answer states."""
        if not question.strip():
            raise EngineError("the question is empty")
        images = validate_images(images, self.max_image_pixels)
        gen = self._generate(prompts.chat_prompt(question.strip(), len(images)), images, max_new_tokens, on_text, should_stop)
        answer = gen.text.strip()
        rels = relations_from_text(answer) or relation_from_question(question, answer)
        return AskResult(answer, rels, gen.tokens, gen.cancelled)

    def query_relations(self, candidates: Sequence[Relation], images: Sequence[np.ndarray], *,
                        should_stop: ShouldStop | None = None) -> list[Relation]:
        """P(yes) for each candidate, from the yes/no next-token probabilities (not from generated text).

        ``should_stop`` is polled before each candidate; when it fires the call raises ``EngineError``.
        """
        check_candidates(candidates)
        images = validate_images(images, self.max_image_pixels)
        texts = [prompts.chat_prompt(prompts.relation_question(c.subject.strip(), c.relation.strip(), c.object.strip()), len(images))
                 for c in candidates]
        probs = self._yes_probabilities(texts, images, should_stop)
        return [Relation(c.subject, c.relation, c.object, holds=p >= 0.5, probability=p) for c, p in zip(candidates, probs)]

    def plan(self, instruction: str, images: Sequence[np.ndarray], *, max_new_tokens: int = 256,
             on_text: OnText | None = None, should_stop: ShouldStop | None = None) -> PlanResult:
        """A plan as PlanStep dicts parsed from the JSON the prompt asks for; ``error`` says why when unparsable."""
        if not instruction.strip():
            raise EngineError("the instruction is empty")
        images = validate_images(images, self.max_image_pixels)
        gen = self._generate(prompts.chat_prompt(prompts.plan_request(instruction.strip()), len(images)), images,
                             max_new_tokens, on_text, should_stop)
        if gen.cancelled:
            return PlanResult([], gen.text, "cancelled", gen.tokens, True)
        try:
            steps = parse_plan(gen.text)
        except PlanParseError as e:
            return PlanResult([], gen.text, str(e), gen.tokens)
        return PlanResult(steps, gen.text, "", gen.tokens)

    def close(self) -> None:
        """Drop the model and give accelerator memory back."""
        with self._lock:
            self.model = None
            self._adapters = None
            self.processor = None
            gc.collect()
            if self._torch.cuda.is_available():
                self._torch.cuda.empty_cache()

    # ------------------------------------------------------------------ internals
    def _answer_first_tokens(self, *answers: str) -> list[int]:
        """First token id of each answer right after the assistant tag (tokenizer-agnostic)."""
        tok = self.processor.tokenizer
        prompt = prompts.chat_prompt("Q", 0)
        base = tok(prompt, add_special_tokens=True)["input_ids"]
        ids = []
        for a in answers:
            full = tok(prompt + a, add_special_tokens=True)["input_ids"]
            if full[: len(base)] != base or len(full) <= len(base):
                raise EngineError(f"tokenizer does not keep the prompt intact before {a!r}")
            ids.append(full[len(base)])
        if len(set(ids)) != len(ids):
            raise EngineError(f"answers {answers} start with the same token; yes/no scoring impossible")
        return ids

    def _single_token_spellings(self, word: str, canonical: int) -> list[int]:
        """Token ids of word / Word / WORD where that spelling is one token right after the assistant tag."""
        tok = self.processor.tokenizer
        prompt = prompts.chat_prompt("Q", 0)
        base = tok(prompt)["input_ids"]
        ids = [canonical]
        for spelling in (word.capitalize(), word.upper()):
            full = tok(prompt + spelling)["input_ids"]
            if full[: len(base)] == base and len(full) == len(base) + 1 and full[-1] not in ids:
                ids.append(full[-1])
        return ids

    def _encode(self, text: str, images: Sequence[np.ndarray], image_features=None):
        batch = self.processor(text, images=list(images) or None, return_tensors="pt", image_features=image_features)
        dev = self.device
        out = {k: v.to(dev) for k, v in batch.items() if hasattr(v, "to")}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def _check_ready(self):
        if self.model is None:
            raise EngineError("the model was released (node cleaned up); configure it again")

    def _generate(self, text, images, max_new_tokens, on_text, should_stop) -> _Generation:
        torch = self._torch
        if max_new_tokens <= 0:
            raise EngineError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        with self._lock, torch.inference_mode():
            self._check_ready()
            tok = self.processor.tokenizer
            batch = self._encode(text, images)
            mask = batch["attention_mask"]
            out = self._net(**batch, use_cache=True, logits_to_keep=1)
            generated: list[int] = []
            text_so_far = ""
            cancelled = False
            while True:
                next_id = int(out.logits[0, -1].float().argmax())
                if next_id in self.stop_ids:
                    break
                generated.append(next_id)
                text_so_far = tok.decode(generated, skip_special_tokens=True)
                if on_text:
                    on_text(text_so_far, len(generated))
                if len(generated) >= max_new_tokens:
                    break
                if should_stop and should_stop():
                    cancelled = True
                    break
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
                out = self._net(input_ids=torch.tensor([[next_id]], device=self.device), attention_mask=mask,
                                past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            return _Generation(text_so_far, len(generated), cancelled)

    def _yes_probabilities(self, texts: list[str], images, should_stop: ShouldStop | None = None) -> list[float]:
        """Run the shared prefix (images included) once, then each candidate's suffix on the same cache.

        The cache is cropped back to the prefix after every candidate. When the prompts cross the LongRoPE
        short/long switch but the prefix does not, the prefix would be rotated with the wrong factors, so each
        candidate then runs whole, as the reference would.
        """
        torch = self._torch
        with self._lock, torch.inference_mode():
            self._check_ready()
            feats = self.processor.image_processor(list(images))  # the HD transform once for all candidates
            encoded = [self._encode(t, images, feats) for t in texts]
            ids = [e["input_ids"][0].tolist() for e in encoded]
            common = 0
            shortest = min(len(i) for i in ids)
            while common < shortest - 1 and all(i[common] == ids[0][common] for i in ids):
                common += 1
            switch = getattr(self.model.config, "original_max_position_embeddings", None)
            if switch and common <= switch < max(len(i) for i in ids):
                common = 0
            cache = None
            if common:
                first = encoded[0]
                cache = self._net(input_ids=first["input_ids"][:, :common], attention_mask=first["attention_mask"][:, :common],
                                  pixel_values=first.get("pixel_values"), image_sizes=first.get("image_sizes"),
                                  use_cache=True, logits_to_keep=1).past_key_values
            yes, no = torch.tensor(self.yes_ids), torch.tensor(self.no_ids)
            probs = []
            for i, e in enumerate(encoded):
                if should_stop and should_stop():
                    raise EngineError(f"stopped after scoring {i} of {len(encoded)} candidates (cancelled or past the deadline)")
                if cache is None:
                    out = self._net(**e, logits_to_keep=1)
                else:
                    out = self._net(input_ids=e["input_ids"][:, common:], attention_mask=e["attention_mask"],
                                    past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache.crop(-(cache.get_seq_length() - common))  # back to the shared prefix
                logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
                pair = torch.stack([torch.logsumexp(logp[yes], 0), torch.logsumexp(logp[no], 0)])
                probs.append(float(torch.softmax(pair, dim=0)[0]))
            return probs
