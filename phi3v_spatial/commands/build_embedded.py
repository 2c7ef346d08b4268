"""Rebuild the embedded demo model in models/ from scratch (synthetic data, tokenizer, pretraining,
spatial LoRA adapter, held-out evaluation) — one reproducible command, CPU only.

Writes models/phi3v-spatial-tiny/ (base, official layout), models/phi3v-spatial-tiny-lora-spatial/
(PEFT adapter), models/EVAL.md and models/eval_report.json. Intermediate files go to --work.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="models", help="models folder to write (default: models)")
    p.add_argument("--work", default="runs/embedded", help="folder for data, checkpoints and logs (default: runs/embedded)")
    p.add_argument("--stages", default="abcdef",
                   help="stages to run: a data, b tokenizer, c init, d pretrain, e adapter, f eval+publish (default: all)")
    p.add_argument("--recipe", default=None, help="JSON file overriding recipe fields (default: the committed recipe)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override single recipe fields (JSON values)")


def run(args) -> int:
    import json
    import os
    from dataclasses import fields

    from ..train.embedded import Recipe, build  # does not import torch yet (OMP_WAIT_POLICY below must come first)

    overrides = {}
    if args.recipe:
        with open(args.recipe) as f:
            overrides.update(json.load(f))
    for kv in args.set:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        print(f"unknown recipe field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return 2
    recipe = Recipe(**overrides)
    # OpenMP's wait policy is fixed when torch is first imported. With one thread per stage, idle OpenMP workers
    # sleep (PASSIVE): spinning ones slowed every step several-fold on a busy 2-core machine. Stage e's 2 threads
    # need them awake: with PASSIVE a step took 0.30 s against 0.20 s (2 cores, nothing else running).
    if max(recipe.threads, recipe.lora_threads or 0) == 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    summary = build(args.out, args.work, recipe, stages=args.stages)
    print(json.dumps(summary["times_s"]))
    return 0
