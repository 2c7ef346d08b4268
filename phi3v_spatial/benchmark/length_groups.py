"""What length groups save in adapter training (``TrainConfig.length_groups``, the embedded recipe's
``lora_length_groups``): micro-batches of the recipe's last adapter phase, forward + backward with the geometry
loss on the embedded model and its adapter, as one padded batch and as 2 and 4 groups of similar length, timed
alternately in one process. Prints the share of padded positions, each way's median time per micro-batch, and how
far each way's gradient is from the padded batch's (it should be float rounding).

    python -m phi3v_spatial.benchmark.length_groups [--data RECORDS.jsonl] [--batches 20] [--threads 2]

Without --data it renders a small synthetic set of the adapter's record kinds first (about a minute).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def phase_sources(records_path: str) -> list:
    """(items, weight, name) of the embedded recipe's last adapter phase, from one records file."""
    from ..data.records import read_jsonl
    from ..train.embedded import Recipe, record_sets

    root = os.path.dirname(os.path.abspath(records_path))
    sets = record_sets(list(read_jsonl(records_path)))
    phase = Recipe().adapter_phases[-1]
    return [([(x, root) for x in sets[name]], w, name) for name, w in phase.data if sets.get(name)]


def main(argv=None) -> int:
    import torch

    from ..data.mixture import ResumableMixture
    from ..paths import default_adapter_dir, default_model_dir
    from ..train.collator import SpatialCollator
    from ..train.embedded import TRAIN_COUNTS, Recipe, adapter_config
    from ..train.trainer import _geometry_setup, _to_device, backward_micro_batch, continue_lora, load_base

    p = argparse.ArgumentParser(prog="python -m phi3v_spatial.benchmark.length_groups")
    p.add_argument("--data", help="a records.jsonl of synthetic training data (default: render 40 scenes)")
    p.add_argument("--batches", type=int, default=20, help="micro-batches timed per way (default 20)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the recipe's stage e uses 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = Recipe()
    tmp = None
    data = args.data
    if data is None:
        from ..data.synth import generate_dataset
        from ..train.embedded import EVAL_TYPES

        tmp = tempfile.TemporaryDirectory(prefix="phi3v-length-groups-")
        data = generate_dataset(tmp.name, 40, seed=7, frames=r.frames, cameras=r.cameras, size=tuple(r.image_size),
                                kinds=list(dict.fromkeys(tuple(r.base_types) + EVAL_TYPES)), counts=TRAIN_COUNTS)
    cfg = adapter_config(r, default_model_dir())
    cfg.init_adapter = default_adapter_dir()
    device = torch.device("cpu")
    model, processor = load_base(cfg, device, torch.float32)
    model = continue_lora(model, cfg.init_adapter)
    model.train()
    heads, geometry = _geometry_setup(cfg, model, device)
    sources = phase_sources(data)
    items = [s[0] for s in sources]
    sampler = ResumableMixture([len(i) for i in items], [s[1] for s in sources], seed=0)
    collator = SpatialCollator(processor, turns=r.lora_turns, items=[it for i in items for it in i], geometry=geometry)
    draws = [[items[d][i] for d, i in (sampler.next() for _ in range(r.lora_batch))] for _ in range(args.batches + 2)]

    params = [q for q in model.parameters() if q.requires_grad] + list(heads.parameters())

    def step(batch_items, groups: int):
        """Forward + backward of one micro-batch in ``groups`` groups; returns the gradient, flattened."""
        shares = [_to_device(b, device, torch.float32, False) for b in collator.batches(batch_items, groups)]
        backward_micro_batch(model, heads, shares, cfg.geometry_weight, 1)
        grad = torch.cat([q.grad.flatten() if q.grad is not None else q.new_zeros(q.numel()) for q in params])
        model.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
        return grad

    ways = (1, 2, 4)
    times = {g: [] for g in ways}
    gaps = {}
    for k, batch_items in enumerate(draws):
        grads = {}
        for g in ways:   # alternately, so drift in the machine's speed reaches every way alike
            t0 = time.perf_counter()
            grads[g] = step(batch_items, g)
            if k >= 2:   # the first two are warm-up
                times[g].append(time.perf_counter() - t0)
        for g in ways[1:]:
            gap = float((grads[g] - grads[1]).norm() / grads[1].norm().clamp_min(1e-30))
            gaps[g] = max(gaps.get(g, 0.0), gap)
    real = padded = 0
    for batch_items in draws:
        lengths = [len(s.input_ids) for s in (collator.encode(*it) for it in batch_items)]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    print(f"phase {r.adapter_phases[-1].name!r}: {args.batches} micro-batches of {r.lora_batch} x {r.lora_turns} "
          f"turns, {args.threads} threads; {100 * (1 - real / padded):.0f}% of one padded batch's positions are padding")
    base = statistics.median(times[1])
    for g in ways:
        m = statistics.median(times[g])
        gap = f", gradient off one padded batch's by {gaps[g]:.1e} (relative)" if g in gaps else ""
        print(f"  {g} group{'s' if g > 1 else ' '}: {m:.3f} s per micro-batch (forward + backward)  x{base / m:.2f}{gap}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
