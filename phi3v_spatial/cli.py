"""``phi3v-spatial``: the command-line entry point.

Each subcommand is a module of ``phi3v_spatial.commands`` exposing ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import torch/ROS lazily inside ``run`` so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "ask": ("phi3v_spatial.commands.ask", "answer a spatial question about image files"),
    "synth": ("phi3v_spatial.commands.synth", "generate synthetic spatial scenes, questions (and bags)"),
    "train": ("phi3v_spatial.commands.train", "train a LoRA adapter (or a small base model)"),
    "eval": ("phi3v_spatial.commands.evaluate", "evaluate a model/adapter on spatial questions"),
    "build-embedded": ("phi3v_spatial.commands.build_embedded", "rebuild the embedded demo model in models/"),
    "replay": ("phi3v_spatial.commands.replay", "answer questions offline over a rosbag2 bag"),
    "bench": ("phi3v_spatial.commands.bench", "measure the engine's reuse against the naive path"),
    "soak": ("phi3v_spatial.commands.soak", "load-test a spatial_node: cameras, mixed clients, lifecycle, a table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3v-spatial",
        description="Spatial reasoning with Phi-3-vision: ask, synth, train, eval, replay, bench.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("phi3v_spatial"):
                continue  # subcommand not available in this build
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
