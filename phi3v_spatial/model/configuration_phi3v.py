"""Phi3VConfig: reads the official Phi-3(.5)-vision config.json as published, on transformers 5.x.

It extends the native Phi3Config (LM part, LongRoPE) with the image-embedding settings. The CLIP tower is
ViT-L/14-336 unless the config says otherwise (optional keys in ``img_processor`` or a ``vision_config`` dict),
which is what lets small test checkpoints keep the official layout.
"""
from __future__ import annotations

import copy
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

from .runtime import flash_attn_available

# The reference hard-codes this tower (image_embedding_phi3_v.py CLIP_VIT_LARGE_PATCH14_336_CONFIG).
CLIP_VIT_LARGE_PATCH14_336 = dict(
    attention_dropout=0.0, dropout=0.0, hidden_act="quick_gelu", hidden_size=1024, image_size=336,
    initializer_factor=1.0, initializer_range=0.02, intermediate_size=4096, layer_norm_eps=1e-05,
    num_attention_heads=16, num_channels=3, num_hidden_layers=24, patch_size=14, projection_dim=768,
)
# Short names accepted in ``img_processor`` (so a config.json stays readable) -> CLIPVisionConfig fields.
_IMG_PROCESSOR_KEYS = {
    "image_size": "image_size", "crop_size": "image_size", "patch_size": "patch_size",
    "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers", "layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "heads": "num_attention_heads",
    "intermediate_size": "intermediate_size", "intermediate": "intermediate_size",
    "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps",
}
DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
    "use_hd_transform": True, "with_learnable_separator": True,
}
DEFAULT_IMG_PROCESSOR = {  # image_dim_out defaults to the tower's hidden size (1024 for ViT-L)
    "model_name": "openai/clip-vit-large-patch14-336", "name": "clip_vision_model",
    "num_img_tokens": 144,
}


class Phi3VConfig(Phi3Config):
    """Phi3Config + ``embd_layer`` / ``img_processor`` (+ optional ``vision_config``), model_type "phi3_v"."""

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("auto_map", None)  # points at remote code; this implementation is native
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        self.vision_config = dict(self.vision_config) if self.vision_config else None
        # transformers 5.x pitfall: longrope needs original_max_position_embeddings inside the rope dict
        # (the official file keeps it top-level, with a "su" rope_scaling). Copy so the caller's dict is untouched.
        if isinstance(kwargs.get("rope_scaling"), dict) and kwargs["rope_scaling"]:
            kwargs["rope_scaling"] = self._fix_rope(kwargs["rope_scaling"])
        if isinstance(self.rope_parameters, dict) and self.rope_parameters:
            self.rope_parameters = self._fix_rope(self.rope_parameters)
        super().__post_init__(**kwargs)
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters.pop("type", None)  # keep only the standard "rope_type" key
        # The published config.json asks for flash_attention_2; fall back when flash_attn cannot be imported.
        if self._attn_implementation == "flash_attention_2" and not flash_attn_available():
            self._attn_implementation = None  # let the model pick sdpa/eager
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size})")
        self._validate_vision()

    def _fix_rope(self, rope: dict) -> dict:
        """Copy of a rope dict with original_max_position_embeddings inside it for (su|longrope) scaling."""
        rope = copy.deepcopy(rope)
        if rope.get("rope_type", rope.get("type")) in ("su", "longrope"):
            rope.setdefault("original_max_position_embeddings", self.original_max_position_embeddings)
        return rope

    # ----- vision tower / projector geometry (all derived, never hard-coded) -----
    def clip_vision_config(self) -> CLIPVisionConfig:
        """The CLIPVisionConfig of the tower: ViT-L/14-336 unless ``img_processor``/``vision_config`` override it."""
        kw: dict[str, Any] = dict(CLIP_VIT_LARGE_PATCH14_336)
        for key, field in _IMG_PROCESSOR_KEYS.items():
            if key in self.img_processor and key not in ("image_dim_out",):
                kw[field] = self.img_processor[key]
        if self.vision_config:
            kw.update({k: v for k, v in self.vision_config.items() if k not in ("model_type", "transformers_version")})
        cfg = CLIPVisionConfig(**kw)
        cfg._attn_implementation = self._attn_implementation
        return cfg

    @property
    def crop_size(self) -> int:
        return int(self.clip_vision_config().image_size)

    @property
    def patch_size(self) -> int:
        return int(self.clip_vision_config().patch_size)

    @property
    def patch_grid(self) -> int:
        """Patches per crop side (24 for 336/14)."""
        return self.crop_size // self.patch_size

    @property
    def merged_grid(self) -> int:
        """Tokens per crop side after the 2x2 merge (12 for 336/14)."""
        return self.patch_grid // 2

    @property
    def tokens_per_crop(self) -> int:
        return self.merged_grid ** 2

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor.get("image_dim_out", self.clip_vision_config().hidden_size))

    @property
    def layer_idx(self) -> int:
        return int(self.img_processor.get("layer_idx", -2))

    @property
    def type_feature(self) -> str:
        return self.img_processor.get("type_feature", "patch")

    @property
    def hd_transform_order(self) -> str:
        return self.embd_layer.get("hd_transform_order", "glb_sub")

    @property
    def projection_cls(self) -> str:
        return self.embd_layer.get("projection_cls", "linear")

    def num_image_tokens(self, h_crops: int, w_crops: int) -> int:
        """Tokens one image occupies: sub grid with newline column + glb_GN + global grid with newline column."""
        g = self.merged_grid
        return (h_crops * w_crops + 1) * g * g + 1 + (h_crops + 1) * g

    def _validate_vision(self) -> None:
        cfg = self.clip_vision_config()
        if cfg.image_size % cfg.patch_size or (cfg.image_size // cfg.patch_size) % 2:
            raise ValueError(f"vision crop {cfg.image_size} / patch {cfg.patch_size} must give an even patch grid (2x2 merge)")
        if self.image_dim_out != cfg.hidden_size:
            raise ValueError(f"img_processor.image_dim_out={self.image_dim_out} != vision hidden_size={cfg.hidden_size}")
        emb = self.embd_layer
        if not emb.get("use_hd_transform", False) or not emb.get("with_learnable_separator", False):
            raise ValueError("only the HD transform with learnable separators (Phi-3-vision layout) is supported")
        if self.hd_transform_order != "sub_glb":
            raise ValueError(f"hd_transform_order {self.hd_transform_order!r} is not supported (Phi-3-vision uses 'sub_glb')")
        if self.projection_cls != "mlp":
            raise ValueError(f"projection_cls {self.projection_cls!r} is not supported (Phi-3-vision uses 'mlp')")
        if self.type_feature != "patch":
            raise ValueError(f"img_processor.type_feature {self.type_feature!r} is not supported (only 'patch')")
        n_layers = cfg.num_hidden_layers
        if not (-n_layers - 1 <= self.layer_idx <= n_layers):
            raise ValueError(f"img_processor.layer_idx={self.layer_idx} is out of range for {n_layers} vision layers")

    @property
    def vision_layers_used(self) -> int:
        """How many CLIP encoder layers produce hidden_states[layer_idx] (hidden_states[0] = embeddings)."""
        n = self.clip_vision_config().num_hidden_layers
        idx = self.layer_idx if self.layer_idx >= 0 else n + 1 + self.layer_idx
        return idx
