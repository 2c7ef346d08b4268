"""InferenceWorker: one thread, bounded queue, deadlines, queue positions, cancellation (queued and running)."""
import threading
import time

import pytest

from phi3v_spatial.engine.worker import (
    CANCELLED, DONE, FAILED, TIMED_OUT, InferenceWorker, JobCancelled, JobRejected, JobTimeout,
)


@pytest.fixture
def worker():
    w = InferenceWorker(max_pending=2)
    yield w
    w.stop()


def blocking(gate: threading.Event, started: threading.Event | None = None):
    """A job that 'generates tokens' until the gate opens or it is told to stop."""
    def fn(job):
        if started:
            started.set()
        n = 0
        while not gate.is_set():
            if job.should_stop():
                return f"partial:{n}"
            n += 1
            time.sleep(0.005)
        return "finished"
    return fn


def test_results_and_exceptions_come_back_on_one_thread(worker):
    names = []
    jobs = [worker.submit(lambda j, i=i: (names.append(threading.current_thread().name), i * 2)[1]) for i in range(2)]
    assert [j.result(10) for j in jobs] == [0, 2]
    assert set(names) == {"inference"} and jobs[0].state == DONE and jobs[0].latency_s >= 0
    bad = worker.submit(lambda j: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.result(10)
    assert bad.state == FAILED and worker.alive


def test_full_queue_rejects_at_once_with_reason(worker):
    gate, started = threading.Event(), threading.Event()
    running = worker.submit(blocking(gate, started))
    assert started.wait(5)
    waiting = [worker.submit(lambda j: "ok") for _ in range(2)]
    with pytest.raises(JobRejected, match=r"queue is full.*max_pending = 2"):
        worker.submit(lambda j: "too many")
    assert running.queue_position == 0 and [j.queue_position for j in waiting] == [1, 2]
    gate.set()
    assert [j.result(10) for j in waiting] == ["ok", "ok"]
    assert running.result(10) == "finished" and running.queue_position is None
    assert worker.rejected == 1


def test_deadline_expires_queued_job_without_running_it(worker):
    gate, started = threading.Event(), threading.Event()
    worker.submit(blocking(gate, started))
    assert started.wait(5)
    ran = []
    job = worker.submit(lambda j: ran.append(1), timeout_s=0.2)
    with pytest.raises(JobTimeout, match="timed out after 0.2 s while waiting in the queue"):
        job.result(10)  # returns while the first job is still running
    assert job.state == TIMED_OUT and not gate.is_set()
    gate.set()
    time.sleep(0.1)
    assert not ran


def test_deadline_stops_a_running_job(worker):
    job = worker.submit(blocking(threading.Event()), timeout_s=0.3)
    with pytest.raises(JobTimeout, match="deadline") as ei:
        job.result(10)
    assert ei.value.partial.startswith("partial:")


def test_a_result_completed_past_the_deadline_is_kept(worker):
    """A function that never polls should_stop and returns late still delivers its (complete) result."""
    job = worker.submit(lambda j: (time.sleep(0.4), "complete")[1], timeout_s=0.2)
    assert job.result(10) == "complete" and job.state == DONE


def test_cancel_queued_and_running(worker):
    gate, started = threading.Event(), threading.Event()
    running = worker.submit(blocking(gate, started))
    queued = worker.submit(lambda j: "never")
    assert started.wait(5)
    assert queued.cancel() and queued.state == CANCELLED
    with pytest.raises(JobCancelled):
        queued.result(1)
    done_states = []
    running.add_done_callback(lambda j: done_states.append(j.state))
    assert running.cancel()
    with pytest.raises(JobCancelled) as ei:
        running.result(10)
    assert ei.value.partial.startswith("partial:") and done_states == [CANCELLED]
    assert worker.submit(lambda j: "still serving").result(10) == "still serving"


def test_max_pending_zero_only_accepts_when_idle():
    w = InferenceWorker(max_pending=0)
    try:
        assert w.submit(lambda j: 1).result(5) == 1
        gate, started = threading.Event(), threading.Event()
        w.submit(blocking(gate, started))
        assert started.wait(5)
        with pytest.raises(JobRejected):
            w.submit(lambda j: 2)
        gate.set()
    finally:
        w.stop()


def test_stop_cancels_everything_and_rejects_new_work():
    w = InferenceWorker(max_pending=3)
    gate, started = threading.Event(), threading.Event()
    running = w.submit(blocking(gate, started))
    queued = w.submit(lambda j: "never")
    assert started.wait(5)
    assert w.stop(timeout=10)
    assert running.state == CANCELLED and queued.state == CANCELLED
    with pytest.raises(JobRejected, match="shutting down or has stopped"):
        w.submit(lambda j: 1)


def test_nobody_waits_yet_deadlines_expire_and_positions_are_reported(worker):
    """What the node's coroutine callbacks rely on: a queued job expires at its deadline with no thread waiting on
    it (the worker's own deadline thread), done callbacks deliver the end, and on_position every move."""
    gate, started = threading.Event(), threading.Event()
    running = worker.submit(blocking(gate, started))
    assert started.wait(5)
    positions = {"a": [], "b": []}
    ended = threading.Event()
    a = worker.submit(lambda j: "a", timeout_s=0.3, on_position=positions["a"].append)
    b = worker.submit(lambda j: "b", on_position=positions["b"].append)
    a.add_done_callback(lambda job: ended.set())
    assert ended.wait(5), "the queued job did not expire while nobody waited on it"
    assert a.state == TIMED_OUT and isinstance(a.exception(), JobTimeout) and "while waiting in the queue" in str(a.exception())
    assert positions == {"a": [1], "b": [2, 1]}  # b moved up when a expired
    gate.set()
    assert b.result(10) == "b" and running.result(10) == "finished"
    assert positions["b"] == [2, 1]  # running is position 0: not reported
