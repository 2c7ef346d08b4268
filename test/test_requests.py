"""The request layer on its own (no ROS): defaults, frame selection, validation before queueing, error kinds,
cancel, and the statistics every caller shares."""
import threading

import numpy as np
import pytest

from phi3v_spatial.engine import requests as R
from phi3v_spatial.engine.window import FrameWindow, RawPayload
from phi3v_spatial.engine.worker import InferenceWorker

NS = 1_000_000_000


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer_dir):
    from phi3v_spatial.engine.engine import SpatialEngine

    e = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu")
    yield e
    e.close()


@pytest.fixture
def handler(engine):
    window = FrameWindow(num_frames=1, min_interval_s=0.0, max_age_s=1.0)
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        window.add("/cam", i * NS // 2, RawPayload("rgb8", 24, 32, 96, img.tobytes()))
    worker = InferenceWorker(max_pending=0)
    h = R.RequestHandler(engine, worker, window=window, settings=R.ServingSettings(max_new_tokens=3),
                         resolve_topic=lambda t: "/" + t.strip("/"), clock=lambda: NS)
    yield h
    worker.stop()


def test_defaults_frames_and_keys_come_from_the_layer(handler, engine):
    reply = handler.handle(R.AskRequest(question="where?", topics=["cam"], num_frames=2))
    assert reply.success and reply.tokens_generated <= 3  # generation.max_new_tokens when the request says 0
    assert reply.frames == [R.FrameRef("/cam", NS // 2), R.FrameRef("/cam", NS)] and reply.topics == ["/cam"]
    images = handler.window.select(["/cam"], 2, NS).images()
    assert reply.answer == engine.ask("where?", images, max_new_tokens=3).answer
    assert handler.stats.ok == 1 and handler.stats.last_latency_s == reply.latency_s


def test_failures_are_replies_with_a_kind_and_never_take_a_queue_slot(handler):
    # max_pending 0 and nothing running: a request that reached the queue would run; these never get there
    cases = [
        (R.AskRequest(question="  "), R.REQUEST, "the question is empty"),
        (R.RelationsRequest(candidates=[]), R.REQUEST, "no candidate relations"),
        (R.AdapterRequest(name="ghost"), R.REQUEST, "unknown adapter 'ghost'"),
        (R.AskRequest(question="q", topics=["/nope"]), R.FRAMES, "/nope not subscribed"),
        (R.AskRequest(question="q", images=[R.RequestImage(RawPayload("rgb8", 2, 2, 6, b"12"))]), R.IMAGE,
         "images[0]: "),
    ]
    for request, kind, text in cases:
        reply = handler.handle(request)
        assert not reply.success and reply.error_kind == kind and text in reply.error, (kind, reply.error)
    assert handler.worker.depth == 0 and handler.stats.failed == len(cases) and handler.stats.ok == 0
    adapter = handler.handle(R.AdapterRequest(name="ghost"))
    assert (adapter.active, adapter.available) == ("", [])  # what the engine runs, also on failure
    assert isinstance(R.refuse(R.PlanRequest(instruction="x"), "node is not active"), R.PlanReply)


def test_a_full_queue_and_a_cancelled_plan(handler):
    gate, busy = threading.Event(), threading.Event()
    first = handler.worker.submit(lambda job: (busy.set(), gate.wait(10)))  # the model is busy, max_pending 0
    assert busy.wait(10)
    rejected = handler.handle(R.AskRequest(question="q"))
    assert rejected.error_kind == R.QUEUE and "queue is full" in rejected.error
    gate.set()
    first.result(10)
    started = threading.Event()
    pending = handler.submit(R.PlanRequest(instruction="plan", max_new_tokens=5000), on_start=started.set,
                             on_text=lambda text, n: pending.cancel() if n >= 3 else None)
    reply = pending.result(60)
    assert started.is_set() and reply.cancelled and not reply.success and reply.error_kind == R.QUEUE, reply
    assert reply.error == f"cancelled by the client after {reply.tokens_generated} token(s)" and reply.raw_text


def test_plan_replies_refuse_missing_objects_and_keep_the_reason_of_an_empty_plan():
    """What the parser reads from the model becomes the reply: an object not in view is a failure that names it
    (no steps), "already done" is a success with no steps and that reason, a plan is a success with its steps."""
    from phi3v_spatial.engine.engine import PlanResult
    from phi3v_spatial.engine.parsing import parse_plan_reply

    def reply_for(text):
        parsed = parse_plan_reply(text)
        reply = R.PlanReply()
        R._fill_plan(reply, PlanResult(parsed.steps, text, "", 9, reason=parsed.reason, missing=parsed.missing), False)
        return reply

    missing = reply_for('{"steps": [], "missing": ["green cone"]}')
    assert not missing.success and missing.error_kind == R.REFUSED and missing.steps == []
    assert missing.error == "no plan: the green cone is not in view"
    two = reply_for('{"steps": [], "missing": ["green cone", "red cube"], "reason": "look elsewhere"}')
    assert two.error == "no plan: the green cone and the red cube are not in view (look elsewhere)"
    done = reply_for('{"steps": [], "reason": "already done"}')
    assert done.success and done.steps == [] and done.reason == "already done" and not done.error
    plan = reply_for('{"steps": [{"action": "pick", "target": "red cube"}, {"action": "place", "target": "red cube", '
                     '"reference": "blue cone", "relation": "left of"}]}')
    assert plan.success and [s["action"] for s in plan.steps] == ["pick", "place"] and plan.reason == ""
    assert plan.steps[1]["reference"] == "blue cone" and plan.steps[0]["detail"] == ""
    bad = R.PlanReply()
    R._fill_plan(bad, PlanResult([], "red cube", "no JSON list of steps in the model output: 'red cube'", 2), False)
    assert not bad.success and bad.error_kind == R.OUTPUT and bad.error.startswith("could not parse a plan")
