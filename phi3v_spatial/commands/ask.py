"""Answer a spatial question about one or more image files (frames in the order given).

Example: phi3v-spatial ask --image scene.png "Is the red cube left of the blue sphere?"
Without --model it runs the embedded demo model and its spatial adapter. The question goes through the same
request layer as the node's ~/ask (and --plan / --relation as ~/plan / ~/query_relations).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question (or, with --plan, the instruction)")
    p.add_argument("--model", default="", help="checkpoint folder or hub id (default: the embedded model in models/)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="LoRA adapter folder to load and activate (repeatable; the last one is active)")
    p.add_argument("--no-adapter", action="store_true", help="run the base model without the embedded adapter")
    p.add_argument("--image", action="append", required=True, metavar="PATH", help="image file (repeatable)")
    p.add_argument("--num-crops", type=int, default=0, help="HD crops per image (upper bound; default from the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="token limit (default: the node's generation.max_new_tokens, plan.max_new_tokens with --plan)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--attn", default="auto", help="auto | eager | sdpa | flash_attention_2")
    p.add_argument("--quantization", default="none", help="none | 8bit | 4bit (bitsandbytes, CUDA only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="treat the text as an instruction and print a JSON plan")
    mode.add_argument("--relation", nargs=3, metavar=("SUBJECT", "RELATION", "OBJECT"), action="append",
                      help="score a candidate relation instead of generating (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text while it is generated")


def _load_rgb(path: str):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"error: cannot read image {path!r} (missing file or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def run(args: argparse.Namespace) -> int:
    import json

    from ..engine.engine import EngineError
    from ..engine.parsing import Relation
    from ..engine.requests import AskRequest, PlanRequest, RelationsRequest, RequestHandler, RequestImage
    from ..engine.worker import InferenceWorker
    from ..settings import ModelSettings, cli_overrides, node_defaults, serving_settings

    params = {**node_defaults(), **cli_overrides(args.model, args.adapter, args.no_adapter), "device": args.device,
              "dtype": args.dtype, "attn_implementation": args.attn, "quantization": args.quantization,
              "num_crops": args.num_crops}
    images = [RequestImage(_load_rgb(p)) for p in args.image]
    try:
        engine = ModelSettings.from_params(params).load()
    except (EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    worker = InferenceWorker(max_pending=1, name="ask")
    requests = RequestHandler(engine, worker, settings=serving_settings(params, deadline=False))
    stream = (lambda text, n: print(f"\r{text}", end="", file=sys.stderr, flush=True)) if args.stream else None
    try:
        if args.relation:
            reply = requests.handle(RelationsRequest(candidates=[Relation(*t) for t in args.relation], images=images))
        elif args.plan:
            reply = requests.handle(PlanRequest(instruction=args.question, images=images,
                                                max_new_tokens=args.max_new_tokens), on_text=stream)
        else:
            reply = requests.handle(AskRequest(question=args.question, images=images,
                                               max_new_tokens=args.max_new_tokens), on_text=stream)
    finally:
        worker.stop()
    if stream and not args.relation:
        print(file=sys.stderr)
    if not reply.success:
        print(f"error: {reply.error}", file=sys.stderr)
        return 1
    if args.relation:
        for r in reply.relations:
            print(f"{r.subject} | {r.relation} | {r.object}: p(yes)={r.probability:.3f} -> "
                  f"{'holds' if r.holds else 'does not hold'}")
    elif args.plan:
        print(json.dumps(reply.steps, indent=2))
    else:
        print(reply.answer)
    return 0
