"""Ask latency while a big relations request holds the worker, with and without cooperative chunking (issue 23).

One engine, one InferenceWorker, the request layer as the node uses it. A client sends a relations request with
``--candidates`` candidates; once it runs, another client sends a short ask every ``--every`` seconds (deadline
``--deadline`` s, as a node client with request_timeout_s would) until the relations request ends. Printed per
mode: the relations request's time, each ask's latency and how many asks met their deadline. ``cooperative=False``
is the old worker (the relations request runs whole, the asks wait behind it); ``cooperative=True`` lets the
waiting asks run between the relation batches.

    python -m phi3v_spatial.benchmark.fairness [--model DIR] [--candidates 2000] [--deadline 5]

Timings are this machine's; nothing here is asserted (tests check the ordering, not the speed).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def _candidates(n: int):
    from ..engine.parsing import Relation

    objects = ["cube", "sphere", "cup", "box", "table", "chair", "lamp", "book"]
    relations = ["left of", "right of", "above", "below", "in front of", "behind"]
    return [Relation(objects[i % 8], relations[i % 6], f"{objects[(i // 8) % 8]} number {i}") for i in range(n)]


def measure(engine, *, cooperative: bool, candidates: int, deadline_s: float, every_s: float, size=(640, 480),
            max_new_tokens: int = 8) -> dict:
    from ..engine import requests as R
    from ..engine.worker import InferenceWorker

    w, h = size
    image = R.RequestImage(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    worker = InferenceWorker(max_pending=8, cooperative=cooperative)
    # max_candidates raised to the request's size (the node's parameter; its default 256 refuses bigger requests)
    long_layer = R.RequestHandler(engine, worker, settings=R.ServingSettings(request_timeout_s=0,
                                                                            max_candidates=max(1, candidates)))
    ask_layer = R.RequestHandler(engine, worker, settings=R.ServingSettings(request_timeout_s=deadline_s,
                                                                           max_new_tokens=max_new_tokens))
    try:
        engine.clear_caches()
        ask_layer.handle(R.AskRequest(question="What is on the table?", images=[image]))  # warm-up, fills the caches
        started = threading.Event()
        t0 = time.monotonic()
        big = long_layer.submit(R.RelationsRequest(candidates=_candidates(candidates), images=[image]),
                                on_start=started.set)
        started.wait()
        asks = []
        while not big.done():
            sent = time.monotonic()
            pending = ask_layer.submit(R.AskRequest(question="What is on the table?", images=[image]))
            asks.append((sent, pending))
            end = time.monotonic() + every_s
            while time.monotonic() < end and not big.done():
                time.sleep(0.01)
        relations = big.result()
        relations_s = time.monotonic() - t0
        replies = [(sent, p.result()) for sent, p in asks]
        lat = [r.latency_s for _, r in replies]
        ok = [r for _, r in replies if r.success]
        return {"cooperative": cooperative, "candidates": candidates, "relations_s": relations_s,
                "relations_ok": relations.success, "asks": len(replies), "asks_ok": len(ok),
                "ask_latency_s": lat, "ask_p50_s": statistics.median(lat) if lat else None,
                "ask_max_s": max(lat) if lat else None, "yields": worker.yields,
                "errors": sorted({r.error for _, r in replies if not r.success})}
    finally:
        worker.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi3v_spatial.benchmark.fairness", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="checkpoint folder (default: the embedded model and its adapter)")
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--deadline", type=float, default=5.0, help="the asks' deadline in seconds (request_timeout_s)")
    p.add_argument("--every", type=float, default=0.5, help="seconds between two asks")
    p.add_argument("--size", default="640x480")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    import torch

    from ..engine.engine import SpatialEngine
    from ..settings import ModelSettings, cli_overrides

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    m = ModelSettings.from_params(cli_overrides(args.model))
    engine = SpatialEngine.from_pretrained(m.model_path, adapters=m.adapters, active_adapter=m.active_adapter,
                                           device="cpu")
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(f"model {m.model_path} (adapter {m.active_adapter or 'none'}), {args.candidates} candidates, image {w}x{h}, "
          f"relation_batch_size {engine.options.relation_batch_size}, an ask every {args.every:g} s with a "
          f"{args.deadline:g} s deadline, torch threads {torch.get_num_threads()}")
    for cooperative in (False, True):
        r = measure(engine, cooperative=cooperative, candidates=args.candidates, deadline_s=args.deadline,
                    every_s=args.every, size=(w, h))
        print(f"{'chunked, yielding' if cooperative else 'whole (old worker)':<20} relations {r['relations_s']:6.2f} s "
              f"(ok={r['relations_ok']}) | asks sent {r['asks']:3d}, within deadline {r['asks_ok']:3d} | ask latency "
              f"p50 {r['ask_p50_s'] or 0:6.3f} s, max {r['ask_max_s'] or 0:6.3f} s | asks run between batches "
              f"{r['yields']}" + (f" | errors: {'; '.join(r['errors'])[:160]}" if r["errors"] else ""))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
