"""Vision-language colour alignment: a short, dense pretraining of the vision tower + projector.

Why: a Phi3V model trained from scratch sees each object as a few of its image tokens, mostly background.
Before the language model can learn *question-conditioned* reading ("is the red cube left of ...") it has to
find the image tokens that match a word of the question. This stage makes that match cheap to learn: every
image token is trained to be recognisable as the colour word of the object it shows, by scoring the token's
(RMS-normalised) projected feature against the language model's own (normalised) embeddings of the colour
words, with the per-token colour shares as soft targets (plus a "background" class). The labels come from the
pixels alone (chromaticity close to a palette colour and saturated), so any rendered image can be used.
Optionally (``position_weight``) each token must also keep its place in the image linearly readable, so that a
question about *where* a named object is can be answered from the tokens an attention head finds by colour, and
(``shape_weight``) each object token must also score as its object's shape word: the pixels give the colour, the
synthetic scene's ground truth (``scenes.jsonl``, colours are distinct within a scene) gives the colour's shape.
Without it the tower names colours and guesses shapes (open answers and referring plans named the wrong shape).
Only ``model.vision_embed_tokens`` is updated; the token embeddings are read, not trained.

Both objectives are blind to the tokens' scale, which drifts (to ~5x the word embeddings' RMS in our runs). So the
stage ends by rescaling the projector's last layer until image tokens have the word embeddings' RMS: a token
5x larger than the updates attention and MLPs add to it passes the language model's residual stream almost
unchanged (every layer's pre-norm divides the update away), and the model cannot compute on the image. Measured
(runs on one CPU thread, "Is the red cube left of the purple sphere?", 2-4 objects): a fresh 4x128 LM reading the
frozen tokens stays at chance for 1250 steps with the drifted ones and reaches 70% in 2000 with RMS-matched ones;
full fine-tuning of a presence-pretrained model sits at 54% after 1500 steps, and at 63% after 800 / 86% after
2000 once its tokens are rescaled.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np


def colour_word_ids(tokenizer, colours: Sequence[str]) -> list[int]:
    """Id of the token for `` <colour>`` as it appears inside a question (the last piece of its encoding)."""
    return [int(tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1]) for c in colours]


def cell_colour_shares(rgb, palette, cells: int, max_dist: float = 0.02, min_sat: float = 0.25):
    """(N, 3, S, S) RGB in [0, 1] -> (N, cells*cells, C + 1): share of each cell's pixels whose chromaticity
    is within ``max_dist`` of palette colour c (and saturated), last column = the rest (background)."""
    import torch

    n, _, size, _ = rgb.shape
    pal = torch.as_tensor(palette, dtype=rgb.dtype)
    pal = pal / pal.sum(1, keepdim=True)
    chrom = rgb / rgb.sum(1, keepdim=True).clamp_min(1e-3)
    d = ((chrom[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)          # N, C, S, S
    sat = rgb.amax(1) - rgb.amin(1)
    best = d.argmin(1)
    ok = (d.amin(1) < max_dist) & (sat > min_sat)
    lab = torch.where(ok, best, torch.full_like(best, len(palette)))
    onehot = torch.nn.functional.one_hot(lab, len(palette) + 1).to(rgb.dtype)  # N, S, S, C+1
    c = size // cells
    onehot = onehot[:, : cells * c, : cells * c]
    return onehot.reshape(n, cells, c, cells, c, -1).mean((2, 4)).reshape(n, cells * cells, -1)


def colour_shapes(image_paths: Sequence[str]) -> list[dict | None]:
    """Per image: {colour: shape} of its scene (``SceneGeometry.scene_of_image``: the ``scenes.jsonl`` of the
    dataset folder above its ``images/`` folder); None where unknown."""
    from .geometry import SceneGeometry

    geometry = SceneGeometry()
    scenes = (geometry.scene_of_image(p) for p in image_paths)
    return [None if s is None else {o["colour"]: o["shape"] for o in s["objects"]} for s in scenes]


def shape_matrix(colour_shape: dict, palette: Sequence[str]):
    """(C + 1, S + 1) map from a token's colour shares to its shape shares: a colour of the scene goes to its shape;
    any other colour (shading noise) and the background (last row) to the last column."""
    import torch

    from ..data.scene import SHAPES

    m = torch.zeros(len(palette) + 1, len(SHAPES) + 1)
    m[:, -1] = 1.0
    for c, colour in enumerate(palette):
        if colour_shape.get(colour) in SHAPES:
            m[c, -1] = 0.0
            m[c, SHAPES.index(colour_shape[colour])] = 1.0
    return m


def token_targets(model, processor, pixel_values, image_sizes, palette) -> tuple:
    """Per-image (feature rows, colour targets, token centres) for the sub-image and global tokens (separators
    excluded); a token's centre is its (x, y) in the image, each in [0, 1].

    Layout (``Phi3VImageEmbedding``): sub grid of (h_c*g) rows x (w_c*g + 1) columns (last = separator),
    then glb_GN, then the global crop's g rows x (g + 1) columns."""
    import torch

    ve = model.model.vision_embed_tokens
    g = ve.grid // 2
    proc = processor.image_processor
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    rows, targets, centres = [], [], []
    for i, (h, w) in enumerate(torch.as_tensor(image_sizes).reshape(-1, 2).tolist()):
        h_c, w_c = h // ve.crop, w // ve.crop
        crops = (pixel_values[i, : 1 + h_c * w_c].float() * std + mean).clamp(0, 1)
        shares = cell_colour_shares(crops, palette, g)                           # 1 + h_c*w_c, g*g, C+1
        sub = shares[1:].reshape(h_c, w_c, g, g, -1).permute(0, 2, 1, 3, 4).reshape(h_c * g, w_c * g, -1)
        sub_idx = [r * (w_c * g + 1) + c for r in range(h_c * g) for c in range(w_c * g)]
        n_sub = h_c * g * (w_c * g + 1)
        glb_idx = [n_sub + 1 + r * (g + 1) + c for r in range(g) for c in range(g)]
        rows.append(sub_idx + glb_idx)
        targets.append(torch.cat([sub.reshape(-1, sub.shape[-1]), shares[0]], 0))
        sub_xy = [((c + 0.5) / (w_c * g), (r + 0.5) / (h_c * g)) for r in range(h_c * g) for c in range(w_c * g)]
        glb_xy = [((c + 0.5) / g, (r + 0.5) / g) for r in range(g) for c in range(g)]
        centres.append(torch.tensor(sub_xy + glb_xy))
    return rows, targets, centres


def align_vision(model, processor, image_paths: Sequence[str], steps: int, batch_size: int = 32, lr: float = 2e-3,
                 seed: int = 0, object_weight: float = 10.0, log_every: int = 25, palette: dict | None = None,
                 position_weight: float = 0.0, match_text_scale: bool = True, shape_weight: float = 0.0) -> dict:
    """Train ``model.vision_embed_tokens`` so image tokens score as their colour word (see module doc).

    ``position_weight`` > 0 adds a second objective: a linear read-out (trained alongside, then discarded) must
    recover each token's (x, y) place in the image from its projected feature (mean squared error). Without it
    the colour objective is free to wash the tower's position embeddings out of the projected tokens (a linear
    probe then finds a token's column in 4 only ~59% of the time), and the language model cannot read *where*
    the object a question names is: the value an attention head copies from an image token carries no place.

    ``shape_weight`` > 0 adds a third: each token scores as the shape word of the object(s) it shows (soft
    targets: the token's colour shares mapped through its scene's colour -> shape), against the language model's
    embeddings of the shape words; images without ground truth add nothing to it.

    ``match_text_scale`` (default): rescale the projector's output to the word embeddings' RMS (module doc)."""
    import torch

    from ..data.scene import PALETTE, SHAPES

    palette = dict(palette or PALETTE)
    cols = np.asarray(list(palette.values()), dtype=np.float32) / 255.0
    word_ids = torch.tensor(colour_word_ids(processor.tokenizer, list(palette)))
    ve = model.model.vision_embed_tokens
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in ve.parameters()]
    for p in params:
        p.requires_grad_(True)
    scale = torch.nn.Parameter(torch.tensor(4.0))
    # created only when used: building it draws from the global torch RNG, and the default path stays as it was
    readout = torch.nn.Linear(model.config.hidden_size, 2) if position_weight > 0 else None
    extra = [scale] + (list(readout.parameters()) if readout is not None else [])
    # per image, its colour -> shape map as a matrix (None: no ground truth), built once
    shape_mats = ([None if m is None else shape_matrix(m, list(palette)) for m in colour_shapes(image_paths)]
                  if shape_weight > 0 else None)
    if shape_mats is not None:
        shape_scale = torch.nn.Parameter(torch.tensor(4.0))
        extra.append(shape_scale)
        shape_emb = model.model.embed_tokens.weight.detach()[torch.tensor(colour_word_ids(processor.tokenizer, SHAPES))]
        shape_emb = shape_emb / shape_emb.pow(2).mean(-1, keepdim=True).sqrt()
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}, {"params": extra, "weight_decay": 0.0}], lr=lr)
    emb = model.model.embed_tokens.weight.detach()[word_ids]
    emb = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    rng = np.random.default_rng([seed, 0xA1])
    model.train()
    t0, losses, shape_accs = time.time(), [], []

    def batch(idx):
        feats = processor.image_processor(load_rgb([image_paths[int(i)] for i in idx]))
        pv, sizes = feats["pixel_values"], feats["image_sizes"]
        out = ve.image_features(pv.to(next(ve.parameters()).dtype), sizes)
        rows, targets, centres = token_targets(model, processor, pv, sizes, cols)
        f = torch.cat([o[r] for o, r in zip(out, rows)], 0)
        y = torch.cat(targets, 0)
        fn = f / f.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        logits = fn @ emb.T * (scale / fn.shape[-1] ** 0.5)
        logits = torch.cat([logits, torch.zeros(len(f), 1)], -1)
        nll = -(y * torch.log_softmax(logits, -1)).sum(-1)
        wgt = 1.0 + object_weight * (1.0 - y[:, -1])
        obj = y[:, -1] < 0.5
        acc = float((logits.argmax(-1) == y.argmax(-1))[obj].float().mean()) if bool(obj.any()) else float("nan")
        loss = (nll * wgt).sum() / wgt.sum()
        if readout is not None:
            xy = torch.cat(centres, 0).to(f.dtype)
            loss = loss + position_weight * (readout(fn) - xy).pow(2).mean() * 12.0  # 12: a uniform coordinate's variance is 1/12
        if shape_mats is not None:
            mats = [shape_mats[int(i)] for i in idx]
            known = torch.cat([torch.full((len(y),), m is not None) for y, m in zip(targets, mats)])
            if bool(known.any()):
                ys = torch.cat([y @ m for y, m in zip(targets, mats) if m is not None])
                fk, wk = fn[known], wgt[known]
                sl = torch.cat([fk @ shape_emb.T * (shape_scale / fk.shape[-1] ** 0.5), torch.zeros(len(fk), 1)], -1)
                snll = -(ys * torch.log_softmax(sl, -1)).sum(-1)
                loss = loss + shape_weight * (snll * wk).sum() / wk.sum()
                sobj = ys[:, -1] < 0.5          # tokens mostly covered by an object, as for the colour accuracy
                shape_accs.append(float((sl.argmax(-1) == ys.argmax(-1))[sobj].float().mean())
                                  if bool(sobj.any()) else float("nan"))
        return loss, acc

    for step in range(1, steps + 1):
        loss, acc = batch(rng.integers(0, len(image_paths), batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            shape = f" shape acc {np.nanmean(shape_accs[-log_every:] + [np.nan]):.2f}" if shape_accs else ""
            print(f"[align] step {step}/{steps} loss {np.mean(losses[-log_every:]):.4f} object-token acc {acc:.2f}"
                  f"{shape} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    scales = {}
    if match_text_scale:
        scales = match_token_scale(model, processor, [image_paths[int(i)] for i in rng.integers(0, len(image_paths), batch_size)])
    for p in model.parameters():
        p.requires_grad_(True)
    # mean over the last steps' batches (NaN when none had a token mostly covered by an object)
    shape_acc = {"shape_acc": float(np.nanmean(shape_accs[-(log_every or 25):] + [np.nan]))} if shape_accs else {}
    return {"steps": steps, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "seconds": round(time.time() - t0, 1), **shape_acc, **scales}


def load_rgb(paths: Sequence[str]) -> list:
    """The images at ``paths`` as RGB PIL images (files closed)."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def image_token_rms(model, processor, image_paths: Sequence[str]) -> float:
    """Mean RMS of the projected image tokens of these images (what the language model receives)."""
    import torch

    feats = processor.image_processor(load_rgb(image_paths))
    ve = model.model.vision_embed_tokens
    with torch.no_grad():
        out = torch.cat(ve.image_features(feats["pixel_values"].to(next(ve.parameters()).dtype), feats["image_sizes"]))
    return float(out.float().pow(2).mean(-1).sqrt().mean())


def word_embedding_rms(model) -> float:
    import torch

    with torch.no_grad():
        return float(model.model.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean())


def match_token_scale(model, processor, image_paths: Sequence[str]) -> dict:
    """Scale the projector's last linear layer so image tokens have the word embeddings' mean RMS (module doc)."""
    import torch

    before = image_token_rms(model, processor, image_paths)
    target = word_embedding_rms(model)
    last = model.model.vision_embed_tokens.img_projection[-1]
    with torch.no_grad():
        last.weight.mul_(target / before)
        last.bias.mul_(target / before)
    return {"token_rms_before": before, "token_rms_after": image_token_rms(model, processor, image_paths),
            "word_embedding_rms": target}
