"""Optional 8-bit / 4-bit language-model weights through bitsandbytes (CUDA only, never required).

Only the decoder layers' linear projections are quantised; the CLIP tower, the image projector, the embeddings
and ``lm_head`` keep the model dtype (as transformers' bitsandbytes integration does for ``lm_head``), so image
features and the yes/no logits are computed at full precision. PEFT LoRA layers wrap bitsandbytes linears, so
adapters load on top of a quantised model.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

QUANTIZATION_CHOICES = ("none", "8bit", "4bit")


class QuantizationError(RuntimeError):
    """The requested quantisation cannot be used here; the message says what is missing."""


def check_quantization(mode: str | None, device: torch.device | str) -> str:
    """Normalise ``mode`` and check that it can run on ``device`` (raises QuantizationError naming the fix)."""
    mode = (mode or "none").strip().lower()
    if mode not in QUANTIZATION_CHOICES:
        raise QuantizationError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZATION_CHOICES)}")
    if mode == "none":
        return mode
    if torch.device(device).type != "cuda":
        raise QuantizationError(f"quantization={mode!r} needs a CUDA device (bitsandbytes kernels); "
                                f"this model runs on {device}: use quantization 'none'")
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # not installed, or a build without CUDA support
        raise QuantizationError(f"quantization={mode!r} needs the bitsandbytes package with CUDA support "
                                f"(pip install bitsandbytes): {err}") from err
    return mode


def quantize_decoder_linears(model: nn.Module, mode: str, compute_dtype: torch.dtype, bnb=None) -> int:
    """Replace every nn.Linear inside ``model.model.layers`` by its bitsandbytes counterpart; returns how many.

    The quantised weights are created on the CUDA device the layer lives on (bitsandbytes quantises on upload).
    ``bnb`` is the bitsandbytes module (imported when None).
    """
    if mode == "none":
        return 0
    if bnb is None:
        bnb = importlib.import_module("bitsandbytes")
    replaced = 0
    for parent in model.model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            device = child.weight.device
            weight = child.weight.detach().to("cpu", torch.float16 if mode == "8bit" else compute_dtype)
            if mode == "8bit":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().to("cpu", compute_dtype), requires_grad=False)
            setattr(parent, name, q.to(device))
            replaced += 1
    return replaced
