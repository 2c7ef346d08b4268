"""Give freed memory back to the operating system, so the node's RSS follows what it really holds.

Why: the node's big transient buffers (decoded frames, pixel tensors, activations, a huge question's token ids)
are freed by CPython / torch with ``free()``, but glibc keeps freed heap memory inside its arenas for reuse. Each
thread that allocates gets an arena (up to 8 per core), chunks below the (dynamic, up to 32 MiB) mmap threshold
come from those arenas, and the arenas are returned to the system only from their top. The RSS of a node that
serves a mixed load then creeps up and never comes down after a large request, although Python and torch hold no
more than before. Two levers, both glibc-only (a no-op elsewhere):

* :func:`configure_allocator` (called once at process start, before threads exist): at most ``ARENA_MAX``
  arenas (``mallopt(M_ARENA_MAX)``, the same as ``MALLOC_ARENA_MAX``; an explicit environment value wins).
* :func:`after_request` (called after each request's reply is delivered, on the thread that ran the request):
  ``gc.collect()`` and ``malloc_trim(0)`` when the RSS grew by ``TRIM_STEP_BYTES`` since the last trim (and
  once more after the next request), only the trim at most every ``TRIM_PERIOD_S`` seconds otherwise. A trim walks every arena and madvises its free pages away; it costs
  milliseconds, so it is not done after every small request.

:func:`stats` says how often it trimmed, what it cost and what it gave back. ``PHI3V_MALLOC_TRIM=0`` in the
environment turns the trimming off (to measure without it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time

ARENA_MAX = 2
TRIM_STEP_BYTES = 32 * 2**20   # RSS growth since the last trim that triggers one at once
TRIM_PERIOD_S = 10.0           # otherwise at most this often (fragmentation from many small requests)
M_ARENA_MAX = -8               # glibc malloc.h

_lock = threading.Lock()
_state = {"last_rss": 0, "last_t": 0.0, "trims": 0, "collects": 0, "collect_next": False, "trim_s": 0.0, "released": 0}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only (musl has none)
        libc.mallopt
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_disabled = os.environ.get("PHI3V_MALLOC_TRIM", "1").strip() == "0"


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def configure_allocator(arena_max: int = ARENA_MAX) -> bool:
    """Limit glibc's malloc arenas (unless MALLOC_ARENA_MAX is set); call before the process starts threads."""
    if _libc is None or os.environ.get("MALLOC_ARENA_MAX") or arena_max <= 0:
        return False
    return bool(_libc.mallopt(M_ARENA_MAX, int(arena_max)))


def trim() -> int:
    """``malloc_trim(0)`` now; returns the bytes of RSS it gave back (0 without glibc)."""
    if _libc is None:
        with _lock:
            _state["last_rss"], _state["last_t"] = rss_bytes(), time.monotonic()
        return 0
    before = rss_bytes()
    t0 = time.monotonic()
    _libc.malloc_trim(0)
    after = rss_bytes()
    with _lock:
        _state["trims"] += 1
        _state["trim_s"] += time.monotonic() - t0
        _state["released"] += max(0, before - after)
        _state["last_rss"], _state["last_t"] = after, time.monotonic()
    return max(0, before - after)


def after_request() -> None:
    """After a request: when the RSS grew by TRIM_STEP_BYTES since the last trim, collect cyclic garbage and trim,
    and do it again after the next request; otherwise only trim, at most every TRIM_PERIOD_S.

    Why collect: a request that failed in the model leaves its exception, whose traceback holds the model's frames
    and their tensors (the 1 MB question's 134 MiB of input embeddings), in a reference cycle with its job; only
    the cyclic collector frees it, whenever its own thresholds say so. Why again after the next request: this runs
    while the request's own job is still referenced (by the worker, until it takes the next job)."""
    if _disabled:
        return
    rss, now = rss_bytes(), time.monotonic()
    with _lock:
        grew = rss > _state["last_rss"] + TRIM_STEP_BYTES
        collect = grew or _state["collect_next"]
        due = collect or now - _state["last_t"] >= TRIM_PERIOD_S
        if due:
            _state["last_t"] = now  # one trim at a time: others skip until this one has run
            _state["collect_next"] = grew
    if not due:
        return
    try:
        if collect:
            t0 = time.monotonic()
            gc.collect()
            with _lock:
                _state["collects"] += 1
                _state["trim_s"] += time.monotonic() - t0
        trim()
    except Exception:  # noqa: BLE001 - freeing memory must never fail a request
        pass


def stats() -> dict:
    """{"trims", "collects" (gc.collect runs), "trim_s" (total seconds of both), "released_mb" (total), "rss_mb"}."""
    with _lock:
        return {"trims": _state["trims"], "collects": _state["collects"], "trim_s": round(_state["trim_s"], 4),
                "released_mb": round(_state["released"] / 2**20, 1), "rss_mb": round(rss_bytes() / 2**20, 1)}
