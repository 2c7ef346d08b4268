"""One request path: the node, bag replay and ``phi3v-spatial ask`` give the same reply to the same request on the
same frames, because all three go through the request layer (``engine/requests.py``).

The frames: two pictures, sent to the node inside the requests, recorded in a bag for replay, and written as PNG
files for the CLI (all lossless). The model is the tiny random checkpoint, so the answers are gibberish, but
deterministic: any difference in defaults, frame order, prompts or decoding between the three shows.
"""
import json

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")

from fixtures.ros import NodeProcess, RosClient, scene_image  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
CAM = "/path_cam/image_raw"
NODE = "/spatial_node"
STAMPS = [T0, T0 + 600_000_000]
QUESTION, INSTRUCTION = "Is the red box left of the blue box?", "put the red box on the blue box"
CANDIDATES = [("red box", "left of", "blue box"), ("blue box", "above", "red box")]
ASK_TOKENS, PLAN_TOKENS = 6, 8


@pytest.fixture(scope="module")
def frames():
    return [scene_image(3, 48, 64), scene_image(4, 48, 64)]


@pytest.fixture(scope="module")
def node_replies(tiny_model_dir, tokenizer_dir, frames, tmp_path_factory):
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.action import Plan
    from phi3v_spatial_interfaces.msg import ObjectRelation
    from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations

    proc = NodeProcess({"model_path": tiny_model_dir, "device": "cpu", "adapters": [], "active_adapter": "",
                        "image_topics": []}, str(tmp_path_factory.mktemp("path_node"))).start()
    client = RosClient("request_path_test", actions={"plan": (Plan, f"{NODE}/plan")})
    try:
        client.wait_for_state("active", NODE, timeout=120, proc=proc)
        images = [image_msg(f, "rgb8", s) for f, s in zip(frames, STAMPS)]
        ask = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question=QUESTION, images=images,
                                                                        max_new_tokens=ASK_TOKENS))
        rel = client.call(QueryRelations, f"{NODE}/query_relations", QueryRelations.Request(
            candidates=[ObjectRelation(subject=s, relation=r, object=o) for s, r, o in CANDIDATES], images=images))
        action = client.actions["plan"]
        assert action.wait_for_server(timeout_sec=20)
        handle = client.wait(action.send_goal_async(Plan.Goal(instruction=INSTRUCTION, images=images,
                                                              max_new_tokens=PLAN_TOKENS)), 30)
        plan = client.wait(handle.get_result_async()).result
    finally:
        client.close()
        rc = proc.stop()
    assert rc == 0, proc.log()[-3000:]
    return {"ask": ask, "relations": rel, "plan": plan}


@pytest.fixture(scope="module")
def replay_results(tiny_model_dir, tokenizer_dir, frames, tmp_path_factory):
    import yaml

    from phi3v_spatial.data.bag_writer import write_camera_bag
    from phi3v_spatial.replay.params import ReplaySettings
    from phi3v_spatial.replay.question_file import load_questions
    from phi3v_spatial.replay.runner import Replayer

    work = tmp_path_factory.mktemp("path_replay")
    bag = write_camera_bag(work / "cam.mcap", [(CAM, s, f, False) for f, s in zip(frames, STAMPS)])
    entries = [
        {"id": "ask", "type": "ask", "question": QUESTION, "num_frames": 2, "max_new_tokens": ASK_TOKENS},
        {"id": "relations", "type": "relations", "num_frames": 2,
         "candidates": [{"subject": s, "relation": r, "object": o} for s, r, o in CANDIDATES]},
        {"id": "plan", "type": "plan", "instruction": INSTRUCTION, "num_frames": 2, "max_new_tokens": PLAN_TOKENS},
    ]
    (work / "q.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    settings = ReplaySettings.from_params({"model_path": tiny_model_dir, "adapters": [], "active_adapter": "",
                                           "device": "cpu", "window.min_interval_s": 0.5, "window.max_age_s": 0.0})
    engine = settings.model().load()
    try:
        outcome = Replayer(engine, settings).run(bag, load_questions(work / "q.yaml"))
    finally:
        engine.close()
    return {r["id"]: r for r in outcome.results}


def _cli(capsys, model_dir, paths, *args):
    from phi3v_spatial.cli import main

    rc = main(["ask", "--model", model_dir, "--device", "cpu", *[x for p in paths for x in ("--image", p)], *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def image_files(frames, tmp_path):
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(tmp_path / f"frame{i}.png"))
        cv2.imwrite(paths[-1], np.ascontiguousarray(f[:, :, ::-1]))
    return paths


def test_node_replay_and_cli_give_the_same_replies(node_replies, replay_results, tiny_model_dir, image_files, capsys):
    ask, rel, plan = node_replies["ask"], node_replies["relations"], node_replies["plan"]
    assert ask.success and rel.success, (ask.error, rel.error)
    for reply in (ask, rel):
        assert [s.sec * NS + s.nanosec for s in reply.frame_stamps] == STAMPS
    for rid in ("ask", "relations", "plan"):
        assert [f["stamp_ns"] for f in replay_results[rid]["frame_stamps"]] == STAMPS, rid

    # ~/ask == replay == phi3v-spatial ask
    assert ask.answer.strip(), "the tiny model produced no text"
    assert replay_results["ask"]["error"] == "" and replay_results["ask"]["answer"] == ask.answer
    rc, out, err = _cli(capsys, tiny_model_dir, image_files, "--max-new-tokens", str(ASK_TOKENS), QUESTION)
    assert rc == 0, err
    assert out.rstrip("\n") == ask.answer

    # ~/query_relations == replay == phi3v-spatial ask --relation (the service carries float32, the CLI 3 decimals)
    node_rel = [(r.subject, r.relation, r.object, r.holds, r.probability) for r in rel.relations]
    rep_rel = [(r["subject"], r["relation"], r["object"], r["holds"], r["probability"])
               for r in replay_results["relations"]["relations"]]
    assert [x[:4] for x in node_rel] == [x[:4] for x in rep_rel]
    assert [x[4] for x in node_rel] == pytest.approx([x[4] for x in rep_rel], abs=1e-6)
    rc, out, err = _cli(capsys, tiny_model_dir, image_files, *[x for c in CANDIDATES for x in ("--relation", *c)], "x")
    assert rc == 0, err
    printed = [float(line.split("p(yes)=")[1].split()[0]) for line in out.strip().splitlines()]
    assert printed == pytest.approx([x[4] for x in node_rel], abs=5e-4)

    # ~/plan == replay == phi3v-spatial ask --plan: the same text, and the same parse (steps, or the same error)
    rep_plan = replay_results["plan"]
    assert plan.raw_text and rep_plan["raw_text"] == plan.raw_text
    node_steps = [{k: getattr(s, k) for k in ("action", "target", "reference", "relation", "detail")} for s in plan.steps]
    assert rep_plan["error"] == plan.error
    assert [{k: v for k, v in s.items() if v} for s in rep_plan["steps"]] == [
        {k: v for k, v in s.items() if v} for s in node_steps]
    rc, out, err = _cli(capsys, tiny_model_dir, image_files, "--plan", "--max-new-tokens", str(PLAN_TOKENS), INSTRUCTION)
    if plan.success:
        assert rc == 0 and json.loads(out) == rep_plan["steps"]
    else:
        assert rc == 1 and f"error: {plan.error}" in err
