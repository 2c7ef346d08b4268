"""Bag replay on real rosbag2 bags (sqlite3 and mcap, written with rosbags) and a tiny random model.

The model's answers are gibberish but deterministic, so the tests check what can be checked by hand: which
frames a question at time T sees, that replay answers exactly what the engine answers for those frames, the
scoring machinery (with ``expect`` values taken from a first run) and the errors for damaged bags, missing
topics and empty or stale windows.
"""
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from phi3v_spatial.replay.bag_reader import BagError, FrameReader, bag_info, choose_topics, open_reader
from phi3v_spatial.replay.params import ReplaySettings
from phi3v_spatial.replay.question_file import load_questions
from phi3v_spatial.replay.runner import Replayer

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
CAM0, CAM1 = "/cam0/image_raw", "/cam1/image_raw/compressed"


def rgb(i: int, h: int = 24, w: int = 32) -> np.ndarray:
    """A frame whose pixels say which frame it is (and differ per channel, so RGB/BGR mix-ups show)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 10 * i % 256, (10 * i + 3) % 256, (10 * i + 7) % 256
    a[: h // 2, : w // 2] = 255 - a[: h // 2, : w // 2]
    return a


def write_bag(path, storage, messages):
    """``messages``: (topic, log_ns, kind, stamp_ns, payload) with kind raw|compressed|string; returns ``path``.

    Our own writer (not data/bag_writer.py) because these tests need recording times that differ from header stamps.
    """
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    t = ts.types
    types = {"raw": "sensor_msgs/msg/Image", "compressed": "sensor_msgs/msg/CompressedImage", "string": "std_msgs/msg/String"}
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {}
        for topic, log_ns, kind, stamp_ns, payload in messages:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, types[kind], typestore=ts)
            header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=stamp_ns // NS, nanosec=stamp_ns % NS),
                                              frame_id="cam")
            if kind == "raw":
                h, wd, _ = payload.shape
                msg = t[types[kind]](header=header, height=h, width=wd, encoding="rgb8", is_bigendian=0, step=wd * 3,
                                     data=payload.reshape(-1))
            elif kind == "compressed":
                data = payload if isinstance(payload, bytes) else cv2.imencode(".png", payload[:, :, ::-1])[1].tobytes()
                msg = t[types[kind]](header=header, format="png", data=np.frombuffer(data, np.uint8))
            else:
                msg = t[types[kind]](data=str(payload))
            w.write(conns[topic], log_ns, ts.serialize_cdr(msg, types[kind]))
    return str(path)


def two_camera_messages():
    """cam0 raw at 0.0, 0.2 .. 1.8 s; cam1 (lossless png) at 0.1, 0.3 .. 1.9 s but recorded 0.35 s late, so
    recording order and stamp order disagree; plus a String topic that replay must leave alone."""
    msgs = []
    for i in range(10):
        msgs.append((CAM0, T0 + i * 200_000_000, "raw", T0 + i * 200_000_000, rgb(i)))
        s1 = T0 + 100_000_000 + i * 200_000_000
        msgs.append((CAM1, s1 + 350_000_000, "compressed", s1, rgb(100 + i)))
    msgs.append(("/chatter", T0 + 50_000_000, "string", 0, "hello"))
    return msgs


@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def bag(request, tmp_path_factory):
    return write_bag(tmp_path_factory.mktemp("bags") / f"two_cams_{request.param}", request.param, two_camera_messages())


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer_dir):
    from phi3v_spatial.engine.engine import SpatialEngine

    e = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    yield e
    e.close()


def settings(**kw):
    base = dict(num_frames=1, min_interval_s=0.0, max_age_s=1.0, capacity=8, max_new_tokens=4, plan_max_new_tokens=6)
    base.update(kw)
    return ReplaySettings(**base)


def questions(tmp_path, entries, name="q.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(entries, sort_keys=False))
    return load_questions(p)


def by_id(outcome):
    return {r["id"]: r for r in outcome.results}


# ---------------------------------------------------------------------------------------------- reading


def test_frames_are_read_in_header_stamp_order(bag):
    reader = open_reader(bag)
    try:
        info = bag_info(reader, bag)
        assert info.image_topics == [CAM0, CAM1] and info.topics["/chatter"] == "std_msgs/msg/String"
        assert info.start_ns == T0
        frames = list(FrameReader(reader, info, info.image_topics))
    finally:
        reader.close()
    stamps = [f.stamp_ns for f in frames]
    assert stamps == sorted(stamps) and len(stamps) == 20
    assert [f.topic for f in frames[:4]] == [CAM0, CAM1, CAM0, CAM1]  # interleaved by stamp, not by recording
    assert frames[3].log_time_ns - frames[3].stamp_ns == 350_000_000
    from phi3v_spatial.engine.window import Frame

    assert np.array_equal(Frame(CAM0, 0, frames[2].payload).rgb(), rgb(1))
    assert np.array_equal(Frame(CAM1, 0, frames[3].payload).rgb(), rgb(101))


def test_single_storage_file_without_metadata(bag, tmp_path):
    inner = [f for f in os.listdir(bag) if f.endswith((".mcap", ".db3"))][0]
    lone = tmp_path / inner
    shutil.copy(os.path.join(bag, inner), lone)
    reader = open_reader(lone)
    try:
        info = bag_info(reader, lone)
        assert info.message_count == 21 and info.image_topics == [CAM0, CAM1]
        assert len(list(FrameReader(reader, info, [CAM1]))) == 10
    finally:
        reader.close()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_bag_is_a_clear_error(storage, tmp_path):
    path = write_bag(tmp_path / "cut", storage, two_camera_messages())
    inner = os.path.join(path, [f for f in os.listdir(path) if f != "metadata.yaml"][0])
    with open(inner, "r+b") as f:
        f.truncate(os.path.getsize(inner) // 2)
    with pytest.raises(BagError) as err:
        open_reader(path).close()
    assert str(tmp_path / "cut") in str(err.value) and "truncated or corrupt" in str(err.value)


def test_not_a_bag(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(BagError, match="unknown file type"):
        open_reader(tmp_path / "notes.txt")
    with pytest.raises(BagError, match="does not exist"):
        open_reader(tmp_path / "nothing.mcap")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BagError, match="no metadata.yaml"):
        open_reader(tmp_path / "empty_dir")


def test_missing_and_non_image_topics_are_named(bag):
    reader = open_reader(bag)
    try:
        info = bag_info(reader, bag)
    finally:
        reader.close()
    ok, problems = choose_topics(info, [CAM1, "/chatter", "/cam9/image_raw"])
    assert ok == [CAM1]
    assert "std_msgs/msg/String" in problems["/chatter"] and bag in problems["/chatter"]
    assert "/cam9/image_raw is not in bag" in problems["/cam9/image_raw"] and CAM0 in problems["/cam9/image_raw"]


# ---------------------------------------------------------------------------------------------- answering


def test_question_time_picks_the_frames(bag, engine, tmp_path):
    """A question at T sees frames stamped <= T (header clock), with T as the window's 'now'."""
    q = questions(tmp_path, [
        {"id": "at-0.5", "at": 0.5, "type": "ask", "question": "Where is the cube?", "topics": [CAM0]},
        {"id": "at-exact", "at": 0.4, "type": "ask", "question": "Where is the cube?", "topics": [CAM0]},
        {"id": "absolute", "at": {"sec": T0 // NS + 1, "nanosec": 50_000_000}, "type": "ask",
         "question": "Where is the cube?", "topics": "cam0/image_raw"},
        {"id": "three", "at": 1.05, "type": "ask", "question": "What moved?", "topics": [CAM0], "num_frames": 3},
        {"id": "both", "at": 0.75, "type": "relations", "num_frames": 2,
         "candidates": [{"subject": "cube", "relation": "left of", "object": "sphere"},
                        {"subject": "sphere", "relation": "left of", "object": "cube"}]},
        {"id": "end", "at": "end", "type": "plan", "instruction": "pick up the cube", "topics": [CAM1]},
        {"id": "too-early", "at": 0.05, "type": "ask", "question": "Where?", "topics": [CAM1]},
        {"id": "stale", "at": 4.0, "type": "ask", "question": "Where?", "topics": [CAM0]},
        {"id": "unknown", "at": 1.0, "type": "ask", "question": "Where?", "topics": ["/cam9/image_raw"]},
    ])
    out = Replayer(engine, settings()).run(bag, q)
    r = by_id(out)
    assert out.exit_code == 0 and out.topics == [CAM0, CAM1]
    ms = lambda res: [(f["topic"], (f["stamp_ns"] - T0) // 1_000_000) for f in res["frame_stamps"]]  # noqa: E731
    assert ms(r["at-0.5"]) == [(CAM0, 400)]
    assert ms(r["at-exact"]) == [(CAM0, 400)]
    assert ms(r["absolute"]) == [(CAM0, 1000)] and r["absolute"]["time"]["nanosec"] == 50_000_000
    assert ms(r["three"]) == [(CAM0, 600), (CAM0, 800), (CAM0, 1000)]
    assert ms(r["both"]) == [(CAM0, 400), (CAM1, 500), (CAM0, 600), (CAM1, 700)]  # slot by slot, cameras sorted
    assert ms(r["end"]) == [(CAM1, 1900)] and r["end"]["time"]["stamp_ns"] == T0 + 1_900_000_000
    f = r["at-0.5"]["frame_stamps"][0]
    assert (f["sec"], f["nanosec"]) == (T0 // NS, 400_000_000)
    for ok in ("at-0.5", "at-exact", "absolute", "three", "both"):
        assert r[ok]["error"] == "", r[ok]["error"]
    assert r["end"]["raw_text"] and r["end"]["tokens_generated"] == 6
    # the plan is the engine's for the same frame: the same text, the same steps or the same parse error
    plan = engine.plan("pick up the cube", [rgb(109)], max_new_tokens=6)
    assert (r["end"]["raw_text"], r["end"]["steps"]) == (plan.raw_text, plan.steps)
    assert r["end"]["error"] == (plan.error and f"could not parse a plan from the model output: {plan.error}")

    # replay answers exactly what the engine answers for the same frames, in the same order
    assert r["at-0.5"]["answer"] == engine.ask("Where is the cube?", [rgb(2)], max_new_tokens=4).answer
    assert r["three"]["answer"] == engine.ask("What moved?", [rgb(3), rgb(4), rgb(5)], max_new_tokens=4).answer
    from phi3v_spatial.engine.parsing import Relation

    direct = engine.query_relations([Relation("cube", "left of", "sphere"), Relation("sphere", "left of", "cube")],
                                    [rgb(2), rgb(102), rgb(3), rgb(103)])
    assert [x["probability"] for x in r["both"]["relations"]] == pytest.approx([d.probability for d in direct], abs=1e-6)
    assert all(0.0 < x["probability"] < 1.0 and x["holds"] == (x["probability"] >= 0.5) for x in r["both"]["relations"])

    # unanswerable questions say why, naming the bag, the topic and the time; the others still ran
    assert "no frames received yet on /cam1/image_raw/compressed" in r["too-early"]["error"]
    assert bag in r["too-early"]["error"] and "1700000000.050000000" in r["too-early"]["error"]
    assert "stale camera window" in r["stale"]["error"] and "+4.000 s from the bag start" in r["stale"]["error"]
    assert "camera topic /cam9/image_raw is not replayed" in r["unknown"]["error"]
    assert out.summary["ask"]["errors"] == 3


def test_same_answers_from_both_storages(tmp_path, engine):
    """The storage is an implementation detail: a sqlite3 and an mcap bag of the same frames answer alike."""
    entries = [{"id": "q", "at": 1.0, "type": "ask", "question": "Is the cube left of the sphere?", "num_frames": 2}]
    answers = []
    for storage in ("mcap", "sqlite3"):
        path = write_bag(tmp_path / storage, storage, two_camera_messages())
        answers.append(by_id(Replayer(engine, settings()).run(path, questions(tmp_path, entries)))["q"])
    assert answers[0]["answer"] == answers[1]["answer"] and answers[0]["frame_stamps"] == answers[1]["frame_stamps"]


def test_expect_scoring_with_answers_from_a_first_run(bag, engine, tmp_path):
    entries = [
        {"id": "a", "at": 0.5, "type": "ask", "question": "What is left of the cube?", "topics": [CAM0]},
        {"id": "b", "at": 1.5, "type": "ask", "question": "Is the cube red?", "topics": [CAM1]},
        {"id": "r", "at": 1.0, "type": "relations", "topics": [CAM0],
         "candidates": [{"subject": "cube", "relation": "above", "object": "cone"},
                        {"subject": "cone", "relation": "behind", "object": "cube"}]},
    ]
    first = by_id(Replayer(engine, settings()).run(bag, questions(tmp_path, entries)))
    assert all("correct" not in res for res in first.values())
    entries[0]["expect"] = first["a"]["answer"]
    entries[1]["expect"] = "yes" if first["b"]["answer"].lower().startswith("no") else "no"  # surely wrong
    entries[2]["expect"] = [{**c, "holds": rel["holds"]} for c, rel in zip(entries[2]["candidates"], first["r"]["relations"])]
    second = Replayer(engine, settings()).run(bag, questions(tmp_path, entries, "q2.yaml"))
    r = by_id(second)
    assert r["a"]["answer"] == first["a"]["answer"] and r["a"]["correct"] is True
    assert r["b"]["correct"] is False
    assert r["r"]["correct"] is True and (r["r"]["relations_correct"], r["r"]["relations_expected"]) == (2, 2)
    assert second.summary["ask"]["accuracy"] == pytest.approx(0.5)
    assert second.summary["relations"]["accuracy"] == 1.0 and second.summary["all"]["correct"] == 2

    entries[2]["expect"][1]["holds"] = not entries[2]["expect"][1]["holds"]
    r3 = by_id(Replayer(engine, settings()).run(bag, questions(tmp_path, entries, "q3.yaml")))["r"]
    assert r3["correct"] is False and r3["relations_correct"] == 1


def test_corrupt_frame_fails_only_its_questions(tmp_path, engine):
    msgs = [(CAM0, T0, "raw", T0, rgb(0)), (CAM1, T0, "compressed", T0, b"\x89PNG\r\n\x1a\n garbage"),
            (CAM0, T0 + NS // 2, "raw", T0 + NS // 2, rgb(1))]
    path = write_bag(tmp_path / "corrupt", "mcap", msgs)
    q = questions(tmp_path, [{"id": "bad", "at": 0.1, "type": "ask", "question": "Where?", "topics": [CAM1]},
                             {"id": "good", "at": 0.6, "type": "ask", "question": "Where?", "topics": [CAM0]}])
    r = by_id(Replayer(engine, settings()).run(path, q))
    assert "camera /cam1/image_raw/compressed" in r["bad"]["error"] and "corrupt or unreadable PNG" in r["bad"]["error"]
    assert r["good"]["error"] == "" and r["good"]["frame_stamps"][0]["stamp_ns"] == T0 + NS // 2


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_bag_damaged_mid_file(fill, tmp_path, engine):
    """A chunk overwritten mid-file: rosbags either fails while reading or silently skips the chunk (then only the
    index's message counts tell). Either way replay says the bag is damaged and exits non-zero."""
    path = write_bag(tmp_path / "damaged", "mcap", two_camera_messages())
    inner = os.path.join(path, "damaged.mcap")
    with open(inner, "r+b") as f:
        f.seek(os.path.getsize(inner) // 2)
        f.write(fill * 2000)
    q = questions(tmp_path, [{"id": "early", "at": 0.05, "type": "ask", "question": "Where?", "topics": [CAM0]},
                             {"id": "end", "type": "ask", "question": "Where?", "topics": [CAM0]}])
    out = Replayer(engine, settings()).run(path, q)
    assert out.exit_code == 1 and f"bag {path!r} is damaged" in out.fatal
    for r in out.results:
        assert "is damaged" in (r["error"] or r.get("warning", "")), r


def test_requested_topics_that_cannot_play(bag, engine, tmp_path):
    q = questions(tmp_path, [{"id": "cam1", "at": 1.0, "type": "ask", "question": "Where?", "topics": [CAM1]},
                             {"id": "chatter", "at": 1.0, "type": "ask", "question": "Where?", "topics": ["/chatter"]},
                             {"id": "all", "at": 1.0, "type": "ask", "question": "Where?"}])
    warnings = []
    out = Replayer(engine, settings(), warn=warnings.append).run(bag, q, topics=[CAM1, "/chatter", "/nope"])
    r = by_id(out)
    assert out.topics == [CAM1] and out.exit_code == 0
    assert any("/nope is not in bag" in w for w in warnings) and any("std_msgs/msg/String" in w for w in warnings)
    assert r["cam1"]["error"] == "" and r["cam1"]["frame_stamps"][0]["topic"] == CAM1
    assert "has message type std_msgs/msg/String" in r["chatter"]["error"] and bag in r["chatter"]["error"]
    assert "1700000001.000000000" in r["chatter"]["error"]
    assert "is not in bag" in r["all"]["error"] or "std_msgs/msg/String" in r["all"]["error"]


# ---------------------------------------------------------------------------------------------- the CLI


def _run_cli(*argv):
    from phi3v_spatial.cli import main

    return main(["replay", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_cli_with_params_out_bag_and_synthetic_bag(storage, tmp_path, tiny_model_dir, tokenizer_dir, capsys):
    from phi3v_spatial.data.bag_writer import write_camera_bag

    frames = [(CAM0, T0 + i * 100_000_000, rgb(i), False) for i in range(6)]
    frames += [(CAM1, T0 + i * 100_000_000 + 50_000_000, rgb(50 + i), True) for i in range(6)]
    bag = write_camera_bag(tmp_path / f"synth.{'db3' if storage == 'sqlite3' else 'mcap'}", frames)
    params = tmp_path / "node.yaml"
    params.write_text(yaml.safe_dump({"spatial_node": {"ros__parameters": {
        "use_sim_time": True, "model_path": tiny_model_dir, "adapters": [], "active_adapter": "",
        "image_topics": [CAM0], "window": {"num_frames": 2, "min_interval_s": 0.15, "max_age_s": 2.0},
        "generation": {"max_new_tokens": 3}, "plan": {"max_new_tokens": 2}}}}))
    qfile = tmp_path / "questions.yaml"
    qfile.write_text(yaml.safe_dump({"questions": [
        {"id": "ask", "at": 0.55, "type": "ask", "question": "Is the cube near the cone?", "expect": "yes"},
        {"id": "rel", "at": "end", "type": "relations", "candidates": [{"subject": "cube", "relation": "near", "object": "cone"}]},
        {"id": "plan", "at": 0.3, "type": "plan", "instruction": "stack the cube on the cone"},
        {"id": "cam1", "at": 0.3, "type": "ask", "question": "What is this?", "topics": [CAM1]},
        {"id": "broken", "type": "ask"},
    ]}))
    out = tmp_path / "results.jsonl"
    rc = _run_cli(bag, "--questions", qfile, "--params", params, "--out", out, "--out-bag", tmp_path / "answers")
    printed = capsys.readouterr().out
    assert rc == 0
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(results) == ["ask", "rel", "plan", "cam1", "broken"]
    # window parameters from the file, only image_topics (cam0) replayed: keyframes >= 0.15 s apart are 0.0, 0.2,
    # 0.4; the latest frame (0.5) plus the newest keyframe >= 0.15 s older than it (0.2, as 0.4 is too close)
    assert [f["stamp_ns"] - T0 for f in results["ask"]["frame_stamps"]] == [200_000_000, 500_000_000]
    from phi3v_spatial.replay.scoring import yes_no

    # scored against expect "yes": correct exactly when the answer's first word is yes
    assert results["ask"]["tokens_generated"] == 3
    assert results["ask"]["correct"] is (yes_no(results["ask"]["answer"]) == "yes")
    # the plan's own limit from the file (2; the random model emits no stop token that early with either tokenizer)
    assert results["plan"]["tokens_generated"] == 2
    assert "camera topic /cam1/image_raw/compressed is not replayed" in results["cam1"]["error"]
    assert "non-empty 'question'" in results["broken"]["error"]
    assert "accuracy" in printed and "ask" in printed and "results:" in printed

    from rosbags.rosbag2 import Reader

    from phi3v_spatial.replay.outbag import RELATIONS_TYPE, interface_typestore

    ts = interface_typestore()
    with Reader(tmp_path / "answers") as r:
        topics = {c.topic: c.msgcount for c in r.connections}
        assert topics[CAM0] == 6 and topics[CAM1] == 6
        assert topics["/spatial_node/relations"] == 2 and topics["/spatial_node/plans"] == 1
        rel_conns = [c for c in r.connections if c.topic == "/spatial_node/relations"]
        msgs = [(t, ts.deserialize_cdr(raw, RELATIONS_TYPE)) for _, t, raw in r.messages(connections=rel_conns)]
    (t_rel, rel_msg), (t_ask, ask_msg) = msgs  # 'end' = the last replayed frame (cam0 at 0.5 s) comes first
    assert t_rel == T0 + 500_000_000
    assert t_ask == T0 + 550_000_000 and ask_msg.answer == results["ask"]["answer"]
    assert ask_msg.header.stamp.nanosec == 500_000_000 and list(ask_msg.image_topics) == [CAM0]
    assert rel_msg.question == "" and rel_msg.relations[0].probability == pytest.approx(results["rel"]["relations"][0]["probability"])


def test_cli_unreadable_bag_exits_nonzero_with_errors_per_question(tmp_path, tiny_model_dir, tokenizer_dir):
    path = write_bag(tmp_path / "cut", "mcap", two_camera_messages())
    inner = os.path.join(path, "cut.mcap")
    with open(inner, "r+b") as f:
        f.truncate(os.path.getsize(inner) - 40)
    qfile = tmp_path / "q.yaml"
    qfile.write_text(yaml.safe_dump([{"id": "q", "at": 1, "type": "ask", "question": "Where?"}]))
    out = tmp_path / "r.jsonl"
    assert _run_cli(path, "--questions", qfile, "--model", tiny_model_dir, "--out", out) == 1
    (res,) = map(json.loads, out.read_text().splitlines())
    assert res["id"] == "q" and "cannot read bag" in res["error"] and "cut" in res["error"]
    bad_questions = tmp_path / "bad.yaml"
    bad_questions.write_text("{not: [valid")
    assert _run_cli(path, "--questions", bad_questions, "--model", tiny_model_dir) == 2


def test_synth_bag_and_questions_replay_cleanly(tmp_path, engine):
    """`phi3v-spatial synth --bag` writes questions in replay's format: every entry parses and finds its frames."""
    from phi3v_spatial.cli import main

    assert main(["synth", "--out", str(tmp_path / "syn"), "--num", "2", "--frames", "2", "--cameras", "2",
                 "--bag", str(tmp_path / "syn.db3"), "--quiet"]) == 0
    q = load_questions(tmp_path / "syn.questions.yaml")
    assert q and all(x.error == "" for x in q) and {x.type for x in q} == {"ask", "relations", "plan"}
    out = Replayer(engine, settings(max_age_s=2.0)).run(str(tmp_path / "syn"), q)
    assert out.exit_code == 0 and out.info.storage == "sqlite3"
    for r in out.results:
        assert r["frame_stamps"], r
        assert r["error"] == "" or r["error"].startswith("could not parse a plan"), r["error"]
        assert isinstance(r["correct"], bool) and not (r["error"] and r["correct"]), r  # an error is never correct
    assert out.summary["all"]["scored"] == len(q)
    assert out.summary["all"]["correct"] == sum(r["correct"] for r in out.results)


def test_an_engine_failure_fails_only_its_question_simulated_oom(bag, engine, tmp_path, monkeypatch):
    """A CUDA out-of-memory cannot happen here, so ask() is made to raise one for a single question (a stand-in)."""
    real_ask = engine.ask

    def ask(question, *a, **kw):
        if "boom" in question:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_ask(question, *a, **kw)

    monkeypatch.setattr(engine, "ask", ask)
    entries = [{"id": "bad", "at": 0.5, "type": "ask", "question": "boom?", "topics": [CAM0]},
               {"id": "good", "at": 0.5, "type": "ask", "question": "Is the cube red?", "topics": [CAM0]}]
    r = by_id(Replayer(engine, settings()).run(bag, questions(tmp_path, entries)))
    assert "unexpected RuntimeError: CUDA out of memory" in r["bad"]["error"]
    assert not r["good"].get("error") and isinstance(r["good"]["answer"], str)
