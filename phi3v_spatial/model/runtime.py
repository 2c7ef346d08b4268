"""Device / dtype / attention selection ("auto" logic) shared by the model loader and the engine.

Kept free of model code so that callers can resolve settings (and report them) before loading anything.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

ATTN_CHOICES = ("auto", "eager", "sdpa", "flash_attention_2")
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """True when the optional CUDA-only ``flash_attn`` package imports (it is never required)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception:  # broken builds raise all sorts of errors at import time
        return False
    return True


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda:0 when available, else cpu. Explicit devices are validated (cuda without CUDA is an error)."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' -> float32 on CPU; bfloat16 on CUDA when supported, else float16."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[name]


def resolve_attn(attn: str | None = "auto", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """'auto' -> flash_attention_2 on CUDA with fp16/bf16 when flash_attn imports, otherwise sdpa.

    SDPA on CPU matches the eager softmax reference to float32 rounding (see test_model_runtime), so it is the CPU default.
    An explicit flash_attention_2 request that cannot be honoured raises instead of silently changing the numerics.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    choice = (attn or "auto").lower()
    if choice not in ATTN_CHOICES:
        raise ValueError(f"unknown attention implementation {attn!r}; use one of {', '.join(ATTN_CHOICES)}")
    if choice == "auto":
        if dev.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return "flash_attention_2"
        return "sdpa"
    if choice == "flash_attention_2":
        if not flash_attn_available():
            raise ImportError("attn_implementation='flash_attention_2' needs the flash_attn package; use 'auto' or 'sdpa'")
        if dev.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("flash_attention_2 needs a CUDA device and float16/bfloat16 weights")
    return choice
