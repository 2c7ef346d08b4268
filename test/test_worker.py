"""InferenceWorker: one thread, bounded queue, deadlines, queue positions, cancellation (queued and running)."""
import threading
import time

import pytest

from phi3v_spatial.engine.worker import (
    CANCELLED, DONE, FAILED, RUNNING, TIMED_OUT, InferenceWorker, JobCancelled, JobRejected, JobTimeout,
    yield_to_waiting,
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


# ------------------------------------------------------------------------------- cooperative long jobs (issue 23)


def chunked(gate: threading.Event, started: threading.Event, log: list):
    """A long job in chunks that yields to the waiting jobs between chunks, until the gate opens."""
    def fn(job):
        started.set()
        chunks = 0
        while not gate.is_set() and not job.should_stop():
            chunks += 1
            time.sleep(0.002)
            ran = yield_to_waiting()
            if ran:
                log.append(("long resumed after", ran))
        return chunks
    return fn


def test_a_waiting_job_runs_between_the_chunks_of_a_long_one(worker):
    gate, started, log = threading.Event(), threading.Event(), []
    long = worker.submit(chunked(gate, started, log))
    assert started.wait(5)
    short = worker.submit(lambda j: (log.append("short"), (threading.current_thread().name, long.state,
                                                           long.queue_position, j.queue_position))[1])
    # the gate is still shut: without yielding the short job could only run after the long one ended
    assert short.result(10) == ("inference", RUNNING, 0, 0)
    assert not long.done() and long.queue_position == 0 and worker.busy
    gate.set()
    assert long.result(10) > 0 and long.state == DONE
    assert log == ["short", ("long resumed after", 1)] and worker.yields == 1


def test_without_cooperation_the_short_job_waits_for_the_long_one():
    w = InferenceWorker(max_pending=2, cooperative=False)
    try:
        order, started = [], threading.Event()

        def long(job):
            started.set()
            for _ in range(50):
                time.sleep(0.002)
                assert yield_to_waiting() == 0
            order.append("long")

        a = w.submit(long)
        assert started.wait(5)
        b = w.submit(lambda j: order.append("short"))
        a.result(10), b.result(10)
        assert order == ["long", "short"] and w.yields == 0
    finally:
        w.stop()


def test_yields_do_not_nest_and_later_arrivals_wait_for_the_next_yield(worker):
    """A job run inside a yield cannot yield itself (bounded depth); a job submitted during a yield is not run in
    that yield (so a stream of short requests cannot starve the long one) but in the next."""
    gate, started, log = threading.Event(), threading.Event(), []
    long = worker.submit(chunked(gate, started, log))
    assert started.wait(5)
    second = []

    def first(job):
        nested = yield_to_waiting()  # would run `second` here if yields nested
        second.append(worker.submit(lambda j: log.append("second")))
        log.append(("first", nested))

    worker.submit(first).result(10)
    second[0].result(10)
    gate.set()
    long.result(10)
    assert log == [("first", 0), ("long resumed after", 1), "second", ("long resumed after", 1)]


def test_a_job_cancelled_during_a_yield_does_not_let_a_later_arrival_in(worker):
    """The yield runs the jobs that waited when it began: one of them cancelled meanwhile leaves its turn empty
    rather than giving it to a job that arrived during the yield."""
    go, started, log, later = threading.Event(), threading.Event(), [], []

    def long(job):
        started.set()
        assert go.wait(5)
        log.append(("long resumed after", yield_to_waiting()))
        return "long"

    def first(job):
        second.cancel()
        later.append(worker.submit(lambda j: log.append("later")))
        log.append("first")

    running = worker.submit(long)
    assert started.wait(5)
    worker.submit(first)
    second = worker.submit(lambda j: log.append("second"))
    go.set()
    assert running.result(10) == "long"
    later[0].result(10)
    assert log == ["first", ("long resumed after", 1), "later"], log


def test_stop_during_a_yield_cancels_the_paused_job_too():
    w = InferenceWorker(max_pending=2)
    gate, started, log = threading.Event(), threading.Event(), []
    long = w.submit(chunked(gate, started, log))
    assert started.wait(5)
    inside = threading.Event()
    release = threading.Event()
    short = w.submit(lambda j: (inside.set(), release.wait(10)))
    assert inside.wait(10)
    stopper = threading.Thread(target=w.stop, kwargs={"timeout": 10})
    stopper.start()
    release.set()
    stopper.join(15)
    assert short.state == CANCELLED and long.state == CANCELLED and not w.alive


# ------------------------------------------- the engine's long requests yield too (a real tiny model, issue 23)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer_dir):
    from phi3v_spatial.engine.engine import SpatialEngine

    e = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    yield e
    e.close()


def _candidates(n):
    from phi3v_spatial.engine.parsing import Relation

    objects = ["cube", "sphere", "cup", "box", "table", "chair", "lamp", "book"]
    return [Relation(objects[i % 8], ["left of", "right of", "above", "behind"][i % 4], f"{objects[(i // 8) % 8]} {i}")
            for i in range(n)]


def test_an_ask_finishes_while_a_big_relations_request_runs(engine):
    """2,000 candidates through the request layer: an ask sent once the scoring runs is answered before it ends,
    and the relations come out exactly as scoring them alone (the yields change nothing in the numbers)."""
    import numpy as np

    from phi3v_spatial.engine import requests as R
    from phi3v_spatial.engine.window import RawPayload

    image = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    img = R.RequestImage(RawPayload("rgb8", 24, 32, 96, image.tobytes()))
    worker = InferenceWorker(max_pending=4)
    # max_candidates raised from its default (256), as an operator may (up to 100,000)
    handler = R.RequestHandler(engine, worker, settings=R.ServingSettings(max_new_tokens=4, request_timeout_s=600,
                                                                          max_candidates=2000))
    try:
        candidates = [R.Relation(c.subject, c.relation, c.object) for c in _candidates(2000)]
        order, asked = [], []
        big = handler.submit(R.RelationsRequest(candidates=candidates, images=[img]),
                             on_start=lambda: asked.append(handler.submit(R.AskRequest(question="Where is the cup?",
                                                                                         images=[img]))))
        big.add_done_callback(lambda reply: order.append("relations"))
        while not asked:
            time.sleep(0.01)
        small = asked[0]
        small.add_done_callback(lambda reply: order.append("ask"))
        reply = small.result(600)
        assert reply.success, reply.error
        relations = big.result(600)
        assert relations.success, relations.error
        assert order == ["ask", "relations"] and worker.yields >= 1
        assert reply.answer == engine.ask("Where is the cup?", [image], max_new_tokens=4).answer
        alone = engine.query_relations(_candidates(2000)[:40], [image])
        assert [r.probability for r in relations.relations[:40]] == pytest.approx([r.probability for r in alone], abs=1e-5)
    finally:
        worker.stop()


def test_a_long_plan_lets_an_ask_through_between_tokens(endless_model_dir, tokenizer_dir):
    """A plan of 300 tokens from a model that never stops by itself: an ask sent once it runs is answered first."""
    import numpy as np

    from phi3v_spatial.engine import requests as R
    from phi3v_spatial.engine.engine import SpatialEngine

    engine = SpatialEngine.from_pretrained(endless_model_dir, device="cpu", dtype="float32")
    image = np.random.default_rng(4).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    worker = InferenceWorker(max_pending=4)
    handler = R.RequestHandler(engine, worker, settings=R.ServingSettings(max_new_tokens=4, request_timeout_s=600))
    try:
        order, asked = [], []
        plan = handler.submit(R.PlanRequest(instruction="stack the cups", max_new_tokens=300,
                                            images=[R.RequestImage(image)]),
                              on_start=lambda: asked.append(handler.submit(R.AskRequest(question="Where is it?",
                                                                                         images=[R.RequestImage(image)]))))
        plan.add_done_callback(lambda reply: order.append("plan"))
        while not asked:
            time.sleep(0.01)
        asked[0].add_done_callback(lambda reply: order.append("ask"))
        answer, planned = asked[0].result(600), plan.result(600)
        assert answer.success, answer.error
        assert planned.tokens_generated == 300 and order == ["ask", "plan"]
        # the tokens are the ones generated alone: yielding changed nothing in the output
        alone = engine.plan("stack the cups", [image], max_new_tokens=300)
        assert planned.raw_text == alone.raw_text
    finally:
        worker.stop()
        engine.close()


def test_an_adapter_switched_during_a_long_request_restarts_it_under_the_new_adapter(tiny_model_dir, tmp_path):
    """set_adapter runs between two batches of a relations request: the request starts over, so every candidate is
    scored under one adapter (the new one) -- never half under each."""
    import copy

    import numpy as np
    import torch
    from peft import get_peft_model

    from phi3v_spatial.engine import requests as R
    from phi3v_spatial.engine.engine import SpatialEngine
    from phi3v_spatial.model import Phi3VForCausalLM
    from phi3v_spatial.model.adapters import lora_config

    torch.manual_seed(7)
    peft_model = get_peft_model(copy.deepcopy(Phi3VForCausalLM.from_pretrained(tiny_model_dir)),
                                lora_config(r=4, include_vision=False, init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "lm"))
    engine = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32",
                                           adapters={"lm": str(tmp_path / "lm")})
    engine.set_adapter(None)
    image = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    relations = _candidates(300)
    base = [r.probability for r in engine.query_relations(relations, [image])]
    worker = InferenceWorker(max_pending=4)
    handler = R.RequestHandler(engine, worker, settings=R.ServingSettings(request_timeout_s=600, max_candidates=300))
    try:
        switched = []
        big = handler.submit(R.RelationsRequest(candidates=list(relations), images=[R.RequestImage(image)]),
                             on_start=lambda: switched.append(handler.submit(R.AdapterRequest(name="lm"))))
        reply = big.result(600)
        assert reply.success and switched[0].result(600).success and engine.active_adapter == "lm"
        assert worker.yields >= 1  # the switch ran in the middle of the scoring
        under_lm = [r.probability for r in engine.query_relations(relations, [image])]
        assert max(abs(a - b) for a, b in zip(under_lm, base)) > 1e-4
        assert [r.probability for r in reply.relations] == pytest.approx(under_lm, abs=1e-5)
    finally:
        worker.stop()
        engine.close()
