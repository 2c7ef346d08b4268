"""Small random checkpoints in the official Phi-3-vision layout, for tests and the demo (builds in well under 2 s).

The files look like a released checkpoint (config.json with "su" rope_scaling and the official keys, two safetensors
shards + index, tokenizer files, preprocessor_config.json) with small dimensions and a small CLIP tower, which the
official-format config carries as extra ``img_processor`` keys.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Keys of tiny_config_dict() that are vision-tower settings (go into img_processor) rather than top-level config.
_VISION_KEYS = {"crop_size": "image_size", "patch_size": "patch_size", "vision_hidden_size": "hidden_size",
                "vision_layers": "num_hidden_layers", "vision_heads": "num_attention_heads",
                "vision_intermediate_size": "intermediate_size"}


def _rope_factors(n: int, lo: float, hi: float) -> list[float]:
    """Monotone factors like the official ones (first ~1, growing), deterministic."""
    return [float(lo * (hi / lo) ** (i / max(n - 1, 1))) for i in range(n)]


def tiny_config_dict(**overrides) -> dict:
    """An official-shaped config.json dict with small dimensions.

    Top-level keys override the config (hidden_size, num_hidden_layers, vocab_size, ...); the vision keys
    ``crop_size``, ``patch_size``, ``vision_hidden_size``, ``vision_layers``, ``vision_heads``,
    ``vision_intermediate_size`` and ``layer_idx`` go into ``img_processor``.
    """
    overrides = dict(overrides)
    vision = {"image_size": 56, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64}
    for key, field in _VISION_KEYS.items():
        if key in overrides:
            vision[field] = overrides.pop(key)
    layer_idx = overrides.pop("layer_idx", -2)
    hidden = overrides.get("hidden_size", 64)
    heads = overrides.get("num_attention_heads", 4)
    half_head = (hidden // heads) // 2
    grid = vision["image_size"] // vision["patch_size"]
    cfg = {
        "_name_or_path": "phi3v-tiny-random",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "img_processor": {"image_dim_out": vision["hidden_size"], "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": (grid // 2) ** 2, "layer_idx": layer_idx,
                          **vision},
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "num_key_value_heads": heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": _rope_factors(half_head, 1.03, 64.8),
                         "short_factor": _rope_factors(half_head, 1.05, 3.05), "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": 32064,
        "_attn_implementation": "flash_attention_2",  # like the official files: must fall back without flash_attn
    }
    cfg.update(overrides)
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def tokenizer_vocab_size(tokenizer_dir: str) -> int:
    """Rows the embedding needs for this tokenizer, padded to a multiple of 64 (32045 ids -> 32064, as released)."""
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    return int(math.ceil(n / 64) * 64)


def tokenizer_pad_id(tokenizer_dir: str) -> int | None:
    """Id of the tokenizer's pad token (else its eos token) from the tokenizer files, or None."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(tokenizer_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                cfg.update(json.load(f))
    for key in ("pad_token", "eos_token"):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and tok.token_to_id(value) is not None:
            return tok.token_to_id(value)
    return None


@torch.no_grad()
def random_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights for every official tensor, scaled so that image features and every norm matter in the logits.

    Zero separators or unit norms would hide ordering bugs, so GN vectors, biases and norm weights are non-trivial.
    """
    from .modeling_phi3v import Phi3VForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Phi3VForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith(("layernorm.weight", "norm.weight", "layer_norm1.weight", "layer_norm2.weight",
                          "pre_layrnorm.weight")) or name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("glb_GN", "sub_GN", "class_embedding")):
            t = torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
            t = torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:
            t = torch.randn(shape, generator=gen)
        out[name] = t.float().contiguous()
    return out


def save_random_checkpoint(out_dir: str, tokenizer_dir: str | None, seed: int = 0, num_crops: int = 4,
                           n_shards: int = 2, **overrides) -> str:
    """Write a seeded random checkpoint in the official layout to ``out_dir`` and return ``out_dir``.

    ``overrides`` go to :func:`tiny_config_dict`. With a ``tokenizer_dir`` its files are copied and the vocab is sized
    from it (unless vocab_size is overridden); ``num_crops`` goes to preprocessor_config.json.
    """
    from .configuration_phi3v import Phi3VConfig
    from .modeling_phi3v import write_sharded_safetensors

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = tokenizer_vocab_size(tokenizer_dir)
    cfg_dict = tiny_config_dict(**overrides)
    if tokenizer_dir is not None and "pad_token_id" not in overrides and cfg_dict["pad_token_id"] >= cfg_dict["vocab_size"]:
        cfg_dict["pad_token_id"] = tokenizer_pad_id(tokenizer_dir)  # a small custom tokenizer has no id 32000
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    config = Phi3VConfig(**copy.deepcopy(cfg_dict))
    state = random_state_dict(config, seed=seed)
    write_sharded_safetensors(state, out_dir, max_bytes=0, n_shards=n_shards)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000,
                   "transformers_version": "4.38.1"}, f, indent=2)
    vision = cfg_dict["img_processor"]
    grid = vision["image_size"] // vision["patch_size"]
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_processor_type": "Phi3VImageProcessor",
                   "image_std": CLIP_STD, "num_crops": num_crops, "num_img_tokens": (grid // 2) ** 2,
                   "processor_class": "Phi3VProcessor", "crop_size": vision["image_size"],
                   "patch_size": vision["patch_size"]}, f, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir
