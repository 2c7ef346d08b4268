"""Ray for batch inference: a session (a private local instance, or a cluster) and a pool of model actors.

Used by ``replay --ray`` (one unit of work per bag) and ``eval --ray`` (one per chunk of records). A unit's
worker is a plain class (``ready()`` plus one work method) that loads the model once in ``__init__``: here
each actor of the pool holds one, so the model loads once per actor, not once per unit; without ``--ray``
the same class runs in this process, so both paths share every line that computes an answer.

A local instance (``--ray`` with no address) is private to this command and reachable from this host only:
Ray's single-node mode binds every server (GCS, raylet, workers, agents) to 127.0.0.1, no dashboard starts,
no usage statistics are sent, and it stops with the command. ``--ray auto`` / ``--ray HOST:PORT`` joins a
running cluster instead (``ray start --head`` on the head node); then this package must be installed on
every node and the data paths must be readable there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

LOCAL = "local"
# Object store of a private local instance: results and work units are small (answers, record lists).
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


class PoolError(Exception):
    """The pool could not start (no Ray, no cluster, or the model failed to load in an actor)."""


def add_ray_arguments(p: argparse.ArgumentParser, unit: str) -> None:
    g = p.add_argument_group("Ray (many workers, one machine or a cluster)")
    g.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help=f"run the {unit}s on a pool of Ray actors, each loading the model once: no ADDRESS = a "
                        "private Ray instance on this machine (loopback only, stopped at the end); 'auto' or "
                        "HOST:PORT = a running cluster (`ray start --head`). Before a positional argument, write "
                        "'--ray local' for the private instance")
    g.add_argument("--actors", type=int, default=None, metavar="N",
                   help="actors (model copies) in the pool (default: the cluster's GPUs / --gpus-per-actor, "
                        "else its CPUs / --cpus-per-actor, at most one per unit of work)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="CPUs each actor reserves (and torch threads on CPU; default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs each actor reserves (default: 1 when the cluster has GPUs and --device is not cpu, "
                        "else 0)")


@dataclass
class PoolSpec:
    actors: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        per = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} x {per}"


_TOKEN: list[str] = []


def _process_token() -> str:
    if not _TOKEN:
        import secrets

        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


def _loopback_env() -> dict[str, str]:
    """Environment of a private local instance (and of the processes it starts)."""
    return {
        # Ray's single-node mode (the default on macOS / Windows): the node's address is 127.0.0.1, and every
        # Ray server then listens on 127.0.0.1 only, instead of on all interfaces.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextmanager
def ray_session(address: str, *, num_cpus: int | None = None, quiet: bool = False):
    """``ray`` connected to ``address`` (``local``: a private instance, stopped and removed on exit)."""
    saved = dict(os.environ)
    temp_dir = None
    if address == LOCAL:
        os.environ.update(_loopback_env())
        temp_dir = tempfile.mkdtemp(prefix="phi3v-ray-")   # short: Ray's socket paths must stay < 108 chars
        if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
            # token authentication stays on, with a token of this process (not in ~/.ray); one per process, as
            # ray caches the first token it reads
            os.environ["RAY_AUTH_TOKEN"] = _process_token()
    try:
        try:
            import ray
        except ImportError:
            raise PoolError("--ray needs the 'ray' package (pinned in requirements.txt: pip install ray==2.60.0)") from None
        if address == LOCAL:
            from ray._private import ray_constants

            was_cluster = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False   # read at import; ray may have been imported before
            kwargs = dict(address=LOCAL, include_dashboard=False, num_cpus=num_cpus,
                          object_store_memory=LOCAL_OBJECT_STORE_BYTES, _temp_dir=temp_dir)
        else:
            kwargs = dict(address=address)
        try:
            ray.init(log_to_driver=not quiet, logging_level="ERROR" if quiet else "INFO", **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PoolError(f"--ray {address}: cannot {'start' if address == LOCAL else 'connect to'} Ray: {e}") from None
        try:
            yield ray
        finally:
            ray.shutdown()
            if address == LOCAL:
                ray_constants.ENABLE_RAY_CLUSTER = was_cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def local_cpus(args) -> int:
    """CPUs of a private local instance: the machine's, or what ``--actors`` x ``--cpus-per-actor`` asks."""
    want = (args.actors or 0) * max(args.cpus_per_actor, 0.0)
    return max(os.cpu_count() or 1, int(-(-want // 1)))


def plan_pool(ray, args, n_units: int, device: str = "auto", log=print) -> PoolSpec:
    """Actors and their resources from the options and the cluster's resources."""
    total = ray.cluster_resources()
    cpus = float(args.cpus_per_actor)
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) > 0 and not str(device).startswith("cpu") else 0.0
    if cpus < 0 or gpus < 0:
        raise PoolError("--cpus-per-actor and --gpus-per-actor must be >= 0")
    if args.actors is not None:
        if args.actors < 1:
            raise PoolError(f"--actors {args.actors}: need at least one actor")
        actors = args.actors
    elif gpus > 0:
        actors = int(total.get("GPU", 0) // gpus)
    else:
        actors = int(total.get("CPU", 1) // cpus) if cpus > 0 else 1
    actors = max(1, min(actors, max(1, n_units)))
    short = [f"{actors * need:g} {name} ({total.get(name, 0):g} in the cluster)"
             for name, need in (("CPU", cpus), ("GPU", gpus)) if actors * need > total.get(name, 0)]
    if short:
        log(f"warning: the pool asks for {' and '.join(short)}: actors wait until the cluster has them")
    return PoolSpec(actors, cpus, gpus)


def _error_text(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)


def run_local(worker_cls, init_args: Sequence, units: Sequence[tuple], method: str,
              on_result: Callable[[int, object], None], *, progress: bool = False, desc: str = "") -> list:
    """The pool's work in this process, one unit after the other, with one worker (the model loads once);
    returns ``[worker.ready()]``."""
    worker = worker_cls(*init_args)
    ready = [worker.ready()]
    bar = _bar(len(units), desc, progress)
    for i, unit in enumerate(units):
        on_result(i, getattr(worker, method)(*unit))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return ready


def run_pool(ray, worker_cls, init_args: Sequence, units: Sequence[tuple], method: str, spec: PoolSpec,
             on_result: Callable[[int, object], None], on_error: Callable[[int, str], object], *,
             progress: bool = False, desc: str = "") -> list:
    """Each unit (the method's arguments) on the next free actor; ``on_result(i, value)`` in completion order;
    returns every actor's ``ready()``.

    A unit whose actor dies (or whose method raises) gets ``on_error(i, text)`` and the others go on; a dead
    actor restarts once (reloading the model), and is dropped after that."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    remote = ray.remote(worker_cls).options(num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=1)
    actors = [remote.remote(*init_args) for _ in range(spec.actors)]
    try:
        try:
            ready = ray.get([a.ready.remote() for a in actors])
        except RayError as e:
            raise PoolError(f"an actor could not start: {_error_text(e)}") from None
        pending = deque(enumerate(units))
        idle = list(actors)
        running: dict = {}
        bar = _bar(len(units), desc, progress)
        while pending or running:
            while idle and pending:
                actor = idle.pop()
                i, unit = pending.popleft()
                running[getattr(actor, method).remote(*unit)] = (i, actor)
            if not running:   # every actor is gone
                for i, _ in pending:
                    on_error(i, "no Ray actor left to run it (all died)")
                break
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i, actor = running.pop(ref)
                try:
                    on_result(i, ray.get(ref))
                    idle.append(actor)
                except RayActorError as e:
                    on_error(i, f"its Ray actor died: {_error_text(e)}")
                    try:   # restarted (model reloaded) or gone for good
                        ray.get(actor.ready.remote(), timeout=600)
                        idle.append(actor)
                    except (RayError, GetTimeoutError):
                        pass
                except RayError as e:
                    on_error(i, _error_text(e))
                    idle.append(actor)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return ready
    finally:
        for a in actors:
            ray.kill(a)


def chunks(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` contiguous pieces of near-equal size (order kept)."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append(range(start, end))
        start = end
    return [r for r in out if len(r)]


def set_threads(cpus: float) -> None:
    """torch threads of a CPU actor: the CPUs it reserved (Ray sets OMP_NUM_THREADS, torch may not follow)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"
