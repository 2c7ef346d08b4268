"""One inference thread behind a bounded queue, with deadlines, queue positions and cancellation.

Why: the model is one big shared object (one device, one KV cache at a time), so requests are
serialised on a single thread; callers (ROS service/action callbacks, the CLI) get a :class:`Job`
handle at once and can wait on it, watch its queue position, or cancel it, without ever running
the model on their own thread.

Rules:

* ``max_pending`` bounds the jobs *waiting* (the running job is not counted); a submit beyond it is
  rejected immediately with :class:`JobRejected` and a reason.
* Every job has a deadline. A job still queued at its deadline fails with :class:`JobTimeout` without
  running; a running job sees ``should_stop()`` turn true at its deadline and then fails with
  :class:`JobTimeout` (carrying whatever partial value the function returned).
* ``cancel()`` removes a queued job at once; for a running job it makes ``should_stop()`` true, which the
  engine polls before every token, and the job ends as :class:`JobCancelled`.
* Long jobs share the thread cooperatively: a job may call :func:`yield_to_waiting` between chunks of its
  work (the engine does, between relation-scoring batches and every few generated tokens, with its model lock
  released). The jobs that were waiting at that moment then run, each to its end, on the same thread, and the
  long job goes on after them. So 5,000 relation candidates no longer hold every other client past its deadline;
  the long job pays for the others' time against its own deadline. Yields do not nest (a job run inside a yield
  does not yield itself), and jobs that arrive during a yield wait for the next one, so a stream of short
  requests cannot starve a long one either.
* Nobody has to wait on a job for these rules to hold: a second thread of the worker expires queued jobs at
  their deadlines, done callbacks report the end, and ``on_position`` reports every change of a queued job's
  place. So callers (the node's async callbacks) need no thread of their own per request.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Callable

_local = threading.local()  # .worker: the InferenceWorker whose model thread this is


def yield_to_waiting() -> int:
    """Called by a running job between chunks of its work: run the jobs waiting now, then return (how many ran).

    A no-op (0) off a worker's model thread, inside a job that itself runs within a yield, or with cooperation
    off (``InferenceWorker(cooperative=False)``). The caller must hold no lock another job needs (the engine
    releases its model lock around this call) and must expect shared state (e.g. the active adapter) to have
    changed when it returns.
    """
    worker = getattr(_local, "worker", None)
    return worker._run_waiting() if worker is not None else 0


QUEUED, RUNNING, DONE, FAILED, CANCELLED, TIMED_OUT = "queued", "running", "done", "failed", "cancelled", "timed_out"
_FINISHED = (DONE, FAILED, CANCELLED, TIMED_OUT)


class JobError(Exception):
    """Base class of the worker's own failures (the job function's exceptions pass through unchanged)."""

    def __init__(self, message: str, partial: Any = None):
        super().__init__(message)
        self.partial = partial


class JobRejected(JobError):
    """The queue is full or the worker is stopped; nothing was queued."""


class JobTimeout(JobError):
    """The job's deadline passed (while queued, or while running)."""


class JobCancelled(JobError):
    """The job was cancelled by its caller (or the worker was stopped)."""


class Job:
    """A handle on one submitted job: state, queue position, wait/result, cancel, should_stop."""

    def __init__(self, worker: "InferenceWorker", fn: Callable[["Job"], Any], timeout_s: float, name: str,
                 on_position: Callable[[int], None] | None = None):
        self.id = next(InferenceWorker._ids)
        self.name = name or f"job-{self.id}"
        self._worker = worker
        self._fn = fn
        self.submitted = time.monotonic()
        self.timeout_s = float(timeout_s)
        self.deadline = self.submitted + self.timeout_s if self.timeout_s > 0 else float("inf")
        self.started: float | None = None
        self.finished: float | None = None
        self.state = QUEUED
        self._cancel = threading.Event()
        self.stop_signalled = False  # set once should_stop() has told the running function to stop
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[["Job"], None]] = []
        self._on_position = on_position
        self._reported_position: int | None = None

    # -- caller side ---------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel: a queued job ends now; a running one stops at its next should_stop() poll."""
        return self._worker._cancel(self)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def should_stop(self) -> bool:
        """Polled by the engine before every token: cancel requested or deadline passed."""
        stop = self._cancel.is_set() or time.monotonic() >= self.deadline or self._worker._stopping
        if stop:
            self.stop_signalled = True
        return stop

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def queue_position(self) -> int | None:
        """1 = next to run, 2 = behind one job...; 0 = running; None = finished."""
        return self._worker.position(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until finished (expiring the job if it is still queued past its deadline)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            self._worker._expire_due()
            step = 0.1
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                step = min(step, left)
            if self.state == QUEUED and self.deadline != float("inf"):
                step = max(0.0, min(step, self.deadline - time.monotonic()) + 0.001)
            self._done.wait(step)
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The function's return value, or raises its exception / JobTimeout / JobCancelled."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self.name} still {self.state} after waiting {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        self.wait()
        return self._error

    def add_done_callback(self, cb: Callable[["Job"], None]) -> None:
        """Called once (on the worker or cancelling thread) when the job finishes."""
        with self._worker._lock:
            if not self._done.is_set():
                self._callbacks.append(cb)
                return
        cb(self)

    @property
    def latency_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted

    def __repr__(self):
        return f"Job({self.name!r}, {self.state})"

    # -- worker side ---------------------------------------------------------------------------
    def _finish(self, state: str, value: Any = None, error: BaseException | None = None) -> None:
        with self._worker._lock:  # same lock as add_done_callback: no callback is lost
            self.state = state
            self._value = value
            self._error = error
            self.finished = time.monotonic()
            callbacks, self._callbacks = self._callbacks, []
            self._done.set()
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - a broken callback must not kill the worker
                pass


class InferenceWorker:
    """Runs submitted functions one at a time on a dedicated thread (see the module docstring)."""

    _ids = itertools.count(1)

    def __init__(self, max_pending: int = 4, name: str = "inference", cooperative: bool = True):
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._suspended: Job | None = None  # a long job paused in yield_to_waiting while others run
        self.cooperative = bool(cooperative)
        self.yields = 0  # jobs run inside another job's yield (diagnostics)
        self.max_pending = int(max_pending)
        self._stopping = False
        self.rejected = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap, name=f"{name}-deadlines", daemon=True)
        self._reaper.start()

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, fn: Callable[[Job], Any], timeout_s: float = 0.0, name: str = "",
               on_position: Callable[[int], None] | None = None) -> Job:
        """Queue ``fn(job)``; raises JobRejected at once when ``max_pending`` jobs already wait.

        ``timeout_s`` <= 0 means no deadline. ``on_position(n)`` is called whenever the job's place in the queue
        changes while it waits (1 = next to run), from the thread that changed it.
        """
        self._expire_due()
        job = Job(self, fn, timeout_s, name, on_position)
        with self._lock:
            if self._stopping:
                self.rejected += 1
                raise JobRejected("not run: the inference worker is shutting down or has stopped (node cleaning up or exiting)")
            busy = self._running is not None or self._suspended is not None or bool(self._queue)
            if busy and len(self._queue) >= self.max_pending:
                self.rejected += 1
                raise JobRejected(
                    f"request queue is full: {len(self._queue)} request(s) waiting behind the running one "
                    f"(queue.max_pending = {self.max_pending}); retry later or raise queue.max_pending")
            self._queue.append(job)
            self._wake.notify_all()
        self._report_positions()
        return job

    def set_max_pending(self, n: int) -> None:
        if int(n) < 0:
            raise ValueError("queue.max_pending must be >= 0")
        with self._lock:
            self.max_pending = int(n)

    # -- status --------------------------------------------------------------------------------
    def position(self, job: Job) -> int | None:
        with self._lock:
            if job is self._running or job is self._suspended:
                return 0
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return None

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._lock:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or self._suspended is not None

    def _report_positions(self) -> None:
        """Tell every waiting job with an ``on_position`` listener its new place, if it changed."""
        with self._lock:
            moved = [(job, i + 1) for i, job in enumerate(self._queue)
                     if job._on_position is not None and job._reported_position != i + 1]
            for job, pos in moved:
                job._reported_position = pos
        for job, pos in moved:
            try:
                job._on_position(pos)
            except Exception:  # noqa: BLE001 - a broken listener must not break the queue
                pass

    # -- cancel / expire -----------------------------------------------------------------------
    def _cancel(self, job: Job) -> bool:
        job._cancel.set()
        with self._lock:
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                finish = True
            else:
                finish = False
        if finish:
            job._finish(CANCELLED, error=JobCancelled(f"{job.name} cancelled while queued"))
            self._report_positions()
            return True
        return job.state == RUNNING

    def _expire_due(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            running = self._running is not None
            for i, job in enumerate(list(self._queue)):
                if now >= job.deadline:
                    self._queue.remove(job)
                    expired.append((job, i + running))  # requests ahead of it at its deadline (running included)
        for job, ahead in expired:
            why = (f"the model was busy with {ahead} earlier request(s) ahead of it" if ahead else
                   "nothing was running or queued ahead of it: the deadline passed before the model could start it")
            job._finish(TIMED_OUT, error=JobTimeout(
                f"request timed out after {job.timeout_s:g} s while waiting in the queue "
                f"(request_timeout_s / goal timeout_s); {why}"))
        if expired:
            self._report_positions()

    def _reap(self) -> None:
        """Expire queued jobs at their deadlines, also while the model thread is busy with a long job."""
        while True:
            with self._lock:
                if self._stopping:
                    return
                due = min((job.deadline for job in self._queue), default=float("inf"))
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(None if left == float("inf") else left)
                    continue  # re-evaluate: a new job, a stop, or the deadline reached
            self._expire_due()

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        _local.worker = self
        while True:
            self._expire_due()
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wake.wait(0.5)
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft()
                if time.monotonic() >= job.deadline:
                    self._queue.appendleft(job)
                    continue  # _expire_due handles it on the next turn
                self._start(job)
            self._run(job)
            job = None  # the finished job (its inputs, an exception's traceback) must not live on until the next one

    def _run_waiting(self) -> int:
        """The running job yields: run the jobs queued at this moment (not later arrivals), then give it back the thread."""
        with self._lock:
            if not self.cooperative or self._suspended is not None or self._stopping or not self._queue:
                return 0
            outer, waiting = self._running, list(self._queue)  # these jobs, not later arrivals
            self._suspended = outer
        ran = 0
        try:
            for job in waiting:
                self._expire_due()
                with self._lock:
                    if self._stopping:
                        break
                    if job not in self._queue or time.monotonic() >= job.deadline:
                        continue  # cancelled or expired meanwhile (_expire_due finishes an expired one)
                    self._queue.remove(job)
                    self._start(job)
                self._run(job)
                job = None
                ran += 1
        finally:
            with self._lock:
                self._running, self._suspended = outer, None
                self.yields += ran
        return ran

    def _start(self, job: Job) -> None:  # under self._lock
        self._running = job
        job.state = RUNNING
        job.started = time.monotonic()

    def _run(self, job: Job) -> None:
        """Run a started job's function and finish it (on the model thread)."""
        self._report_positions()
        value, error, state = None, None, DONE
        try:
            value = job._fn(job)
        except BaseException as exc:  # noqa: BLE001 - reported through the job, never kills the thread
            error, state = exc, FAILED
        if error is None and self._stopping:
            error, state = JobCancelled(f"{job.name} stopped: the worker is shutting down (node cleaning up or "
                                        f"exiting)", partial=value), CANCELLED
        elif error is None and job.cancel_requested:
            error, state = JobCancelled(f"{job.name} cancelled while running", partial=value), CANCELLED
        elif error is None and job.stop_signalled and time.monotonic() >= job.deadline:
            # only a job the deadline actually cut short; a result completed just after it is kept
            error, state = JobTimeout(
                f"request timed out: generation stopped at the {job.timeout_s:g} s deadline "
                f"(request_timeout_s / goal timeout_s); raise it or lower max_new_tokens",
                partial=value), TIMED_OUT
        with self._lock:
            self._running = None
        job._finish(state, value, error)

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Reject new jobs, cancel queued ones, ask the running one to stop, and join the thread."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = [j for j in (self._running, self._suspended) if j is not None]
            self._wake.notify_all()
        for job in queued:
            job._cancel.set()
            job._finish(CANCELLED, error=JobCancelled(f"{job.name} cancelled: the worker is shutting down"))
        for job in running:
            job._cancel.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if threading.current_thread() is not self._reaper:
            self._reaper.join(1.0)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping
