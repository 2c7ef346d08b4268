"""SpatialEngine: the model behind the node, the CLI and bag replay (no ROS in here).

It owns one Phi3V model + processor (+ LoRA adapters) and offers the three things robots ask for:
free-form spatial answers, calibrated yes/no probabilities for candidate relations, and JSON plans.
Decoding is an explicit greedy loop over the KV cache so that callers can stream text and cancel
between any two tokens. Callers serialise access (the node's InferenceWorker does); a lock guards
against misuse anyway.

Robots ask many questions about the same frames, so the engine reuses work (``EngineOptions``): image
embeddings per frame (``VisionCache``), the key/value cache of the prompt prefix that holds a window's images
(``PrefixCache``), one batched forward pass for all candidates of a relation query, and CLIP runs on the real
crops only. Each of these gives the same outputs as the straightforward path (tests compare them).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import prompts
from .cache import ImageEmbedding, PrefixCache, PrefixEntry, VisionCache, content_key
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, validate_image
from .parsing import PlanParseError, Relation, parse_plan_reply, relation_from_question, relations_from_text
from .streaming import TextStream
from .worker import yield_to_waiting

OnText = Callable[[str, int], None]
ShouldStop = Callable[[], bool]

# Generation lets the requests waiting on the worker run every this many tokens (relation scoring: every batch).
YIELD_EVERY_TOKENS = 8
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
    """``steps`` as PlanStep dicts; ``reason`` why there are none when the model says so ("already done");
    ``missing`` the objects the model says are not in view (then the plan is a refusal, not an empty plan)."""

    steps: list[dict]
    raw_text: str
    error: str = ""
    tokens_generated: int = 0
    cancelled: bool = False
    reason: str = ""
    missing: list = field(default_factory=list)


@dataclass
class _Generation:
    text: str
    tokens: int
    cancelled: bool


@dataclass
class EngineOptions:
    """What the engine reuses between and within requests. Every choice gives the same outputs.

    ``naive()`` turns everything off: the reference behaviour that the benchmark compares against.
    """

    vision_cache_mb: float = 256.0    # image embeddings per frame; 0 disables
    prefix_cache_mb: float = 1024.0   # KV cache of image prefixes per window; 0 disables
    skip_padding_crops: bool = True   # run CLIP on the real HD crops only, not on zero-padding slots
    batched_relations: bool = True    # score relation candidates in batched forward passes from one prefix
    relation_batch_size: int = 8      # candidates per batched pass (memory: one prefix KV copy per candidate)

    @classmethod
    def naive(cls) -> "EngineOptions":
        return cls(vision_cache_mb=0, prefix_cache_mb=0, skip_padding_crops=False, batched_relations=False,
                   relation_batch_size=1)

    def validate(self) -> "EngineOptions":
        if self.vision_cache_mb < 0 or self.prefix_cache_mb < 0:
            raise EngineError("cache sizes must be >= 0 MB (0 disables a cache)")
        if int(self.relation_batch_size) < 1:
            raise EngineError(f"relation_batch_size must be >= 1, got {self.relation_batch_size}")
        return self


@dataclass
class _Prompt:
    """A tokenised prompt whose images are already embedded."""

    input_ids: object          # torch.LongTensor (1, T) on the model device; images are negative placeholders
    features: list | None      # per image (num_tokens, hidden) features, in prompt order
    prefix_len: int            # tokens up to the last image placeholder (the part shared by questions on a window)
    prefix_key: tuple | None   # identity of that prefix for the PrefixCache (None: not cacheable)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def validate_images(images: Sequence[np.ndarray], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """RGB uint8 HxWx3 arrays of a sane size (see ``images.validate_image``), or an ``EngineError`` naming the image."""
    if images is None or len(images) == 0:
        raise EngineError("no images: give images in the request or make sure the camera topics are publishing")
    try:
        return [validate_image(img, max_pixels=max_pixels, name=f"image {i}") for i, img in enumerate(images)]
    except ImageDecodeError as e:
        raise EngineError(str(e)) from e


NO_ADAPTER = "none"


def base_model_requested(name: str | None) -> bool:
    """None, "" or "none" (any case): run the base model, no adapter. The one meaning of "none" in this package."""
    return name is None or str(name).strip().lower() in ("", NO_ADAPTER)


def check_adapter(name: str | None, available: Sequence[str]) -> None:
    """An adapter name a caller may switch to: a loaded one, or "none" (callers check before queueing a switch)."""
    if not base_model_requested(name) and name not in available:
        raise EngineError(f"unknown adapter {name!r}; loaded adapters: {list(available) or 'none'}")


def check_text(text: str, what: str) -> None:
    """A question / instruction must say something."""
    if not text.strip():
        raise EngineError(f"the {what} is empty")


# Adapter scales a request may set: (0, MAX_ADAPTER_SCALE]. 1.0 is the scale the adapter was trained at; far
# beyond it the LoRA delta swamps the weights (inf / 1e30 gave NaN probabilities and garbage "answers").
MAX_ADAPTER_SCALE = 10.0


def check_adapter_scale(scale) -> float:
    """A finite adapter scale in (0, MAX_ADAPTER_SCALE] as a float, or an ``EngineError`` naming the limit."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise EngineError(f"adapter scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_ADAPTER_SCALE:
        raise EngineError(f"adapter scale must be finite and in (0, {MAX_ADAPTER_SCALE:g}] (1.0 = as trained; "
                          f"0 in a set_adapter request means 1.0), got {value!r}")
    return value


def check_count(count: int, limit: int, what: str, param: str) -> None:
    """At most ``limit`` items of ``what`` per request; the refusal names the limit and its parameter."""
    if count > limit:
        raise EngineError(f"too many {what}: {count}, the limit is {limit} per request (parameter {param})")


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
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, options: EngineOptions | None = None,
                 quantization: str = "none"):
        import torch

        self._torch = torch
        self.options = (options or EngineOptions()).validate()
        self.quantization = quantization
        self.vision_cache = VisionCache(int(self.options.vision_cache_mb * 2**20))
        self.prefix_cache = PrefixCache(int(self.options.prefix_cache_mb * 2**20))
        self._vision_adapters: dict[str, bool] = {}  # adapter name -> changes the vision tower
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
        # The most characters one token can stand for: a text longer than n times this has more than n tokens, so an
        # over-long text is refused from its length alone (a 1 MB question is never tokenized).
        self.max_token_chars = max(1, max(map(len, processor.tokenizer.get_vocab()), default=1))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_path: str, *, adapters: dict[str, str] | None = None, active_adapter: str | None = None,
                        device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto",
                        num_crops: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                        options: EngineOptions | None = None, quantization: str = "none") -> "SpatialEngine":
        """Load a checkpoint folder (or hub id) and optional LoRA adapters; errors become ``EngineError``.

        ``quantization``: "none", or "8bit" / "4bit" decoder weights through bitsandbytes (CUDA only).
        """
        if not model_path:
            raise EngineError("model_path is empty: set it to a checkpoint folder or a Hugging Face hub id")
        if _looks_like_local_path(model_path) and not os.path.isdir(model_path):
            raise EngineError(f"model directory {model_path!r} does not exist: set model_path to a checkpoint folder "
                              f"(with config.json) or a hub id like microsoft/Phi-3.5-vision-instruct")
        if os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, "config.json")):
            raise EngineError(f"{model_path!r} has no config.json: it is not a Phi-3-vision checkpoint folder")
        from ..model import Phi3VForCausalLM, Phi3VProcessor
        from ..model.quantization import check_quantization, quantize_decoder_linears
        from ..model.runtime import resolve_attn, resolve_device, resolve_dtype

        try:
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, dev)
            attn = resolve_attn(attn_implementation, dev, torch_dtype)
            quant = check_quantization(quantization, dev)
        except (RuntimeError, ValueError, ImportError) as e:
            raise EngineError(f"device/dtype/attention/quantization settings cannot be used here: {e}") from e
        try:
            processor = Phi3VProcessor.from_pretrained(model_path, **({"num_crops": num_crops} if num_crops else {}))
            model = Phi3VForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype, device_map=str(dev),
                                                     attn_implementation=attn)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise EngineError(f"could not load the model from {model_path!r}: {e}") from e
        if quant != "none":
            try:
                quantize_decoder_linears(model, quant, torch_dtype)
            except (RuntimeError, ValueError, TypeError) as e:
                raise EngineError(f"could not quantize the model to {quant}: {e}") from e
        model.eval()
        engine = cls(model, processor, device=str(dev), dtype=torch_dtype, attn_implementation=attn,
                     model_path=model_path, max_image_pixels=max_image_pixels, options=options, quantization=quant)
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
        if active_adapter is not None and (adapters or not base_model_requested(active_adapter)):
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
            self._vision_adapters[name] = self._adapters.touches_vision(name)
            self.prefix_cache.clear()  # loading re-applies the active adapter: start from fresh prefixes

    @property
    def available_adapters(self) -> list[str]:
        return list(self._adapters.available) if self._adapters else []

    @property
    def active_adapter(self) -> str:
        return self._adapters.active if self._adapters else ""

    def set_adapter(self, name: str | None, scale: float = 1.0) -> str:
        """Activate a loaded adapter; ``None``, "" or "none" runs the base model. ``scale`` must be finite and in
        (0, MAX_ADAPTER_SCALE] (checked here too, whoever calls). Returns the adapter active after the switch,
        read under the engine's lock (so a caller reports its own switch, not a later one)."""
        scale = check_adapter_scale(scale)
        with self._lock:
            if base_model_requested(name):
                if self._adapters:
                    self._adapters.activate(None)
                self.prefix_cache.clear()
                return self.active_adapter
            check_adapter(name, self.available_adapters)
            self._adapters.activate(name, scale)
            self.prefix_cache.clear()  # every cached key/value depends on the adapter
            return self.active_adapter

    def _adapter_tag(self) -> tuple:
        return (self.active_adapter, self._adapters.scale if self._adapters else 0.0)

    def _vision_tag(self) -> tuple | None:
        """The adapter part of a vision-cache key: None when the active adapter leaves the vision tower alone."""
        active = self.active_adapter
        return self._adapter_tag() if active and self._vision_adapters.get(active, True) else None

    def with_options(self, options: EngineOptions) -> "SpatialEngine":
        """Another engine on the same model, processor and adapters, with other options and caches of its own.

        Both share one lock (they never run the model at the same time); cache keys carry the active adapter,
        so an adapter switched through either engine is never answered from the other's stale entries.
        """
        other = copy.copy(self)
        other.options = options.validate()
        other.vision_cache = VisionCache(int(other.options.vision_cache_mb * 2**20))
        other.prefix_cache = PrefixCache(int(other.options.prefix_cache_mb * 2**20))
        return other

    def clear_caches(self) -> None:
        with self._lock:
            self.vision_cache.clear()
            self.prefix_cache.clear()

    def cache_stats(self) -> dict:
        return {"vision": self.vision_cache.stats(), "prefix": self.prefix_cache.stats()}

    @property
    def _net(self):
        return self._adapters.model if self._adapters else self.model

    # ------------------------------------------------------------------ public API
    def describe(self) -> dict:
        o = self.options
        return {"model_path": self.model_path, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "attn_implementation": self.attn_implementation, "quantization": self.quantization,
                "active_adapter": self.active_adapter, "adapters": self.available_adapters,
                "num_crops": self.processor.num_crops if self.processor else 0,
                "skip_padding_crops": o.skip_padding_crops, "batched_relations": o.batched_relations,
                "relation_batch_size": o.relation_batch_size, "pinned_upload": self.device.startswith("cuda"),
                "cache": self.cache_stats()}

    def check_text_tokens(self, text: str, what: str, max_tokens: int, param: str) -> int:
        """The number of tokens ``text`` takes in a prompt (rendered as ``prompts.literal_text``), or an
        ``EngineError`` when it is more than ``max_tokens``, naming the limit and its parameter ``param``.

        The work is bounded before tokenizing: a text longer than ``max_tokens * max_token_chars`` characters
        cannot fit and is refused from its length (one token never stands for more characters than its vocabulary
        entry has), so only texts of at most that many characters are tokenized.
        """
        self._check_ready()
        most_chars = int(max_tokens) * self.max_token_chars
        if len(text) > most_chars:
            raise EngineError(f"the {what} is too long: {len(text)} characters, more than {max_tokens} tokens can "
                              f"hold ({most_chars} characters at most); the limit is the parameter "
                              f"{param} = {max_tokens} tokens")
        n = len(self.processor.tokenizer(prompts.literal_text(text), add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            raise EngineError(f"the {what} is too long: {n} tokens; the limit is the parameter {param} = "
                              f"{max_tokens} tokens")
        return n

    def ask(self, question: str, images: Sequence[np.ndarray], *, max_new_tokens: int = 128,
            on_text: OnText | None = None, should_stop: ShouldStop | None = None,
            frame_keys: Sequence | None = None) -> AskResult:
        """Answer a free-form question; ``relations`` holds what the answer states.

        ``frame_keys``: one hashable identity per image (the node and replay pass (scope, topic, stamp, content
        digest)); the caches take images with the same key to be the same picture. Without keys a digest of the pixels is used.
        """
        check_text(question, "question")
        images = validate_images(images, self.max_image_pixels)
        gen = self._generate(prompts.chat_prompt(question.strip(), len(images)), images, max_new_tokens, on_text,
                             should_stop, frame_keys)
        answer = gen.text.strip()
        rels = relations_from_text(answer) or relation_from_question(question, answer)
        return AskResult(answer, rels, gen.tokens, gen.cancelled)

    def query_relations(self, candidates: Sequence[Relation], images: Sequence[np.ndarray], *,
                        should_stop: ShouldStop | None = None, frame_keys: Sequence | None = None) -> list[Relation]:
        """P(yes) for each candidate, from the yes/no next-token probabilities (not from generated text).

        ``should_stop`` is polled before each candidate; when it fires the call raises ``EngineError``.
        """
        check_candidates(candidates)
        images = validate_images(images, self.max_image_pixels)
        texts = [prompts.chat_prompt(prompts.relation_question(c.subject.strip(), c.relation.strip(), c.object.strip()), len(images))
                 for c in candidates]
        probs = self._yes_probabilities(texts, images, should_stop, frame_keys)
        return [Relation(c.subject, c.relation, c.object, holds=p >= 0.5, probability=p) for c, p in zip(candidates, probs)]

    def plan(self, instruction: str, images: Sequence[np.ndarray], *, max_new_tokens: int = 256,
             on_text: OnText | None = None, should_stop: ShouldStop | None = None,
             frame_keys: Sequence | None = None) -> PlanResult:
        """A plan as PlanStep dicts parsed from the JSON the prompt asks for; ``error`` says why when unparsable."""
        check_text(instruction, "instruction")
        images = validate_images(images, self.max_image_pixels)
        gen = self._generate(prompts.chat_prompt(prompts.plan_request(instruction.strip()), len(images)), images,
                             max_new_tokens, on_text, should_stop, frame_keys)
        if gen.cancelled:
            return PlanResult([], gen.text, "cancelled", gen.tokens, True)
        try:
            reply = parse_plan_reply(gen.text)
        except PlanParseError as e:
            return PlanResult([], gen.text, str(e), gen.tokens)
        return PlanResult(reply.steps, gen.text, "", gen.tokens, reason=reply.reason, missing=reply.missing)

    def close(self) -> None:
        """Drop the model and give accelerator memory back."""
        with self._lock:
            self.model = None
            self._adapters = None
            self.processor = None
            self.vision_cache.clear()
            self.prefix_cache.clear()
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

    def _check_ready(self):
        if self.model is None:
            raise EngineError("the model was released (node cleaned up); configure it again")

    def _upload(self, tensor):
        """Host tensor -> model device; pinned memory and an asynchronous copy on CUDA."""
        if self.device.startswith("cuda"):
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _frame_ids(self, images: Sequence[np.ndarray], frame_keys: Sequence | None) -> tuple | None:
        """One identity per image for the caches (None when both caches are off: nothing to hash then).

        Given keys must tell different pictures apart: the node and replay pass (scope, topic, stamp, digest of the
        message bytes) from the FrameWindow; without keys the pixels are hashed here."""
        if frame_keys is not None:
            if len(frame_keys) != len(images):
                raise EngineError(f"{len(frame_keys)} frame keys for {len(images)} images")
            return tuple(frame_keys)
        if not (self.vision_cache.enabled or self.prefix_cache.enabled):
            return None
        return tuple(content_key(im) for im in images)

    def _image_embeddings(self, images: Sequence[np.ndarray], frame_ids: tuple | None) -> list[ImageEmbedding]:
        """Embeddings of every image, from the VisionCache where possible; misses run CLIP together in one batch."""
        num_crops = self.processor.num_crops
        use_cache = self.vision_cache.enabled and frame_ids is not None
        keys: list = [None] * len(images)
        if use_cache:
            tag = self._vision_tag()
            keys = [(fid, num_crops, tag) for fid in frame_ids]
        found: dict[int, ImageEmbedding] = {}
        todo: dict = {}  # cache key (or index) -> image indices needing it
        for i, key in enumerate(keys):
            hit = self.vision_cache.get(key) if use_cache else None
            if hit is not None:
                found[i] = hit
            else:
                todo.setdefault(key if use_cache else i, []).append(i)
        if todo:
            first = [images[idx[0]] for idx in todo.values()]
            tower = self.model.model.vision_embed_tokens
            if self.options.skip_padding_crops:  # the padding slots are never built, let alone encoded
                feats = self.processor.image_processor.preprocess_unpadded(first)
                grids = [(int(h) // tower.crop, int(w) // tower.crop) for h, w in feats["image_sizes"].tolist()]
                per_image = tower.features_from_crops([self._upload(x).to(self.dtype) for x in feats["crops"]], grids)
            else:
                feats = self.processor.image_processor(first)
                per_image = tower.image_features(self._upload(feats["pixel_values"]).to(self.dtype),
                                                 feats["image_sizes"], encode_padding=True)
            for j, (key, idx) in enumerate(todo.items()):
                h, w = (int(v) for v in feats["image_sizes"][j])
                emb = ImageEmbedding((h, w), int(feats["num_img_tokens"][j]), per_image[j].clone())
                if use_cache:
                    self.vision_cache.put(key, emb, emb.nbytes)
                for i in idx:
                    found[i] = emb
        return [found[i] for i in range(len(images))]

    def _prompt(self, text: str, images: Sequence[np.ndarray], embeddings: list[ImageEmbedding],
                frame_ids: tuple | None) -> _Prompt:
        info = {"num_img_tokens": [e.num_tokens for e in embeddings], "pixel_values": None, "image_sizes": None}
        ids = self.processor(text, images=list(images) or None, image_features=info if images else None)["input_ids"]
        row = ids[0].tolist()
        image_pos = [i for i, t in enumerate(row) if t < 0]
        prefix_len = image_pos[-1] + 1 if image_pos else 0
        prefix_key = None
        if prefix_len and frame_ids is not None:
            prefix_key = (self._adapter_tag(), frame_ids, self.processor.num_crops, tuple(row[:prefix_len]))
        return _Prompt(ids.to(self.device), [e.features for e in embeddings] or None, prefix_len, prefix_key)

    def _forward_embeds(self, input_ids, features, **kwargs):
        """One forward from token ids whose image placeholders take ``features``."""
        embeds = self.model.model.embed_with_features(input_ids, features)
        return self._net(inputs_embeds=embeds, **kwargs)

    def _can_split(self, prefix_len: int, total_len: int) -> bool:
        """Whether a prefix's KV cache can serve a longer prompt exactly.

        LongRoPE checkpoints rotate every position with the long factors once a forward reaches past
        ``original_max_position_embeddings``; a prefix computed below that switch cannot serve a prompt above it.
        """
        if not 0 < prefix_len < total_len:
            return False
        cfg = self.model.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        switch = (rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None) \
            or getattr(cfg, "original_max_position_embeddings", None)
        if switch and prefix_len <= switch < total_len:
            return False
        return True

    def _prefix(self, prompt: _Prompt) -> PrefixEntry:
        """The KV cache of the prompt's image prefix, from the PrefixCache or computed now (and stored)."""
        torch = self._torch
        cached = self.prefix_cache.enabled and prompt.prefix_key is not None
        entry = self.prefix_cache.get(prompt.prefix_key) if cached else None
        if entry is None:
            n = prompt.prefix_len
            out = self._forward_embeds(prompt.input_ids[:, :n], prompt.features,
                                       attention_mask=torch.ones((1, n), dtype=torch.long, device=self.device),
                                       use_cache=True, logits_to_keep=1)
            entry = PrefixEntry.from_cache(out.past_key_values, n)
            if cached:
                self.prefix_cache.put(prompt.prefix_key, entry, entry.nbytes)
        return entry

    def _prefill(self, prompt: _Prompt):
        """Forward the prompt. A window seen before only runs the words after its images (PrefixCache hit);
        a new one runs whole, in one pass, and leaves its image prefix in the cache for the next question."""
        torch = self._torch
        mask = torch.ones((1, prompt.length), dtype=torch.long, device=self.device)
        cacheable = (self.prefix_cache.enabled and prompt.prefix_key is not None
                     and self._can_split(prompt.prefix_len, prompt.length))
        entry = self.prefix_cache.get(prompt.prefix_key) if cacheable else None
        if entry is not None:
            return self._net(input_ids=prompt.input_ids[:, entry.length:], attention_mask=mask,
                             past_key_values=entry.to_cache(), use_cache=True, logits_to_keep=1), mask
        out = self._forward_embeds(prompt.input_ids, prompt.features, attention_mask=mask, use_cache=True,
                                   logits_to_keep=1)
        if cacheable:  # causal attention: the prefix rows of the whole prompt's cache are the prefix's own cache
            entry = PrefixEntry.from_cache(out.past_key_values, prompt.prefix_len)
            self.prefix_cache.put(prompt.prefix_key, entry, entry.nbytes)
        return out, mask

    def _pause_for_waiting(self, adapter_tag: tuple) -> bool:
        """Between chunks of a long request (called holding ``self._lock``): release the model lock and let the
        worker run the requests waiting now (``yield_to_waiting``; a no-op off a worker thread or with nothing
        waiting). True when the active adapter changed meanwhile (a set_adapter ran): the caller starts over, so
        every part of one answer comes from one adapter."""
        self._lock.release()
        try:
            ran = yield_to_waiting()
        finally:
            self._lock.acquire()
        if not ran:
            return False
        self._check_ready()
        return self._adapter_tag() != adapter_tag

    def _generate(self, text, images, max_new_tokens, on_text, should_stop, frame_keys=None) -> _Generation:
        """Greedy generation. Every ``YIELD_EVERY_TOKENS`` tokens the requests waiting on the worker get the model
        (see ``_pause_for_waiting``); an adapter switched meanwhile restarts the answer under the new adapter."""
        torch = self._torch
        if max_new_tokens <= 0:
            raise EngineError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        with self._lock, torch.inference_mode():
            self._check_ready()
            restart = True
            while restart:
                restart = False
                tag = self._adapter_tag()
                frame_ids = self._frame_ids(images, frame_keys)
                prompt = self._prompt(text, images, self._image_embeddings(images, frame_ids), frame_ids)
                out, mask = self._prefill(prompt)
                stream = TextStream(self.processor.tokenizer, on_text)
                cancelled = False
                while True:
                    next_id = int(out.logits[0, -1].float().argmax())
                    if next_id in self.stop_ids:
                        break
                    stream.push(next_id)
                    if len(stream.ids) >= max_new_tokens:
                        break
                    if should_stop and should_stop():
                        cancelled = True
                        break
                    if len(stream.ids) % YIELD_EVERY_TOKENS == 0 and self._pause_for_waiting(tag):
                        restart = True
                        break
                    mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
                    out = self._net(input_ids=torch.tensor([[next_id]], device=self.device), attention_mask=mask,
                                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            return _Generation(stream.finish(), len(stream.ids), cancelled)

    def _yes_probability(self, logits) -> float:
        """P(yes) from next-token logits: yes-spellings vs no-spellings, renormalised over the two."""
        torch = self._torch
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        pair = torch.stack([torch.logsumexp(logp[self.yes_ids], 0), torch.logsumexp(logp[self.no_ids], 0)])
        return float(torch.softmax(pair, dim=0)[0])

    def _yes_probabilities(self, texts: list[str], images, should_stop: ShouldStop | None = None,
                           frame_keys: Sequence | None = None) -> list[float]:
        """P(yes) per candidate prompt. The images are embedded once and their prefix is computed once (or taken
        from the PrefixCache); the candidates' own words then run in batches of ``relation_batch_size``.

        Candidates whose prompts cannot share the prefix (LongRoPE switch) run whole, one by one, as the reference
        would. ``should_stop`` is polled before every forward pass. Between batches the requests waiting on the
        worker get the model (``_pause_for_waiting``): thousands of candidates do not starve other clients; an
        adapter switched meanwhile starts the scoring over, so all candidates are scored under one adapter.
        """
        torch = self._torch
        with self._lock, torch.inference_mode():
            self._check_ready()
            while True:
                probs = self._score_candidates(texts, images, should_stop, frame_keys)
                if probs is not None:
                    return probs

    def _score_candidates(self, texts, images, should_stop, frame_keys) -> list[float] | None:
        """``_yes_probabilities``' work under the model lock; None when an adapter switch calls for a new start."""
        torch = self._torch
        tag = self._adapter_tag()
        frame_ids = self._frame_ids(images, frame_keys)
        embeddings = self._image_embeddings(images, frame_ids)
        prompts_ = [self._prompt(t, images, embeddings, frame_ids) for t in texts]
        first = prompts_[0]
        n = first.prefix_len
        shared = [p for p in prompts_ if p.prefix_len == n and self._can_split(n, p.length)
                  and torch.equal(p.input_ids[:, :n], first.input_ids[:, :n])]
        use_prefix = len(shared) == len(prompts_) and (self.options.batched_relations or self.prefix_cache.enabled)
        step = max(1, int(self.options.relation_batch_size)) if self.options.batched_relations else 1
        probs: list[float] = []

        def check_stop():
            if should_stop and should_stop():
                raise EngineError(f"stopped after scoring {len(probs)} of {len(prompts_)} candidates "
                                  "(cancelled or past the deadline)")

        if len(prompts_) == 1:  # one candidate: a plain prefill (whole prompt, or the cached prefix + its words)
            check_stop()
            out, _ = self._prefill(first)
            return [self._yes_probability(out.logits[0, -1])]
        if not use_prefix:
            for i, p in enumerate(prompts_):
                check_stop()
                mask = torch.ones((1, p.length), dtype=torch.long, device=self.device)
                out = self._forward_embeds(p.input_ids, p.features, attention_mask=mask, logits_to_keep=1)
                probs.append(self._yes_probability(out.logits[0, -1]))
                del out
                if (i + 1) % step == 0 and i + 1 < len(prompts_) and self._pause_for_waiting(tag):
                    return None
            return probs
        check_stop()
        entry = self._prefix(first)  # held here: an eviction while others run cannot take it away
        pad = self.processor.pad_token_id
        for start in range(0, len(prompts_), step):
            if start and self._pause_for_waiting(tag):
                return None
            check_stop()
            chunk = prompts_[start : start + step]
            suffixes = [p.input_ids[0, n:] for p in chunk]
            width = max(x.shape[0] for x in suffixes)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=self.device)
            mask = torch.zeros((len(chunk), n + width), dtype=torch.long, device=self.device)
            mask[:, :n] = 1
            for r, x in enumerate(suffixes):  # right padding: real tokens never attend to the pads after them
                ids[r, : x.shape[0]] = x
                mask[r, n : n + x.shape[0]] = 1
            out = self._net(input_ids=ids, attention_mask=mask, past_key_values=entry.to_cache(len(chunk)),
                            use_cache=True)
            for r, x in enumerate(suffixes):
                probs.append(self._yes_probability(out.logits[r, x.shape[0] - 1]))
            del out  # the batch's copies of the prefix KV and its logits: not held while others run in the pause
        return probs
