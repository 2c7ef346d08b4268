"""Evaluate a model (optionally with a LoRA adapter) on spatial records.

yes/no questions are scored from the next-token probabilities of "yes" vs "no", choice questions
from the likelihood of each choice, open / quantitative / plan questions by greedy generation; plans are executed
on the synthetic scene's ground truth (``data.executor``). Prints a table (overall, per type, per VSR meta-category,
per relation, per plan family and multi-frame family, the targets) and writes a JSON report.
With --ray the records are sharded over a pool of Ray actors (train/eval_fleet.py); the report is the same.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (official Phi-3-vision layout)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to apply")
    p.add_argument("--data", required=True, nargs="+", metavar="SPEC",
                   help="dataset specs: synth:DIR, vsr:JSONL:IMGDIR, FILE.jsonl (weights are ignored)")
    p.add_argument("--out", default=None, help="write the JSON report (with per-record predictions) here")
    p.add_argument("--limit", type=int, default=None, help="at most N records per dataset (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-crops", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget for open/quantitative questions")
    p.add_argument("--no-progress", action="store_true")
    from ..raypool import add_ray_arguments

    add_ray_arguments(p, "chunk of record")


def run(args) -> int:
    import json

    from ..train.evaluate import evaluate_records, format_table, load_scorer, select_items, write_report
    from ..train.trainer import load_sources

    items = select_items(load_sources(args.data), args.limit, args.seed)
    scorer_kwargs = dict(model_dir=args.model, adapter_dir=args.adapter, device=args.device, dtype=args.dtype,
                         num_crops=args.num_crops, max_new_tokens=args.max_new_tokens)
    if args.ray is not None:
        from ..raypool import PoolError
        from ..train.eval_fleet import evaluate_on_ray

        try:
            report, preds = evaluate_on_ray(args, items, scorer_kwargs)
        except PoolError as e:
            import sys

            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        report, preds = evaluate_records(load_scorer(**scorer_kwargs), items, progress=not args.no_progress)
    title = f"{args.model}" + (f" + adapter {args.adapter}" if args.adapter else " (no adapter)")
    print(format_table(report, title=title))
    if args.out:
        write_report(args.out, report, preds, model=args.model, adapter=args.adapter, data=list(args.data), limit=args.limit)
        print(f"report written to {args.out}")
    else:
        print(json.dumps(report["overall"]))
    return 0
