"""spatial_node end to end: a real node process on a tiny random checkpoint, cameras published from this process.

The model is random, so answers are gibberish; the tests check plumbing and behaviour (answers arrive,
feedback streams, cancel, full queue, stale window, bad images), never answer quality or timing.
"""
import threading
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from fixtures.ros import CameraPublisher, NodeProcess, RosClient, scene_image  # noqa: E402

pytestmark = pytest.mark.timeout(300)

FRONT, SIDE = "/cam_front/image_raw", "/cam_side/image_raw/compressed"
STALE, BAD, BIG = "/cam_stale/image_raw", "/cam_bad/image", "/cam_big/image"
NODE = "/spatial_node"


@pytest.fixture(scope="module")
def node_proc(endless_model_dir, tokenizer_dir, tmp_path_factory):
    params = {
        "model_path": endless_model_dir, "device": "cpu", "adapters": [], "active_adapter": "",
        "image_topics": [FRONT, SIDE, STALE, BAD + ":compressed", BIG + ":compressed"],
        "window.num_frames": 2, "window.min_interval_s": 0.2, "window.max_age_s": 5.0,
        "queue.max_pending": 1, "generation.max_new_tokens": 8, "plan.max_new_tokens": 24,
        "request_timeout_s": 120.0, "diagnostics_period_s": 0.5,
    }
    proc = NodeProcess(params, str(tmp_path_factory.mktemp("node"))).start()
    yield proc
    rc = proc.stop()
    assert rc == 0, f"spatial_node did not exit cleanly on SIGINT (rc={rc}):\n{proc.log()[-5000:]}"
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


@pytest.fixture(scope="module")
def client(node_proc):
    from phi3v_spatial.ros.messages import compressed_msg, image_msg
    from sensor_msgs.msg import CompressedImage

    from phi3v_spatial_interfaces.action import Plan

    c = RosClient(actions={"plan": (Plan, f"{NODE}/plan")})
    big = np.zeros((8000, 8000, 3), np.uint8)  # a real 8000x8000 frame (PNG keeps the transport small)
    big_png = compressed_msg(big, "png")

    def corrupt(stamp):
        m = CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0" + bytes(300))
        m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        return m

    def big_frame(stamp):
        big_png.header.stamp.sec, big_png.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        return big_png

    cams = CameraPublisher(c, {FRONT: "raw", SIDE: "jpeg", BAD: corrupt, BIG: big_frame}, rate_hz=10)
    stale = CameraPublisher(c, {STALE: "raw"}, rate_hz=5, stamp_offset_s=-30.0)
    c.wait_for_state("active", NODE, timeout=120, proc=node_proc)
    # wait until both good cameras fill the node's window: window.num_frames (2) keyframes each, which takes
    # best-effort discovery plus window.min_interval_s; a loaded machine can answer before the second keyframe
    from phi3v_spatial_interfaces.srv import AskSpatial

    end = time.monotonic() + 30
    while True:
        r = c.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="ready?", image_topics=[FRONT, SIDE],
                                                                   max_new_tokens=1))
        if (r.success and len(r.frame_stamps) == 4) or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert r.success, r.error
    assert len(r.frame_stamps) == 4, f"window never held 2 frames per camera: {len(r.frame_stamps)} frames"
    yield c
    cams.stop()
    stale.stop()
    c.close()


def test_ask_uses_both_cameras_and_publishes_relations(client, node_proc):
    from phi3v_spatial_interfaces.msg import RelationsStamped
    from phi3v_spatial_interfaces.srv import AskSpatial

    published = client.collect(RelationsStamped, f"{NODE}/relations", wait=True)  # matched before asking
    req = AskSpatial.Request(question="Is the red box left of the blue box?", image_topics=[FRONT, SIDE + ":compressed"])
    res = client.call(AskSpatial, f"{NODE}/ask", req)
    assert res.success, res.error
    assert res.answer.strip() and res.latency_s > 0  # 8 tokens of the endless model: never empty
    stamps = [s.sec * 10**9 + s.nanosec for s in res.frame_stamps]
    assert len(stamps) == 4 and all(s > 0 for s in stamps)  # 2 frames x 2 cameras
    req1 = AskSpatial.Request(question="Where is the box?", image_topics=[FRONT], num_frames=1, max_new_tokens=3)
    res1 = client.call(AskSpatial, f"{NODE}/ask", req1)
    assert res1.success and len(res1.frame_stamps) == 1 and res1.note == ""
    # more frames than the window keeps (window.capacity 8): answered with what there is, and the reply says so
    req12 = AskSpatial.Request(question="Where is the box?", image_topics=[FRONT], num_frames=12, max_new_tokens=3)
    res12 = client.call(AskSpatial, f"{NODE}/ask", req12)
    assert res12.success, res12.error
    assert len(res12.frame_stamps) < 12 and f"used {len(res12.frame_stamps)} frame(s) per camera of the 12 asked" in res12.note
    end = time.monotonic() + 10
    while len(published) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert any(m.question == req.question and m.answer == res.answer and sorted(m.image_topics) == sorted([FRONT, SIDE])
               for m in published)


def test_request_images_override_the_window(client):
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.srv import AskSpatial

    imgs = [image_msg(scene_image(1), "rgb8", 123), image_msg(scene_image(2)[:, :, ::-1], "bgr8", 456)]
    res = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="What is left?", images=imgs,
                                                                    image_topics=[STALE]))
    assert res.success, res.error  # the stale topic is ignored because images were given
    assert [s.nanosec for s in res.frame_stamps] == [123, 456]


def test_query_relations_scores_every_candidate(client):
    from phi3v_spatial_interfaces.msg import ObjectRelation
    from phi3v_spatial_interfaces.srv import QueryRelations

    cands = [ObjectRelation(subject="red box", relation="left of", object="blue box"),
             ObjectRelation(subject="red box", relation="above", object="blue box")]
    res = client.call(QueryRelations, f"{NODE}/query_relations",
                      QueryRelations.Request(candidates=cands, image_topics=[FRONT]))
    assert res.success, res.error
    assert [(r.subject, r.relation, r.object) for r in res.relations] == [(c.subject, c.relation, c.object) for c in cands]
    for r in res.relations:
        assert 0.0 <= r.probability <= 1.0 and r.holds == (r.probability >= 0.5)
    bad = client.call(QueryRelations, f"{NODE}/query_relations",
                      QueryRelations.Request(candidates=[ObjectRelation(subject="cup")], image_topics=[FRONT]))
    assert not bad.success and "candidates[0] needs subject, relation and object" in bad.error
    empty = client.call(QueryRelations, f"{NODE}/query_relations", QueryRelations.Request(image_topics=[FRONT]))
    assert not empty.success and "no candidate" in empty.error


def test_set_adapter(client):
    from phi3v_spatial_interfaces.srv import SetAdapter

    res = client.call(SetAdapter, f"{NODE}/set_adapter", SetAdapter.Request(name="none"))
    assert res.success and res.active == "" and list(res.available) == []
    res = client.call(SetAdapter, f"{NODE}/set_adapter", SetAdapter.Request(name="bogus", scale=1.0))
    assert not res.success and "unknown adapter 'bogus'" in res.error


def vars_(step) -> dict:
    return {k: getattr(step, k) for k in ("action", "target", "reference", "relation", "detail")}


def _send_plan(client, goal, feedback):
    plan = client.actions["plan"]
    assert plan.wait_for_server(timeout_sec=20)
    handle = client.wait(plan.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback)), 30)
    assert handle.accepted
    return handle


def test_plan_streams_feedback_and_returns_a_result(client, endless_model_dir):
    from phi3v_spatial.engine.engine import SpatialEngine
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.action import Plan
    from phi3v_spatial_interfaces.msg import PlanStamped

    plans = client.collect(PlanStamped, f"{NODE}/plans", wait=True)  # matched before the goal is sent
    fb = []
    frame = scene_image(5)
    handle = _send_plan(client, Plan.Goal(instruction="put the red box on the blue box", images=[image_msg(frame)],
                                          max_new_tokens=24), fb)
    res = client.wait(handle.get_result_async()).result
    assert res.raw_text and res.latency_s > 0
    # the result is the engine's plan for that frame: the same text, and the same steps or the same parse error
    expected = SpatialEngine.from_pretrained(endless_model_dir, device="cpu").plan(
        "put the red box on the blue box", [frame], max_new_tokens=24)
    assert res.raw_text == expected.raw_text and res.success == (not expected.error)
    assert [{k: v for k, v in vars_(s).items() if v} for s in res.steps] == [
        {k: v for k, v in s.items() if v} for s in expected.steps]
    assert res.error == (expected.error and f"could not parse a plan from the model output: {expected.error}")
    gen = [f for f in fb if f.stage == "generating"]
    assert gen and gen[-1].tokens_generated >= 1 and gen[-1].partial_text
    assert all(len(a.partial_text) <= len(b.partial_text) for a, b in zip(gen, gen[1:]))
    end = time.monotonic() + 10
    while not plans and time.monotonic() < end:
        time.sleep(0.1)
    assert plans and plans[-1].instruction == "put the red box on the blue box" and plans[-1].raw_text == res.raw_text


def test_cancel_queue_position_and_full_queue(client):
    """max_pending=1: one long plan runs; a second gets the model at the first one's next pause (fair share) and
    runs; a third waits (position 1), an ask is rejected at once; all three cancel."""
    from action_msgs.msg import GoalStatus
    from phi3v_spatial_interfaces.action import Plan
    from phi3v_spatial_interfaces.srv import AskSpatial

    fb1, fb2, fb3 = [], [], []
    long_goal = Plan.Goal(instruction="describe everything at length", image_topics=[FRONT], max_new_tokens=8000)

    def wait_stage(feedback, stage, timeout):
        end = time.monotonic() + timeout
        while not any(f.stage == stage for f in feedback) and time.monotonic() < end:
            time.sleep(0.05)
        assert any(f.stage == stage for f in feedback), f"never reached {stage!r}: {[f.stage for f in feedback]}"

    h1 = _send_plan(client, long_goal, fb1)
    wait_stage(fb1, "generating", 30)
    h2 = _send_plan(client, long_goal, fb2)
    wait_stage(fb2, "generating", 30)  # run within the first plan's pause between tokens
    h3 = _send_plan(client, long_goal, fb3)
    wait_stage(fb3, "queued", 10)
    assert [f.queue_position for f in fb3 if f.stage == "queued"][:1] == [1]

    rejected = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="anything?", image_topics=[FRONT]), 30)
    assert not rejected.success and "queue is full" in rejected.error and "queue.max_pending" in rejected.error

    tokens_at_cancel = max(f.tokens_generated for f in fb1)
    for h in (h3, h2, h1):
        client.wait(h.cancel_goal_async(), 30)
    results = [client.wait(h.get_result_async(), 60) for h in (h1, h2, h3)]
    assert all(r.status == GoalStatus.STATUS_CANCELED for r in results), [r.status for r in results]
    assert all(not r.result.success and "cancelled" in r.result.error for r in results[:2]), results
    assert tokens_at_cancel < 8000 and not any(f.stage == "generating" for f in fb3)
    # the node keeps serving
    ok = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="still there?", image_topics=[FRONT]))
    assert ok.success, ok.error


def test_parameter_services_answer_while_the_model_generates(client):
    from rcl_interfaces.srv import GetParameters
    from phi3v_spatial_interfaces.action import Plan

    fb = []
    h = _send_plan(client, Plan.Goal(instruction="long", image_topics=[FRONT], max_new_tokens=8000), fb)
    end = time.monotonic() + 30
    while not any(f.stage == "generating" for f in fb) and time.monotonic() < end:
        time.sleep(0.05)
    res = client.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=["queue.max_pending"]), 30)
    assert res.values[0].integer_value == 1
    assert client.get_state(NODE) == "active"
    client.wait(h.cancel_goal_async(), 30)
    assert not client.wait(h.get_result_async(), 60).result.success


def test_parameters_are_validated_on_set(client):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    def set_(name, **value):
        v = ParameterValue(**value)
        req = SetParameters.Request(parameters=[Parameter(name=name, value=v)])
        return client.call(SetParameters, f"{NODE}/set_parameters", req, 30).results[0]

    r = set_("window.num_frames", type=ParameterType.PARAMETER_INTEGER, integer_value=0)
    assert not r.successful
    r = set_("active_adapter", type=ParameterType.PARAMETER_STRING, string_value="nope")
    assert not r.successful and "unknown adapter 'nope'" in r.reason
    r = set_("model_path", type=ParameterType.PARAMETER_STRING, string_value="/elsewhere")
    assert not r.successful  # read-only: changing the model needs a restart
    r = set_("window.max_age_s", type=ParameterType.PARAMETER_DOUBLE, double_value=6.0)
    assert r.successful
    r = set_("image_topics", type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=["/front//image"])
    assert not r.successful and "invalid topic name '/front//image'" in r.reason


def test_stale_window_is_an_error_naming_the_topic(client):
    from phi3v_spatial_interfaces.srv import AskSpatial

    res = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="what now?", image_topics=[STALE]))
    assert not res.success
    assert "stale camera window" in res.error and STALE in res.error and "max_age_s" in res.error
    res = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="what now?", image_topics=["/nope"]))
    assert not res.success and "/nope not subscribed" in res.error


def test_bad_images_fail_with_reasons_and_the_node_keeps_serving(client, node_proc):
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.srv import AskSpatial
    from sensor_msgs.msg import Image

    def ask(**kw):
        return client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="where?", **kw), 60)

    wrong = image_msg(scene_image(0), "rgb8")
    wrong.encoding = "yuv999"
    short = image_msg(scene_image(0), "rgb8")
    short.data = bytes(short.data)[:-5]
    empty = Image(encoding="rgb8")
    depth = image_msg(np.zeros((4, 4, 2), np.uint8).reshape(4, 8), "mono8")
    depth.encoding, depth.step = "16UC1", 8
    cases = [
        (dict(images=[wrong]), "unsupported image encoding 'yuv999'"),
        (dict(images=[image_msg(scene_image(0), "rgb8"), short]), "images[1]: image data size mismatch"),
        (dict(images=[empty]), "empty image"),
        (dict(images=[depth]), "depth image"),
        (dict(image_topics=[BAD]), f"camera {BAD}: corrupt or unreadable JPEG"),
        (dict(image_topics=[BIG + ":compressed"]), "image is too large: 8000x8000"),
    ]
    for kw, expected in cases:
        res = ask(**kw)
        assert not res.success and expected in res.error, (expected, res.error)
    res = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="  ", image_topics=[FRONT]), 60)
    assert not res.success and "question is empty" in res.error
    assert "max_image_pixels" in ask(image_topics=[BIG]).error
    ok = ask(image_topics=[FRONT])
    assert ok.success, ok.error
    assert node_proc.alive


def test_diagnostics_report_model_queue_and_cameras(client):
    from diagnostic_msgs.msg import DiagnosticArray

    got = client.collect(DiagnosticArray, "/diagnostics")
    end = time.monotonic() + 15
    while len(got) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert got
    status = {s.name: s for s in got[-1].status}
    inference = next(s for n, s in status.items() if n.endswith(": inference"))
    values = {kv.key: kv.value for kv in inference.values}
    assert values["model_loaded"] == "true" and values["lifecycle_state"] == "active" and values["device"] == "cpu"
    assert "queue_depth" in values and values["last_latency_s"]
    front = next(s for n, s in status.items() if n.endswith(f"camera {FRONT}"))
    assert int({kv.key: kv.value for kv in front.values}["received"]) > 0


def _inference_values(client):
    from diagnostic_msgs.msg import DiagnosticArray

    got = client.collect(DiagnosticArray, "/diagnostics")
    end = time.monotonic() + 15
    while len(got) < 2 and time.monotonic() < end:
        time.sleep(0.1)
    status = next(s for s in got[-1].status if s.name.endswith(": inference"))
    return {kv.key: kv.value for kv in status.values}


def test_repeated_questions_on_the_same_frames_reuse_work(client):
    """A second query on the same frames is answered from the node's caches, with the same probabilities."""
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.msg import ObjectRelation
    from phi3v_spatial_interfaces.srv import QueryRelations

    before = _inference_values(client)
    assert before["quantization"] == "none" and before["skip_padding_crops"] == "true"
    assert before["batched_relations"] == "true" and before["pinned_upload"] == "false"
    imgs = [image_msg(scene_image(7), "rgb8", 11), image_msg(scene_image(8), "rgb8", 12)]
    a = ObjectRelation(subject="red box", relation="left of", object="blue box")
    b = ObjectRelation(subject="green ball", relation="in front of", object="red box")
    first = client.call(QueryRelations, f"{NODE}/query_relations", QueryRelations.Request(candidates=[a, b], images=imgs))
    again = client.call(QueryRelations, f"{NODE}/query_relations", QueryRelations.Request(candidates=[b], images=imgs))
    assert first.success and again.success, (first.error, again.error)
    assert again.relations[0].probability == pytest.approx(first.relations[1].probability, abs=1e-5)
    after = _inference_values(client)
    assert int(after["cache.vision.hits"]) >= int(before["cache.vision.hits"]) + 2  # both frames, second request
    assert int(after["cache.prefix.hits"]) >= int(before["cache.prefix.hits"]) + 1
