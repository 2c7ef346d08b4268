"""Answer questions offline over a rosbag2 bag (sqlite3 or mcap), exactly as the live node would.

Frames go through the node's FrameWindow in header-stamp order; each question is answered at its time
with the node's parameters (--params), and the answers are written as JSON lines with a per-type summary.

Example: phi3v-spatial replay run.mcap --questions run.questions.yaml --params config/spatial_node.yaml --out-bag run_answers

Several bags (paths, folders of bags, glob patterns) merge into one JSONL whose lines name their bag; with
--ray they run on a pool of Ray actors that each load the model once (replay/fleet.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", nargs="+", help="rosbag2 folder (with metadata.yaml) or a single .mcap / .db3 file; several "
                                        "bags, folders of bags or glob patterns replay them all into one --out")
    p.add_argument("--questions", required=True, metavar="YAML",
                   help="questions file (format: README, section Offline replay); with several bags it may be a "
                        "per-bag template such as '{bag}.questions.yaml' ({bag}: the bag path without .mcap/.db3)")
    p.add_argument("--out", default="", metavar="JSONL",
                   help="results, one JSON line per question ('-' = stdout; default: QUESTIONS.results.jsonl)")
    p.add_argument("--params", default="", metavar="YAML",
                   help="the node's parameter file (spatial_node: ros__parameters: or /**:) for image_topics, window.*, "
                        "generation/plan.max_new_tokens, model_path, adapters")
    p.add_argument("--topics", nargs="+", default=None, metavar="T",
                   help="camera topics to replay (default: image_topics from --params, else every image topic in the bag)")
    p.add_argument("--model", default="", help="checkpoint folder or hub id (default: model_path, else the embedded model)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="LoRA adapter folder to load and activate (repeatable; the last one is active)")
    p.add_argument("--no-adapter", action="store_true", help="run the base model without any adapter")
    p.add_argument("--max-new-tokens", type=int, default=0, help="override generation.max_new_tokens")
    p.add_argument("--plan-max-new-tokens", type=int, default=0, help="override plan.max_new_tokens")
    p.add_argument("--device", default="", help="override the device parameter (auto | cpu | cuda | cuda:N)")
    p.add_argument("--dtype", default="", help="override the dtype parameter (auto | float32 | bfloat16 | float16)")
    p.add_argument("--out-bag", default="", metavar="DIR",
                   help="write a copy of the bag plus the answers on NODE/relations and NODE/plans (a new folder)")
    p.add_argument("--out-storage", choices=("mcap", "sqlite3"), default=None,
                   help="storage of --out-bag (default: the input's; mcap is what Foxglove opens best)")
    p.add_argument("--node-name", default="/spatial_node", help="node whose output topics --out-bag fills")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from ..raypool import add_ray_arguments

    add_ray_arguments(p, "bag")


def resolve_settings(args: argparse.Namespace):
    """Node parameters from --params, then the CLI's overrides; model/adapters default like the node's."""
    from ..replay.params import ParamsError, ReplaySettings, load_node_params
    from ..settings import cli_overrides, resolve_model_and_adapters

    params = load_node_params(args.params or None)
    for name, value in (("generation.max_new_tokens", args.max_new_tokens), ("plan.max_new_tokens",
                        args.plan_max_new_tokens), ("device", args.device), ("dtype", args.dtype)):
        if value:
            params[name] = value
    try:
        params.update(cli_overrides(args.model, args.adapter, args.no_adapter))
    except ValueError as e:
        raise ParamsError(str(e)) from None
    settings = ReplaySettings.from_params(params, args.params or "defaults")
    settings.model_path, settings.adapters, settings.active_adapter = resolve_model_and_adapters(
        settings.model_path, settings.adapters, settings.active_adapter)
    settings.check()
    return settings


def load_engine(settings):
    """The SpatialEngine the node would build from the same parameters."""
    return settings.model().load()


def write_results(results: list[dict], out: str) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if out == "-":
        sys.stdout.write(lines)
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(lines)


def run(args: argparse.Namespace) -> int:
    from ..engine.engine import EngineError
    from ..replay.bag_reader import BagError
    from ..replay.outbag import write_out_bag
    from ..replay.params import ParamsError, resolve_topic
    from ..replay.question_file import QuestionsError, load_questions
    from ..replay.runner import Replayer
    from ..replay.scoring import format_summary

    from ..replay.fleet import single_bag

    if args.ray is not None or not single_bag(args.bag):
        from ..replay.fleet import run as run_fleet

        return run_fleet(args)
    args.bag = args.bag[0]
    log = sys.stderr if args.out == "-" else sys.stdout
    try:
        questions = load_questions(args.questions)
        settings = resolve_settings(args)
    except (QuestionsError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not os.path.exists(args.bag):
        print(f"error: bag {args.bag!r} does not exist", file=sys.stderr)
        return 1
    try:
        engine = load_engine(settings)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    topics = [resolve_topic(t) for t in args.topics] if args.topics else None
    outcome = Replayer(engine, settings, progress=not args.no_progress).run(args.bag, questions, topics=topics)
    out = args.out or os.path.splitext(args.questions)[0] + ".results.jsonl"
    write_results(outcome.results, out)

    info = outcome.info
    if info is not None:
        print(f"bag {info.path} ({info.storage}): {info.message_count} messages, "
              f"{(info.end_ns - info.start_ns) / 1e9:.2f} s; cameras: {', '.join(outcome.topics) or 'none'}", file=log)
    d = engine.describe()
    print(f"model {d['model_path']} (adapter: {d['active_adapter'] or 'none'}, {d['device']}, {d['dtype']})", file=log)
    print(format_summary(outcome.summary), file=log)
    errors = [r for r in outcome.results if r.get("error")]
    for r in errors[:10]:
        print(f"  {r['id']}: {r['error']}", file=log)
    if len(errors) > 10:
        print(f"  ... {len(errors) - 10} more errors in {out}", file=log)
    if out != "-":
        print(f"results: {out}", file=log)
    if outcome.fatal:
        print(f"error: {outcome.fatal}", file=sys.stderr)
    if args.out_bag and info is not None:
        try:
            rep = write_out_bag(args.bag, args.out_bag, outcome.results, storage=args.out_storage,
                                node=args.node_name.rstrip("/") or "/spatial_node", progress=not args.no_progress)
        except BagError as e:
            print(f"error: --out-bag: {e}", file=sys.stderr)
            return 1
        for topic, why in rep["skipped_topics"].items():
            print(f"warning: --out-bag: topic {topic} not copied: {why}", file=sys.stderr)
        if rep["error"]:
            print(f"warning: --out-bag: {rep['error']}", file=sys.stderr)
        print(f"out-bag: {args.out_bag} ({rep['copied']} messages copied, {rep['answers']} answers added)", file=log)
    return outcome.exit_code
