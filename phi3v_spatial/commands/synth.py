"""Generate synthetic spatial scenes with 3D ground truth, their question records and optionally a rosbag2 bag.

Writes OUT/images/*.png, OUT/records.jsonl (training / eval records) and OUT/scenes.jsonl (ground truth).
With --bag OUT.mcap (or OUT.db3 for sqlite3; no suffix = mcap) it also writes the frames as a bag
(/cam0/image_raw rgb8 Image, /cam1/image_raw/compressed jpeg; 5 Hz, one scene per time segment) and
OUT.questions.yaml next to it, in the `phi3v-spatial replay` questions format with expected answers.
"""
from __future__ import annotations

import argparse
import os
import sys


def _objects(text: str) -> tuple[int, int]:
    parts = text.replace(":", "-").split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or hi is None:
        raise argparse.ArgumentTypeError(f"bad --objects {text!r}: expected N or MIN-MAX, e.g. 2-4")
    return lo, hi


def _size(text: str) -> tuple[int, int]:
    from ..data.synth import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (images/, records.jsonl, scenes.jsonl)")
    parser.add_argument("--num", type=int, default=100, help="number of scenes (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical output")
    parser.add_argument("--frames", type=int, default=1, help="frames per scene (default 1; >1 adds motion)")
    parser.add_argument("--cameras", type=int, default=1, choices=(1, 2), help="cameras per scene (default 1)")
    parser.add_argument("--size", type=_size, default=(160, 120), metavar="WxH", help="image size (default 160x120)")
    parser.add_argument("--objects", type=_objects, default=(2, 4), metavar="MIN-MAX", help="objects per scene (default 2-4)")
    parser.add_argument("--motion", default="auto", choices=("auto", "none", "camera", "object"),
                        help="multi-frame motion (auto: alternate object/camera motion when --frames > 1)")
    parser.add_argument("--kinds", default="", help="comma-separated record kinds (default all): "
                        "yesno,choice,open,quantitative,multiframe,plan,describe,count; opt-in: presence, locate, "
                        "refer (which object a plan's referring expression means)")
    parser.add_argument("--bag", default="", metavar="OUT.mcap|OUT.db3",
                        help="also write the frames as a rosbag2 bag plus OUT.questions.yaml for replay")
    parser.add_argument("--heldout-templates", action="store_true",
                        help="half of the plan instructions in the templates training data never uses (for evaluation sets)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering scenes (same output; default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import yaml

    from ..data.bag_writer import CameraBagWriter, bag_location
    from ..data.questions import KINDS, camera_topic, replay_entries
    from ..data.synth import SYNTH_EPOCH_NS, generate_dataset

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] or None
    bad = [k for k in (kinds or []) if k not in KINDS]
    if bad:
        print(f"synth: unknown --kinds {', '.join(bad)}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    if args.num < 1 or args.frames < 1:
        print("synth: --num and --frames must be >= 1", file=sys.stderr)
        return 2
    writer, entries = None, []
    if args.bag:
        bag_dir, storage = bag_location(args.bag)
        if os.path.exists(bag_dir):
            print(f"synth: bag {bag_dir} exists already; choose another --bag path", file=sys.stderr)
            return 2
        os.makedirs(os.path.dirname(os.path.abspath(bag_dir)), exist_ok=True)
        writer = CameraBagWriter(bag_dir, storage).__enter__()

    def on_scene(scene, i):
        for f in range(scene.num_frames):
            for c in range(scene.num_cameras):
                topic, compressed = camera_topic(c)
                writer.write(topic, scene.stamps_ns[f], scene.images[c][f], compressed)
        entries.extend(replay_entries(scene, np.random.default_rng((args.seed, i, 2)), SYNTH_EPOCH_NS))

    try:
        path = generate_dataset(args.out, args.num, args.seed, frames=args.frames, cameras=args.cameras, size=args.size,
                                kinds=kinds, num_objects=args.objects, motion=args.motion,
                                on_scene=on_scene if writer is not None else None, progress=not args.quiet,
                                plan_templates="all" if args.heldout_templates else "train", workers=args.workers)
    except ValueError as e:
        print(f"synth: {e}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)
    print(f"records: {path}")
    if writer is not None:
        qpath = bag_dir + ".questions.yaml"
        with open(qpath, "w", encoding="utf-8") as f:
            yaml.safe_dump(entries, f, sort_keys=False, allow_unicode=True, width=1000)
        print(f"bag: {writer.path} ({writer.storage}, {writer.count} messages)\nquestions: {qpath} ({len(entries)} entries)")
    return 0
