"""Frame identity that cannot lie (issue 23, item 1): a different picture under a (topic, header stamp) seen before --
a simulator reset, a camera driver restart, a bag played twice -- gets a fresh answer, never the cached answer of the
earlier picture; the same picture again still comes from the caches.

Real parts: the tiny random checkpoint, the request layer, the worker, the frame window, real rosbag2 bags.
"References" are the engine's answers with every cache off (``EngineOptions.naive()``) for the same pixels.
"""
import shutil

import numpy as np
import pytest
import yaml

from phi3v_spatial.engine import requests as R
from phi3v_spatial.engine.parsing import Relation
from phi3v_spatial.engine.window import FrameWindow, RawPayload
from phi3v_spatial.engine.worker import InferenceWorker

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
CAM = "/cam/image_raw"
CANDIDATES = [R.Relation("cube", "left of", "sphere"), R.Relation("sphere", "above", "table"),
              R.Relation("cup", "behind", "box")]


def picture(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def payload(img: np.ndarray) -> RawPayload:
    h, w, _ = img.shape
    return RawPayload("rgb8", h, w, w * 3, img.tobytes())


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer_dir):
    from phi3v_spatial.engine.engine import SpatialEngine

    e = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference(engine):
    """The same model with every cache off: what a picture's answer must be."""
    from phi3v_spatial.engine.engine import EngineOptions

    return engine.with_options(EngineOptions.naive())


@pytest.fixture
def node(engine):
    """The node's request path without ROS: a window, one worker, the request layer; 'now' set by the test."""
    engine.clear_caches()
    window = FrameWindow(num_frames=2, min_interval_s=0.0, max_age_s=2.0, capacity=4)
    window.add_topic(CAM)
    worker = InferenceWorker(max_pending=2)
    clock = {"now": 0}
    handler = R.RequestHandler(engine, worker, window=window, settings=R.ServingSettings(max_new_tokens=4),
                               clock=lambda: clock["now"])
    yield handler, window, clock
    worker.stop()


def relations(handler, num_frames=1):
    reply = handler.handle(R.RelationsRequest(candidates=CANDIDATES, topics=[CAM], num_frames=num_frames))
    assert reply.success, reply.error
    return [r.probability for r in reply.relations]


def ask(handler, num_frames=1):
    reply = handler.handle(R.AskRequest(question="What is left of the cube?", topics=[CAM], num_frames=num_frames))
    assert reply.success, reply.error
    return reply.answer


def ref_relations(reference, images):
    return [r.probability for r in reference.query_relations([Relation(c.subject, c.relation, c.object)
                                                              for c in CANDIDATES], images)]


def test_another_picture_under_a_seen_topic_and_stamp_gets_a_fresh_answer(node, engine, reference):
    handler, window, clock = node
    a, b = picture(1), picture(2)
    window.add(CAM, T0 + NS, payload(a))
    clock["now"] = T0 + NS
    first, first_answer = relations(handler), ask(handler)
    assert first == pytest.approx(ref_relations(reference, [a]), abs=1e-6)
    # the camera driver restarts and stamps from the same time: another picture under the same (topic, stamp)
    assert window.add(CAM, T0 + NS, payload(b)) == "reset"
    second, second_answer = relations(handler), ask(handler)
    expected = ref_relations(reference, [b])
    assert second == pytest.approx(expected, abs=1e-6)
    assert max(abs(x - y) for x, y in zip(second, first)) > 1e-4  # not the earlier picture's (cached) answer
    assert second_answer == reference.ask("What is left of the cube?", [b], max_new_tokens=4).answer
    assert first_answer == reference.ask("What is left of the cube?", [a], max_new_tokens=4).answer


def test_sim_time_reset_starts_the_camera_afresh_and_answers_about_the_new_run(node, reference):
    """Episode 1 at t = 1..3 s, then use_sim_time restarts at 1 s with another scene: the stamps repeat, the pixels
    do not. Two-frame questions after the reset see only the new episode's frames, answered for their pixels."""
    handler, window, clock = node
    old = {t: picture(10 + t) for t in (1, 2, 3)}
    new = {t: picture(20 + t) for t in (1, 2, 3)}
    for t in (1, 2, 3):
        window.add(CAM, t * NS, payload(old[t]))
    clock["now"] = 3 * NS
    before = relations(handler, num_frames=2)
    assert before == pytest.approx(ref_relations(reference, [old[2], old[3]]), abs=1e-6)
    assert window.add(CAM, 1 * NS, payload(new[1])) == "reset"
    clock["now"] = 1 * NS
    assert handler.handle(R.AskRequest(question="q", topics=[CAM])).frames == [R.FrameRef(CAM, NS)]
    for t in (2, 3):
        assert window.add(CAM, t * NS, payload(new[t])) == "keyframe"
    clock["now"] = 3 * NS
    after = relations(handler, num_frames=2)
    assert after == pytest.approx(ref_relations(reference, [new[2], new[3]]), abs=1e-6)
    assert max(abs(x - y) for x, y in zip(after, before)) > 1e-4
    assert window.stats()[CAM]["resets"] == 1


def test_the_same_pictures_again_still_come_from_the_caches(node, engine):
    """A bag played twice with the same pixels (the stamps go back, the pictures repeat): cache hits, same answers."""
    handler, window, clock = node
    pics = {t: picture(30 + t) for t in range(1, 6)}
    answers = []
    for loop in range(2):
        # the window holds 4 frames: the second loop's first frame is not held any more, so the stamps going back
        # start the camera afresh (a frame still held and sent again would be dropped as a duplicate)
        for t in range(1, 6):
            assert window.add(CAM, t * NS, payload(pics[t])) == ("reset" if loop and t == 1 else "keyframe")
        clock["now"] = 5 * NS
        before = engine.cache_stats()
        answers.append((relations(handler, num_frames=2), ask(handler, num_frames=2)))
        after = engine.cache_stats()
        hits = {k: after[k]["hits"] - before[k]["hits"] for k in after}
        if loop == 1:  # every image embedding and the window's prefix come from the first loop's entries
            assert hits["vision"] >= 2 and hits["prefix"] >= 2, hits
            assert after["vision"]["misses"] == before["vision"]["misses"]
    assert answers[0] == answers[1]


# ---------------------------------------------------------------------------------------------- replay


def write_bag(path, frames):
    from phi3v_spatial.data.bag_writer import write_camera_bag

    return write_camera_bag(path, [(CAM, stamp, img, False) for stamp, img in frames], storage="sqlite3")


def test_replaying_a_bag_path_again_with_other_pixels_gives_fresh_answers(engine, reference, tmp_path):
    """Replay keys frames by (bag path, topic, stamp, digest): a bag re-recorded under the same path with the same
    stamps (a second loop of a simulation) is answered for its own pixels, with the same engine and its caches."""
    from phi3v_spatial.replay.params import ReplaySettings
    from phi3v_spatial.replay.question_file import load_questions
    from phi3v_spatial.replay.runner import Replayer

    qfile = tmp_path / "q.yaml"
    qfile.write_text(yaml.safe_dump([
        {"id": "rel", "at": 0.25, "type": "relations", "topics": [CAM],
         "candidates": [{"subject": c.subject, "relation": c.relation, "object": c.object} for c in CANDIDATES]},
        {"id": "ask", "at": "end", "type": "ask", "question": "What is left of the cube?", "topics": [CAM]},
    ], sort_keys=False))
    questions = load_questions(qfile)
    settings = ReplaySettings(num_frames=1, min_interval_s=0.0, max_age_s=1.0, capacity=8, max_new_tokens=4)
    replayer = Replayer(engine, settings)
    bag_dir = tmp_path / "sim"
    engine.clear_caches()
    outcomes = []
    for loop, seeds in enumerate([(41, 42), (51, 52), (51, 52)]):
        if bag_dir.exists():
            shutil.rmtree(bag_dir)
        pics = [picture(s) for s in seeds]
        bag = write_bag(bag_dir, [(T0, pics[0]), (T0 + NS // 2, pics[1])])
        before = engine.cache_stats()["vision"]
        out = replayer.run(bag, questions)
        hits = engine.cache_stats()["vision"]["hits"] - before["hits"]
        res = {r["id"]: r for r in out.results}
        assert out.exit_code == 0 and not res["rel"]["error"] and not res["ask"]["error"], out.results
        probs = [x["probability"] for x in res["rel"]["relations"]]
        assert probs == pytest.approx(ref_relations(reference, [pics[0]]), abs=1e-6)
        assert res["ask"]["answer"] == reference.ask("What is left of the cube?", [pics[1]], max_new_tokens=4).answer
        outcomes.append((probs, hits))
    (p1, _), (p2, hits2), (p3, hits3) = outcomes
    assert max(abs(x - y) for x, y in zip(p1, p2)) > 1e-4  # loop 2: other pixels, a fresh answer
    assert hits2 == 0 and hits3 >= 2 and p3 == p2  # loop 3: the very same pictures come from the cache
