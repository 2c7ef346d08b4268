"""Measure the engine against the naive path, side by side in one process, and print the ratios.

Rows: first query on a new window, follow-up query and follow-up question on the same window, an N-candidate
relation query (against N separate generations), vision-tower time per frame (real crops vs every slot), node
overhead per frame (serialized message -> model input) and peak memory; then the speed targets, met or not.

--model: a checkpoint folder or hub id; "embedded" (default) is the embedded model with its spatial adapter;
"full-vision" builds a random official-layout checkpoint with the full-size CLIP ViT-L/14-336 tower and a small
language model (slow on a CPU: use --repeat 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="embedded | full-vision | checkpoint folder | hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="LoRA adapter to activate (repeatable, the last one is active); default: the embedded "
                        "model's own adapter for --model embedded")
    p.add_argument("--no-adapter", action="store_true", help="benchmark the base model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--num-crops", type=int, default=None, help="crops per frame for the queries (default: checkpoint)")
    p.add_argument("--vision-crops", type=int, default=16, help="crops for the vision-tower row (default 16)")
    p.add_argument("--frames", type=int, default=1, help="frames per window (default 1)")
    p.add_argument("--size", default="640x480", help="frame size WxH (default 640x480)")
    p.add_argument("--candidates", type=int, default=8, help="relations in the multi-relation query (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, median reported (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap for generated answers")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def full_vision_checkpoint(out_dir: str) -> str:
    """Random official-layout checkpoint: CLIP ViT-L/14 @ 336 px (the released tower) + a small language model."""
    from ..model.tiny import save_random_checkpoint
    from ..paths import default_model_dir

    return save_random_checkpoint(out_dir, default_model_dir(), seed=0, num_crops=4, n_shards=2, hidden_size=512,
                                  intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=8, crop_size=336, patch_size=14, vision_hidden_size=1024,
                                  vision_layers=24, vision_heads=16, vision_intermediate_size=4096, layer_idx=-2)


def run(args: argparse.Namespace) -> int:
    from ..engine.engine import EngineError
    from ..settings import ModelSettings, cli_overrides
    from ..benchmark.engine_bench import BenchConfig, format_result
    from ..benchmark.engine_bench import run as run_bench

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size must look like 640x480, got {args.size!r}", file=sys.stderr)
        return 2
    if min(args.repeat, args.frames, args.candidates, args.vision_crops) < 1:
        print("error: --repeat, --frames, --candidates and --vision-crops must be >= 1", file=sys.stderr)
        return 2
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    tmp = None
    model = args.model
    if model == "full-vision":
        tmp = tempfile.TemporaryDirectory(prefix="phi3v-bench-")
        print("building a random checkpoint with the full-size CLIP tower ...", file=sys.stderr)
        model = full_vision_checkpoint(os.path.join(tmp.name, "ckpt"))
    elif model == "embedded":
        model = ""
    m = ModelSettings.from_params(cli_overrides(model, args.adapter, args.no_adapter))
    model, adapters, active = m.model_path, m.adapters, m.active_adapter
    cfg = BenchConfig(model=model, adapters=adapters, active_adapter=active, device=args.device, dtype=args.dtype,
                      num_crops=args.num_crops, vision_crops=args.vision_crops, frames=args.frames, size=(w, h),
                      candidates=args.candidates, repeat=args.repeat, max_new_tokens=args.max_new_tokens)
    try:
        result = run_bench(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    return 0
