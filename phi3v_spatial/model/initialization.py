"""Initialisation for small Phi3V models trained from scratch (the embedded model's recipe, ``train.embedded``).

Why these exist: the official config's initialisation (std 0.02, right for 3072-wide layers) leaves a 128-wide
model almost linear, and a from-scratch vision tower has to discover colour and position before anything else.
Each helper fixes one of those so that the tiny model learns question x image interactions within a CPU budget.
"""
from __future__ import annotations


def width_aware_init(model, gain: float, embed_std: float, vision: bool = True) -> None:
    """Linear weights ~ N(0, gain^2 / fan_in) (biases stay 0), token embeddings ~ N(0, embed_std^2); the CLIP tower's
    linears too unless ``vision`` is False. Uses the global torch RNG (seeded by the caller)."""
    import math

    import torch

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                if not vision and ".img_processor." in f".{name}.":
                    continue
                mod.weight.normal_(0.0, gain / math.sqrt(mod.weight.shape[1]))
        emb = model.model.embed_tokens
        emb.weight.normal_(0.0, embed_std)
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()


def quadrant_colour_filters(patch: int):
    """12 patch-embedding filters: mean R, G, B of each patch quadrant. With them a from-scratch tower
    sees colours (which name the objects) and their sub-patch location at step 0; the other filters
    stay randomly initialised and everything remains trainable."""
    import torch

    half = patch // 2
    w = torch.zeros(12, 3, patch, patch)
    k = 0
    for qy in range(2):
        for qx in range(2):
            ys = slice(qy * half, patch if qy else half)
            xs = slice(qx * half, patch if qx else half)
            n = (ys.stop - ys.start) * (xs.stop - xs.start)
            for c in range(3):
                w[k, c, ys, xs] = 1.0 / n
                k += 1
    return w


def sincos_2d(num_patches: int, dim: int):
    """CLS row (zeros) + 2D sine-cosine position embeddings (MAE-style): x and y are linearly readable
    from the patch features from the first step, which a tiny ViT trained from scratch on a few
    thousand images would otherwise have to discover."""
    import math

    import torch

    side = int(round(math.sqrt(num_patches)))
    if side * side != num_patches or dim % 4:
        raise ValueError(f"need a square patch grid and dim % 4 == 0, got {num_patches} patches, dim {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()
