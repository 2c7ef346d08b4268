"""Answer a spatial question about one or more image files (frames in the order given).

Example: phi3v-spatial ask --image scene.png "Is the red cube left of the blue sphere?"
Without --model it runs the embedded demo model and its spatial adapter.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question (or, with --plan, the instruction)")
    p.add_argument("--model", default="", help="checkpoint folder or hub id (default: the embedded model in models/)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="LoRA adapter folder to load and activate (repeatable; the last one is active)")
    p.add_argument("--no-adapter", action="store_true", help="run the base model without the embedded adapter")
    p.add_argument("--image", action="append", required=True, metavar="PATH", help="image file (repeatable)")
    p.add_argument("--num-crops", type=int, default=None, help="HD crops per image (upper bound; default from the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--attn", default="auto", help="auto | eager | sdpa | flash_attention_2")
    p.add_argument("--quantization", default="none", help="none | 8bit | 4bit (bitsandbytes, CUDA only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="treat the text as an instruction and print a JSON plan")
    mode.add_argument("--relation", nargs=3, metavar=("SUBJECT", "RELATION", "OBJECT"), action="append",
                      help="score a candidate relation instead of generating (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text while it is generated")


def adapter_names(dirs: list[str]) -> dict[str, str]:
    """``--adapter DIR`` folders named after their folder (made unique: two folders may share a basename)."""
    out: dict[str, str] = {}
    for i, d in enumerate(dirs):
        base = os.path.basename(os.path.normpath(d)) or f"adapter{i}"
        name, n = base, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out[name] = d
    return out


def _load_rgb(path: str):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"error: cannot read image {path!r} (missing file or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def run(args: argparse.Namespace) -> int:
    import json

    from ...settings import node_defaults, resolve_model_and_adapters
    from ..engine import EngineError, SpatialEngine
    from ..parsing import Relation

    adapters = adapter_names(args.adapter)
    active = list(adapters)[-1] if adapters else ""
    if not args.adapter:  # the node's defaults: the embedded adapter, for the embedded model only
        defaults = node_defaults()
        adapters = dict(entry.split("=", 1) for entry in defaults["adapters"])
        active = defaults["active_adapter"]
    model, adapters, active = resolve_model_and_adapters(args.model, adapters, active)
    if args.no_adapter:
        adapters, active = {}, ""
    images = [_load_rgb(p) for p in args.image]
    try:
        engine = SpatialEngine.from_pretrained(model, adapters=adapters, active_adapter=active or None,
                                               device=args.device, dtype=args.dtype, attn_implementation=args.attn,
                                               num_crops=args.num_crops, quantization=args.quantization)
        stream = (lambda text, n: print(f"\r{text}", end="", file=sys.stderr, flush=True)) if args.stream else None
        if args.relation:
            for r in engine.query_relations([Relation(*t) for t in args.relation], images):
                print(f"{r.subject} | {r.relation} | {r.object}: p(yes)={r.probability:.3f} -> {'holds' if r.holds else 'does not hold'}")
        elif args.plan:
            res = engine.plan(args.question, images, max_new_tokens=args.max_new_tokens, on_text=stream)
            if stream:
                print(file=sys.stderr)
            if res.error:
                print(f"error: {res.error}", file=sys.stderr)
                return 1
            print(json.dumps(res.steps, indent=2))
        else:
            res = engine.ask(args.question, images, max_new_tokens=args.max_new_tokens, on_text=stream)
            if stream:
                print(file=sys.stderr)
            print(res.answer)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
