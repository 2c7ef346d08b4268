"""Replay of many bags: in this process, and on a private local Ray instance with 1 and with N actors.

    python -m phi3v_spatial.benchmark.fleet_bench [--bags 8] [--scenes 16] [--actors 2]

Writes ``--bags`` synthetic bags (``phi3v-spatial synth --bag``, one questions file each), replays them with
the embedded model through ``phi3v-spatial replay`` in each configuration, and prints the wall time of each
(Ray's start and the actors' model loads included), the speed-up against one actor, and whether every
configuration gave the same answers.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def make_bags(folder: str, n: int, scenes: int) -> str:
    from ..cli import main

    bags = os.path.join(folder, "bags")
    for k in range(n):
        assert main(["synth", "--out", os.path.join(folder, f"data{k}"), "--num", str(scenes), "--seed", str(k + 1),
                     "--bag", os.path.join(bags, f"run{k}.mcap"), "--quiet"]) == 0
    return bags


def replay(bags: str, out: str, extra: list[str]) -> float:
    import contextlib
    import io

    from ..cli import main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        main(["replay", bags, "--questions", "{bag}.questions.yaml", "--out", out, "--no-progress", *extra])
    return time.perf_counter() - t0


def answers(out: str) -> dict:
    keep = ("answer", "raw_text", "frame_stamps", "error")
    return {(x["bag"], x["id"]): ({k: x.get(k) for k in keep},
                                  [round(r["probability"], 5) for r in x.get("relations") or []])
            for x in map(json.loads, open(out, encoding="utf-8"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--bags", type=int, default=8)
    p.add_argument("--scenes", type=int, default=16, help="scenes per bag (3 questions each)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    import ray  # noqa: F401 - imports paid before any timing (the actors pay theirs: part of their cost)

    from ..engine.engine import SpatialEngine  # noqa: F401

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        bags = make_bags(tmp, args.bags, args.scenes)
        rows = []
        for name, extra in (("this process, 1 engine", []),
                            ("ray, 1 actor", ["--ray", "local", "--actors", "1"]),
                            (f"ray, {args.actors} actors", ["--ray", "local", "--actors", str(args.actors)])):
            out = os.path.join(tmp, f"out{len(rows)}.jsonl")
            rows.append({"config": name, "seconds": replay(bags, out, extra), "answers": answers(out)})
    base = rows[1]["seconds"]
    same = all(r["answers"] == rows[0]["answers"] for r in rows)
    load = (load_before, os.getloadavg()[0])
    print(f"{args.bags} bags x {args.scenes * 3} questions, embedded model, {os.cpu_count()} CPUs "
          f"(1-minute load average {load[0]:.1f} before, {load[1]:.1f} after: other work on the machine)")
    print(f"{'configuration':<26}{'wall s':>8}{'vs 1 actor':>12}")
    for r in rows:
        print(f"{r['config']:<26}{r['seconds']:>8.1f}{base / r['seconds']:>11.2f}x")
    print(f"same answers in every configuration: {'yes' if same else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bags": args.bags, "scenes": args.scenes, "cpus": os.cpu_count(), "same_answers": same, "load": load,
                       "rows": [{k: r[k] for k in ("config", "seconds")} for r in rows]}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
