"""``eval --ray``: the records sharded over a pool of Ray actors, each with the model loaded once.

What is sharded is the list of predictions, never the report: every actor scores contiguous chunks of the
records with the same ``Scorer`` the single-process evaluation uses, the chunks come back in record order,
and ``aggregate`` builds the report from the whole list, as ``evaluate_records`` does.
"""
from __future__ import annotations

import sys

# Chunks per actor: small enough to keep every actor busy to the end, large enough to amortise a call.
CHUNKS_PER_ACTOR = 4


class EvalWorker:
    """A loaded scorer (a Ray actor of the pool)."""

    def __init__(self, scorer_kwargs: dict, threads: float | None = None):
        if threads:
            from ..raypool import set_threads

            set_threads(threads)
        from .evaluate import load_scorer

        self.scorer = load_scorer(**scorer_kwargs)

    def ready(self) -> str:
        return str(self.scorer.device)

    def predict(self, items: list) -> list:
        return [self.scorer.predict(record, root) for record, root in items]


def evaluate_on_ray(args, items: list, scorer_kwargs: dict) -> tuple[dict, list]:
    """(report, predictions) as ``evaluate_records`` returns them, computed by a Ray actor pool."""
    from ..raypool import LOCAL, PoolError, chunks, local_cpus, plan_pool, ray_session, run_pool
    from .evaluate import aggregate

    with ray_session(args.ray, num_cpus=local_cpus(args) if args.ray == LOCAL else None) as ray:
        spec = plan_pool(ray, args, len(items), args.device, log=lambda t: print(t, file=sys.stderr))
        pieces = chunks(len(items), spec.actors * CHUNKS_PER_ACTOR)
        units = [([items[i] for i in r],) for r in pieces]
        print(f"evaluating {len(items)} records in {len(units)} chunks on Ray "
              f"({'local' if args.ray == LOCAL else args.ray}): {spec.describe()}", flush=True)
        parts: list = [None] * len(units)
        errors: list[str] = []

        def on_result(i: int, preds: list) -> None:
            parts[i] = preds

        def on_error(i: int, text: str) -> None:
            errors.append(f"records {pieces[i].start + 1}-{pieces[i].stop}: {text}")

        run_pool(ray, EvalWorker, (scorer_kwargs, spec.cpus if not spec.gpus else None), units, "predict", spec,
                 on_result, on_error, progress=not args.no_progress, desc="eval chunks")
    if errors:   # a report over part of the records would look like a complete one: fail instead
        raise PoolError("evaluation incomplete: " + "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else ""))
    preds = [p for part in parts for p in part]
    return aggregate(preds), preds
