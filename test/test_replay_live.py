"""Replay == live node: the same bag played to a real ``spatial_node`` process (use_sim_time, /clock from the bag)
gives the same answers, probabilities and frame stamps as ``phi3v-spatial replay`` with the same parameter file.

This is the guarantee that makes offline replay worth having: a question re-asked over a recorded bag sees the
frames the robot saw. The player publishes the bag's raw CDR bytes from this process and holds /clock at the
question time; the node is a separate process started the way robots start it.
"""
import time

import pytest
import yaml

pytest.importorskip("rclpy")

from fixtures.ros import NodeProcess, RosClient  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
CAM0, CAM1 = "/cam0/image_raw", "/cam1/image_raw/compressed"
NODE = "/spatial_node"
SETTLE_TIMEOUT_S = 30.0  # for the played frames and the held /clock to reach the node (a condition, not a delay)

QUESTIONS = [
    {"id": "ask-both", "at": 0.95, "type": "ask", "question": "Is the red box left of the blue box?"},
    {"id": "rel-cam0", "at": 0.95, "type": "relations", "topics": [CAM0], "num_frames": 3,
     "candidates": [{"subject": "red box", "relation": "left of", "object": "blue box"},
                    {"subject": "blue box", "relation": "above", "object": "red box"}]},
    {"id": "ask-cam1", "at": 1.95, "type": "ask", "question": "What is in front of the camera?", "topics": [CAM1],
     "num_frames": 1, "max_new_tokens": 5},
    {"id": "rel-both", "at": 1.95, "type": "relations",
     "candidates": [{"subject": "red box", "relation": "near", "object": "blue box"}]},
]


def _frames():
    from fixtures.ros import scene_image

    frames = [(CAM0, T0 + i * 200_000_000, scene_image(i, 48, 64), False) for i in range(10)]
    frames += [(CAM1, T0 + 100_000_000 + i * 200_000_000, scene_image(50 + i, 48, 64), True) for i in range(10)]
    return frames


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tokenizer_dir, tmp_path_factory):
    from phi3v_spatial.data.bag_writer import write_camera_bag

    work = tmp_path_factory.mktemp("live")
    bag = write_camera_bag(work / "cams.mcap", _frames())
    params = {
        "use_sim_time": True, "model_path": tiny_model_dir, "device": "cpu", "adapters": [], "active_adapter": "",
        "image_topics": [CAM0, CAM1],
        "window.num_frames": 2, "window.min_interval_s": 0.3, "window.max_age_s": 1.0,
        "generation.max_new_tokens": 4, "request_timeout_s": 120.0, "diagnostics_period_s": 0.1,
    }
    proc = NodeProcess(params, str(work)).start()
    client = RosClient("replay_live_test")
    yield bag, proc, client, work
    client.close()
    rc = proc.stop()
    assert rc == 0, f"spatial_node did not exit cleanly (rc={rc}):\n{proc.log()[-5000:]}"


def _ask_node(client, q):
    from phi3v_spatial_interfaces.msg import ObjectRelation
    from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations

    topics = q.get("topics", [])
    if q["type"] == "ask":
        req = AskSpatial.Request(question=q["question"], image_topics=topics, num_frames=q.get("num_frames", 0),
                                 max_new_tokens=q.get("max_new_tokens", 0))
        return client.call(AskSpatial, f"{NODE}/ask", req)
    req = QueryRelations.Request(candidates=[ObjectRelation(**c) for c in q["candidates"]], image_topics=topics,
                                 num_frames=q.get("num_frames", 0))
    return client.call(QueryRelations, f"{NODE}/query_relations", req)


def _wait_until_node_caught_up(diag: list, t_ns: int, played: dict, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Wait for a /diagnostics message of the node stamped at or after ``t_ns`` (its sim clock has reached the held
    /clock) whose cameras report the newest stamp the player published on each topic (``played``: topic -> list of
    stamps). Then every frame was received: the window the questions see is the one replay builds."""
    end = time.monotonic() + timeout
    seen = None
    while time.monotonic() < end:
        arr = diag[-1] if diag else None  # the newest message decides (the node's clock only moves forward)
        if arr is not None and arr.header.stamp.sec * NS + arr.header.stamp.nanosec >= t_ns:
            cams = {s.name.rsplit(": camera ", 1)[1]: {kv.key: kv.value for kv in s.values}
                    for s in arr.status if ": camera " in s.name}
            seen = {t: cams.get(t, {}).get("latest_stamp_ns") for t in played}
            if all(seen[t] == str(stamps[-1]) for t, stamps in played.items()):
                for t, stamps in played.items():
                    assert cams[t]["received"] == str(len(stamps)), (
                        f"{t}: the node received {cams[t]['received']} of the {len(stamps)} frames played (lost?)")
                return
        time.sleep(0.05)
    want = {t: str(stamps[-1]) for t, stamps in played.items()}
    raise AssertionError(f"after {timeout} s the node had not caught up with bag time {t_ns}: newest /diagnostics "
                         f"stamped >= it reported latest_stamp_ns {seen} (None: no such message), "
                         f"expected {want}")


def test_live_node_answers_like_replay(setup):
    from diagnostic_msgs.msg import DiagnosticArray

    from phi3v_spatial.ros.bag_player import BagPlayer

    bag, proc, client, work = setup
    client.wait_for_state("active", NODE, timeout=120, proc=proc)
    diag = client.collect(DiagnosticArray, "/diagnostics", wait=True)
    player = BagPlayer(client.node, bag, pace_s=0.03)
    try:
        missing = player.wait_for_subscribers(timeout_s=30)
        assert not missing, f"the node did not subscribe to {missing}"
        live = {}
        for at in sorted({q["at"] for q in QUESTIONS}):
            t_ns = T0 + int(at * NS)
            player.play_until(t_ns)
            played = {}
            for topic, stamp, _, _ in sorted(_frames(), key=lambda f: f[1]):
                if stamp <= t_ns:
                    played.setdefault(topic, []).append(stamp)
            _wait_until_node_caught_up(diag, t_ns, played)
            for q in (q for q in QUESTIONS if q["at"] == at):
                live[q["id"]] = _ask_node(client, q)
    finally:
        player.close()

    # the same parameter file, through replay
    from phi3v_spatial.commands.replay import load_engine
    from phi3v_spatial.replay.params import ReplaySettings, load_node_params
    from phi3v_spatial.replay.question_file import load_questions
    from phi3v_spatial.replay.runner import Replayer

    qfile = work / "questions.yaml"
    qfile.write_text(yaml.safe_dump(QUESTIONS, sort_keys=False))
    settings = ReplaySettings.from_params(load_node_params(proc.params_file), proc.params_file)
    engine = load_engine(settings)
    try:
        outcome = Replayer(engine, settings).run(bag, load_questions(qfile))
    finally:
        engine.close()
    replayed = {r["id"]: r for r in outcome.results}

    for q in QUESTIONS:
        node_res, rep = live[q["id"]], replayed[q["id"]]
        assert node_res.success, f"{q['id']}: {node_res.error}\n{proc.log()[-3000:]}"
        assert rep["error"] == "", rep["error"]
        node_stamps = [(s.sec, s.nanosec) for s in node_res.frame_stamps]
        assert node_stamps == [(f["sec"], f["nanosec"]) for f in rep["frame_stamps"]], q["id"]
        node_rels = [(r.subject, r.relation, r.object, r.holds, r.probability) for r in node_res.relations]
        rep_rels = [(r["subject"], r["relation"], r["object"], r["holds"], r["probability"]) for r in rep["relations"]]
        assert [x[:4] for x in node_rels] == [x[:4] for x in rep_rels], q["id"]
        # the service carries float32 probabilities
        assert [x[4] for x in node_rels] == pytest.approx([x[4] for x in rep_rels], abs=1e-6), q["id"]
        if q["type"] == "ask":
            assert node_res.answer == rep["answer"], q["id"]

    # hand-checkable frame choice (num_frames 2/3, keyframes >= 0.3 s apart, both cameras slot by slot)
    ms = lambda rid: [(f["topic"], (f["stamp_ns"] - T0) // 1_000_000) for f in replayed[rid]["frame_stamps"]]  # noqa: E731
    assert ms("ask-both") == [(CAM0, 400), (CAM1, 500), (CAM0, 800), (CAM1, 900)]
    assert ms("rel-cam0") == [(CAM0, 0), (CAM0, 400), (CAM0, 800)]
    assert ms("ask-cam1") == [(CAM1, 1900)]


def test_replay_resolves_the_node_parameters(setup):
    """Replay reads the node's parameter file to the same effective values the running node reports."""
    from rcl_interfaces.srv import GetParameters

    from phi3v_spatial.replay.params import load_node_params, node_defaults

    bag, proc, client, work = setup
    client.wait_for_state("active", NODE, timeout=120, proc=proc)
    names = [n for n in node_defaults() if n != "image_topics"]  # image_topics: replay's default is the whole bag
    from rclpy.parameter import parameter_value_to_python

    expected = {**node_defaults(), **load_node_params(proc.params_file)}
    for n in names:  # one by one: the service answers nothing at all if one name cannot be read
        res = client.call(GetParameters, f"{NODE}/get_parameters", GetParameters.Request(names=[n]), 30)
        want = expected[n]
        if not res.values:
            # an empty list in a params file has no type, so rclpy leaves the parameter unreadable by services
            assert want == [], f"node reports no value for {n}"
            continue
        got = parameter_value_to_python(res.values[0])
        if isinstance(want, float) or isinstance(got, float):
            assert got == pytest.approx(want), n
        elif isinstance(want, list):
            assert list(got) == want, n
        else:
            assert got == want, n
