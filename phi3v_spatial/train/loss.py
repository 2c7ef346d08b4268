"""The loss of one share of a micro-batch, normalised by the whole micro-batch.

A micro-batch may be computed in shares: one per process when data-parallel (``train.distributed``), and, within
a process, groups of samples of similar length (``TrainConfig.length_groups``), each padded only to its own
longest sample instead of the micro-batch's. The whole micro-batch's loss is its mean over answer tokens plus each
geometry head's mean squared error over that head's rows; a share weighs its own means by its part of those counts,
so the shares' gradients sum to the whole micro-batch's gradient, to float rounding.
"""
from __future__ import annotations

from .collator import GEOMETRY_KEYS

HEAD_NAMES = tuple(key[len("geometry_"):] for _, key in GEOMETRY_KEYS)
COUNT_KEYS = ("tokens",) + HEAD_NAMES


def share_counts(batch: dict, targets: dict) -> dict[str, int]:
    """Answer tokens (as the loss counts them: shifted labels) and geometry rows per head of one share."""
    labels = batch["labels"]
    counts = {"tokens": int((labels[:, 1:] >= 0).sum())}   # as the model counts them: -100 and image slots are < 0
    for h in HEAD_NAMES:
        index = targets.get(f"geometry_{h}_index")
        counts[h] = len(index) if index is not None else 0
    return counts


def share_loss(out, counts: dict[str, int], whole: dict[str, int], heads, targets: dict, geometry_weight: float,
               grad_accum: int):
    """(loss to backpropagate or None, its answer-token part, {head: its part of that head's mean squared error})
    of one share with ``counts`` of a micro-batch with ``whole``: summed over the shares, each is the whole
    micro-batch's value / ``grad_accum``."""
    n, total = counts["tokens"], whole["tokens"]
    loss = out.loss * (n / total) / grad_accum if n and total else None
    ce = float(loss.detach()) if loss is not None else 0.0
    parts: dict[str, float] = {}
    if heads is not None:
        for h in HEAD_NAMES:
            rows, all_rows = counts[h], whole[h]
            if not all_rows:
                continue
            parts[h] = 0.0
            if not rows:
                continue
            one = {k: targets[k] for k in (f"geometry_{h}_index", f"geometry_{h}_target")}
            mse, _ = heads.loss(out.hidden_states, one)
            term = mse * (rows / all_rows) / grad_accum
            parts[h] = float(term.detach())
            term = geometry_weight * term
            loss = term if loss is None else loss + term
    return loss, ce, parts
