"""Inputs validated at the door and messages that say what happened (issue 23, items 2 and 6).

Each test sends the failing input of the hostile-input probe through the request layer (``engine/requests.py``:
the one path of the node, replay and the CLI) on the tiny random checkpoint, and checks the new behaviour:
adapter scales inf / NaN / 1e30 / negative are refused (also by ``SpatialEngine.set_adapter`` on its own); an
over-long question is refused from its length before it is tokenized; images and candidates per request are
bounded; special tokens typed by a user stay text; a window with fewer frames than asked says so; a deadline that
passes in an empty queue says that; ``set_adapter``'s ``active`` is the switch the request made. The last test
sends the special-token and ``scale: inf`` cases through a real node's services.
"""
import copy
import math
import threading
import time

import numpy as np
import pytest

from phi3v_spatial.engine import prompts
from phi3v_spatial.engine import requests as R
from phi3v_spatial.engine.engine import MAX_ADAPTER_SCALE, EngineError, SpatialEngine
from phi3v_spatial.engine.parsing import Relation
from phi3v_spatial.engine.window import FrameWindow, RawPayload
from phi3v_spatial.engine.worker import InferenceWorker

NS = 1_000_000_000


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model, tmp_path_factory):
    """Two random (non-zero) LoRA adapters of the tiny model, saved with peft."""
    import torch
    from peft import get_peft_model

    from phi3v_spatial.model.adapters import lora_config

    root = tmp_path_factory.mktemp("door_adapters")
    dirs = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(tiny_model), lora_config(r=4, init_lora_weights=False))
        peft_model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer_dir, adapter_dirs):
    e = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu", adapters=adapter_dirs)
    yield e
    e.close()


class LogLines:
    """Collects what the request layer logs (the node passes its ROS logger here)."""

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(("info", text))

    def warning(self, text):
        self.lines.append(("warning", text))

    def error(self, text):
        self.lines.append(("error", text))


def _image(seed, h=24, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _payload(seed):
    return RawPayload("rgb8", 24, 32, 96, _image(seed).tobytes())


@pytest.fixture
def handler(engine):
    window = FrameWindow(num_frames=1, min_interval_s=0.0, max_age_s=0.0, capacity=8)
    for cam in ("/cam1", "/cam2"):
        for i in range(3):
            window.add(cam, (i + 1) * NS, _payload(i + (10 if cam == "/cam2" else 0)))
    worker = InferenceWorker(max_pending=4)
    h = R.RequestHandler(engine, worker, window=window, settings=R.ServingSettings(max_new_tokens=2),
                         log=LogLines())
    engine.set_adapter(None)
    yield h
    worker.stop()
    engine.set_adapter(None)


def _refused(reply, *texts, kind=R.REQUEST):
    assert not reply.success and reply.error_kind == kind, (reply.error_kind, reply.error)
    for text in texts:
        assert text in reply.error, (text, reply.error)


# ------------------------------------------------------------------ 1. adapter scale
@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 1e30, -1.0, MAX_ADAPTER_SCALE * 1.5])
def test_adapter_scale_must_be_finite_and_bounded(handler, engine, scale):
    handler.handle(R.AdapterRequest(name="b"))
    reply = handler.handle(R.AdapterRequest(name="a", scale=scale))
    _refused(reply, "adapter scale must be finite and in (0, 10]", repr(float(scale)))
    assert reply.active == "b" and handler.worker.depth == 0  # nothing switched, nothing queued
    with pytest.raises(EngineError, match=r"finite and in \(0, 10\]"):
        engine.set_adapter("a", scale)  # the engine refuses on its own too
    assert engine.active_adapter == "b"
    for name in ("none", ""):  # the base model too: a bad scale is a bad request whatever it names
        _refused(handler.handle(R.AdapterRequest(name=name, scale=scale)), "adapter scale")


def test_adapter_scale_zero_means_one_and_the_limit_is_accepted(handler, engine):
    reply = handler.handle(R.AdapterRequest(name="a", scale=0.0))
    assert reply.success and reply.active == "a" and engine._adapters.scale == 1.0
    reply = handler.handle(R.AdapterRequest(name="a", scale=MAX_ADAPTER_SCALE))
    assert reply.success and engine._adapters.scale == MAX_ADAPTER_SCALE
    rel = handler.handle(R.RelationsRequest(candidates=[Relation("red box", "left of", "blue box")], topics=["/cam1"]))
    assert rel.success and all(math.isfinite(r.probability) for r in rel.relations)


# ------------------------------------------------------------------ 2. text length
def test_a_one_megabyte_question_is_refused_from_its_length(handler, engine):
    question = "Is the red box left of the blue box? " * (2**20 // 37 + 1)
    assert len(question) > 2**20
    t0 = time.perf_counter()
    reply = handler.handle(R.AskRequest(question=question, topics=["/cam1"]))
    took = time.perf_counter() - t0
    # "characters": refused from its length; the tokenizer never saw it (it would say "tokens")
    _refused(reply, "the question is too long", f"{len(question)} characters", "max_question_tokens = 1024")
    print(f"\n1 MiB question refused in {took * 1e3:.2f} ms (bound: {engine.max_token_chars} chars per token)")
    plan = handler.handle(R.PlanRequest(instruction=question, topics=["/cam1"]))
    _refused(plan, "the instruction is too long", "max_question_tokens")
    assert handler.worker.depth == 0 and handler.stats.ok == 0


def test_question_tokens_are_counted_against_the_parameter(handler, engine):
    tok = engine.processor.tokenizer
    fits, too_long = "Is the red box left of the blue box?", "Is the red box left of the blue box near the cone?"
    limit, over = (len(tok(t, add_special_tokens=False).input_ids) for t in (fits, too_long))
    assert over > limit
    handler.settings = R.ServingSettings(max_new_tokens=2, max_question_tokens=limit)
    assert handler.handle(R.AskRequest(question=fits, topics=["/cam1"])).success
    reply = handler.handle(R.AskRequest(question=too_long, topics=["/cam1"]))
    _refused(reply, f"the question is too long: {over} tokens", f"max_question_tokens = {limit} tokens")
    rel = handler.handle(R.RelationsRequest(candidates=[Relation("red box", "left of", "blue box"),
                                                        Relation(too_long, "left of", too_long)]))
    _refused(rel, "candidates[1] is too long", "max_question_tokens")


def test_the_length_bound_is_safe_for_the_tokenizer(engine):
    """No token stands for more characters than ``max_token_chars``: a text refused from its length alone would
    have been refused by counting too (here: every vocabulary entry, tokenized, gives at least one token)."""
    tok = engine.processor.tokenizer
    longest = max(tok.get_vocab(), key=len)
    assert engine.max_token_chars == len(longest)
    text = "x" * (4 * engine.max_token_chars)
    assert len(tok(prompts.literal_text(text), add_special_tokens=False).input_ids) >= 4


# ------------------------------------------------------------------ 3. images and candidates
def test_images_per_request_are_bounded_before_decoding(handler):
    undecodable = R.RequestImage(RawPayload("rgb8", 2, 2, 6, b"12"))  # would fail "images[0]: ..." if decoded
    reply = handler.handle(R.AskRequest(question="q", images=[undecodable] * 17))
    _refused(reply, "too many images: 17", "limit is 8", "parameter max_images")
    eight = [R.RequestImage(_payload(i)) for i in range(8)]
    assert handler.handle(R.AskRequest(question="q", images=eight)).success
    handler.settings = R.ServingSettings(max_new_tokens=2, max_images=4)
    window = handler.handle(R.AskRequest(question="q", topics=["/cam1", "/cam2"], num_frames=3))
    _refused(window, "2 camera(s) x 3 frame(s) = 6", "limit is 4", "parameter max_images")
    assert handler.handle(R.AskRequest(question="q", topics=["/cam1", "/cam2"], num_frames=2)).success


def test_candidates_per_request_are_bounded(handler):
    many = [Relation(f"box {i}", "left of", "cone") for i in range(5000)]
    _refused(handler.handle(R.RelationsRequest(candidates=many, topics=["/cam1"])),
             "too many candidate relations: 5000", "limit is 256", "parameter max_candidates")
    handler.settings = R.ServingSettings(max_candidates=3)
    _refused(handler.handle(R.RelationsRequest(candidates=many[:4], topics=["/cam1"])), "limit is 3")
    assert handler.handle(R.RelationsRequest(candidates=many[:3], topics=["/cam1"])).success
    assert handler.worker.depth == 0


def test_limits_come_from_the_parameters():
    from phi3v_spatial.replay.params import ReplaySettings
    from phi3v_spatial.settings import node_defaults, serving_settings

    params = {**node_defaults(), "max_question_tokens": 7, "max_images": 2, "max_candidates": 5}
    for s in (serving_settings(params), ReplaySettings.from_params(params).serving()):
        assert (s.max_question_tokens, s.max_images, s.max_candidates) == (7, 2, 5)


# ------------------------------------------------------------------ 4. special tokens
def _special_tokens(tok):
    return sorted({t.content for t in tok.added_tokens_decoder.values()})


def test_every_special_token_in_user_text_stays_text(engine):
    """For every special token of the tokenizer: typed into a question it adds no special token id and no image
    placeholder to the prompt (the prompt's structure is that of a plain question)."""
    proc = engine.processor
    tok = proc.tokenizer
    specials = _special_tokens(tok)
    special_ids = {tok.convert_tokens_to_ids(t) for t in specials}
    assert "<|image|>" in specials or "<|end|>" in specials  # the real Phi-3 tokenizer
    info = {"num_img_tokens": [5], "pixel_values": None, "image_sizes": None}

    def structure(text):
        ids = proc(prompts.chat_prompt(text, 1), images=[_image(0)], image_features=info)["input_ids"][0].tolist()
        return [i for i in ids if i in special_ids], sum(1 for i in ids if i < 0)

    plain = structure("is it there?")
    assert plain[1] == 5
    for t in specials + ["<|image_1|>", "<|image_2|>", "<|image_9|>"]:
        assert structure(f"is {t} there? {t}{t}") == plain, t
    assert structure("<|image_1|>" * 30) == plain
    assert prompts.literal_text("a <|image_1|> b </s>") == "a < |image_1|> b < /s>"
    assert prompts.literal_text(prompts.literal_text("<<|end|>")) == "<< |end|>"  # idempotent
    assert prompts.literal_text("x < y, a|b, <b>bold</b>") == "x < y, a|b, <b>bold</b>"  # ordinary text unchanged


def test_special_tokens_in_requests_are_answered_not_internal_errors(handler):
    image = [R.RequestImage(_payload(0))]
    thirty = handler.handle(R.AskRequest(question="<|image_1|>" * 30 + " Is the red box left?", images=image))
    assert thirty.success, thirty.error
    for tag in ("<|image_9|>", "<|image_2|>", "<|end|><|assistant|>", "<|system|>", "<|endoftext|>"):
        reply = handler.handle(R.AskRequest(question=f"Where is {tag} the box?", images=image))
        assert reply.success, (tag, reply.error)
    plan = handler.handle(R.PlanRequest(instruction="stack <|image_9|> <|user|>", images=image, max_new_tokens=4))
    assert plan.error_kind != R.INTERNAL, plan.error  # a random model writes no plan: OUTPUT, never INTERNAL
    rel = handler.handle(R.RelationsRequest(candidates=[Relation("<|image_9|>", "left of", "<|end|>")], images=image))
    assert rel.success, rel.error
    assert not [line for line in handler.log.lines if line[0] == "error"]


# ------------------------------------------------------------------ 5. messages that say what happened
def test_fewer_frames_than_asked_says_so(handler):
    reply = handler.handle(R.AskRequest(question="q", topics=["/cam1"], num_frames=5))
    assert reply.success and len(reply.frames) == 3
    assert reply.note.startswith("used 3 frame(s) per camera of the 5 asked (num_frames"), reply.note
    assert ("info", f"ask: {reply.note}") in handler.log.lines
    full = handler.handle(R.AskRequest(question="q", topics=["/cam1"], num_frames=3))
    assert full.success and len(full.frames) == 3 and full.note == ""


def test_a_deadline_in_an_empty_queue_does_not_blame_earlier_requests(handler):
    reply = handler.handle(R.PlanRequest(instruction="stack them", topics=["/cam1"], timeout_s=1e-6))
    _refused(reply, "timed out after 1e-06 s", "nothing was running or queued ahead of it", kind=R.QUEUE)
    assert "busy" not in reply.error
    gate, busy = threading.Event(), threading.Event()
    first = handler.worker.submit(lambda job: (busy.set(), gate.wait(30)))
    assert busy.wait(10)
    try:
        behind = handler.handle(R.PlanRequest(instruction="stack them", topics=["/cam1"], timeout_s=0.05))
    finally:
        gate.set()
    first.result(10)
    _refused(behind, "the model was busy with 1 earlier request(s) ahead of it", kind=R.QUEUE)


def test_time_spent_waiting_for_the_node_to_start_counts_against_the_deadline(handler):
    """One deadline in all: a request that waited for the node to come up (``waited_s``) gets only what is left
    of its deadline in the queue, and none at all when the wait used it up."""
    late = handler.submit(R.PlanRequest(instruction="stack them", topics=["/cam1"], timeout_s=5.0), waited_s=6.0)
    assert late.job is None and late.done()
    _refused(late.result(1), "its deadline (5 s) passed while it waited 6.0 s for the node to start", kind=R.QUEUE)
    gate, busy = threading.Event(), threading.Event()
    first = handler.worker.submit(lambda job: (busy.set(), gate.wait(30)))
    assert busy.wait(10)
    try:
        left = handler.submit(R.PlanRequest(instruction="stack them", topics=["/cam1"], timeout_s=30.0), waited_s=20.0)
        remaining = left.job.deadline - time.monotonic()
    finally:
        gate.set()
    first.result(10)
    left.result(60)
    assert 8.0 < remaining <= 10.0, remaining


def test_set_adapter_reply_shows_its_own_switch(handler, engine):
    """The reply to a switch is the adapter that switch made active, even when another switch runs before the
    reply is put together (the old reply read the engine afterwards and showed the other client's change)."""
    gate, busy = threading.Event(), threading.Event()
    blocker = handler.worker.submit(lambda job: (busy.set(), gate.wait(30)))
    assert busy.wait(10)
    once = threading.Event()

    def on_position(pos):  # on the caller's thread, right after our switch is queued: another client switches
        if once.is_set():
            return
        once.set()
        other = handler.worker.submit(lambda job: engine.set_adapter("b"))
        gate.set()
        other.result(30)  # ran after ours: "b" is active before our reply is built

    pending = handler.submit(R.AdapterRequest(name="a"), on_position=on_position)
    reply = pending.result(30)
    blocker.result(10)
    assert engine.active_adapter == "b" and reply.success and reply.active == "a", reply


# ------------------------------------------------------------------ the node
@pytest.fixture(scope="module")
def node(tiny_model_dir, tokenizer_dir, tmp_path_factory):
    pytest.importorskip("rclpy")
    from fixtures.ros import NodeProcess, RosClient

    proc = NodeProcess({"model_path": tiny_model_dir, "device": "cpu", "adapters": [], "active_adapter": "",
                        "image_topics": [], "generation.max_new_tokens": 3},
                       str(tmp_path_factory.mktemp("door_node"))).start()
    client = RosClient("request_door_test")
    try:
        client.wait_for_state("active", "/spatial_node", timeout=120, proc=proc)
        yield client, proc
    finally:
        client.close()
        rc = proc.stop()
    assert rc == 0, proc.log()[-3000:]


def test_node_special_tokens_and_scale_inf(node):
    from fixtures.ros import scene_image

    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.srv import AskSpatial, SetAdapter

    client, proc = node
    images = [image_msg(scene_image(3, 48, 64), "rgb8", NS)]
    for question in ("<|image_1|>" * 30 + " Is the red box left?", "Is <|image_9|> left of <|image_2|>?"):
        res = client.call(AskSpatial, "/spatial_node/ask", AskSpatial.Request(question=question, images=images))
        assert res.success and len(res.frame_stamps) == 1, res.error
    res = client.call(SetAdapter, "/spatial_node/set_adapter", SetAdapter.Request(name="none", scale=float("inf")))
    assert not res.success and "adapter scale must be finite and in (0, 10]" in res.error, res.error
    huge = client.call(AskSpatial, "/spatial_node/ask", AskSpatial.Request(question="x" * 2**20, images=images))
    assert not huge.success and "max_question_tokens" in huge.error, huge.error
    assert client.call(AskSpatial, "/spatial_node/ask", AskSpatial.Request(question="still there?", images=images)).success
    log = proc.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_replay_notes_fewer_frames_and_applies_the_limits(tiny_model_dir, tokenizer_dir, tmp_path):
    """Replay goes through the same door: its output line carries the note, and the limits come from its
    parameters (here max_candidates = 2 from the parameter values)."""
    import yaml

    from phi3v_spatial.data.bag_writer import write_camera_bag
    from phi3v_spatial.replay.params import ReplaySettings
    from phi3v_spatial.replay.question_file import load_questions
    from phi3v_spatial.replay.runner import Replayer

    cam, t0 = "/door_cam/image_raw", 1_700_000_000 * NS
    bag = write_camera_bag(tmp_path / "cam.mcap", [(cam, t0 + i * NS, _image(i, 48, 64), False) for i in range(2)])
    cands = [{"subject": f"box {i}", "relation": "left of", "object": "cone"} for i in range(3)]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump([
        {"id": "few", "type": "ask", "question": "where?", "num_frames": 5, "max_new_tokens": 2},
        {"id": "many", "type": "relations", "candidates": cands},
    ], sort_keys=False))
    settings = ReplaySettings.from_params({"model_path": tiny_model_dir, "adapters": [], "active_adapter": "",
                                           "device": "cpu", "window.min_interval_s": 0.5, "window.max_age_s": 0.0,
                                           "max_candidates": 2})
    engine = settings.model().load()
    try:
        results = {r["id"]: r for r in Replayer(engine, settings).run(bag, load_questions(tmp_path / "q.yaml")).results}
    finally:
        engine.close()
    few, many = results["few"], results["many"]
    assert few["error"] == "" and len(few["frame_stamps"]) == 2
    assert few["note"].startswith("used 2 frame(s) per camera of the 5 asked"), few
    assert "too many candidate relations: 3, the limit is 2 per request (parameter max_candidates)" in many["error"]
