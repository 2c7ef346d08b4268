"""Replay over many bags, in this process and on a private local Ray instance (2 actors), on real bags.

The Ray run must give the same per-question answers, probabilities and frame stamps as replaying each bag
on its own; an interrupted run (Ctrl-C after the first finished bag) resumes without replaying the bags
already in --out; a broken bag fails alone. Ray starts and stops inside the tests: its processes listen on
loopback only and none is left afterwards.
"""
import json
import os

import pytest
import yaml

from fixtures.processes import alive, descendants, is_loopback, listening_sockets, wait_until_empty
from phi3v_spatial.cli import main
from phi3v_spatial.replay import fleet

pytest.importorskip("ray", reason="ray is pinned in requirements.txt; make setup installs it")

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
CAM0, CAM1 = "/cam0/image_raw", "/cam1/image_raw/compressed"


def frame(i: int, seed: int):
    import numpy as np

    rng = np.random.default_rng([seed, i])
    return rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fleet_data(tmp_path_factory, tiny_model_dir, tokenizer_dir):
    """Four small bags (mcap and sqlite3, different frames) in nested folders, one questions file, the params."""
    from phi3v_spatial.data.bag_writer import write_camera_bag

    root = tmp_path_factory.mktemp("fleet")
    bags = []
    for k in range(4):
        frames = [(CAM0, T0 + i * 100_000_000, frame(i, k), False) for i in range(5)]
        frames += [(CAM1, T0 + i * 100_000_000 + 50_000_000, frame(50 + i, k), True) for i in range(5)]
        folder = root / "archive" / f"robot{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        bags.append(write_camera_bag(folder / f"run{k}.{'mcap' if k % 2 else 'db3'}", frames))
    params = root / "node.yaml"
    params.write_text(yaml.safe_dump({"spatial_node": {"ros__parameters": {
        "model_path": tiny_model_dir, "adapters": [], "active_adapter": "", "image_topics": [CAM0, CAM1],
        "window": {"num_frames": 2, "min_interval_s": 0.15, "max_age_s": 2.0},
        "generation": {"max_new_tokens": 3}, "plan": {"max_new_tokens": 2}}}}))
    questions = root / "questions.yaml"
    questions.write_text(yaml.safe_dump([
        {"id": "ask", "at": 0.25, "type": "ask", "question": "Is the cube left of the cone?", "topics": [CAM0]},
        {"id": "rel", "at": "end", "type": "relations", "candidates": [
            {"subject": "cube", "relation": "left of", "object": "cone"},
            {"subject": "cube", "relation": "behind", "object": "cone"}]},
        {"id": "plan", "at": 0.3, "type": "plan", "instruction": "put the cube on the cone", "topics": [CAM1]},
    ]))
    return {"root": root, "bags": [os.path.abspath(b) for b in bags], "params": str(params), "questions": str(questions)}


def _replay(*argv) -> int:
    return main(["replay", *map(str, argv), "--no-progress"])


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def _same_answer(a: dict, b: dict) -> None:
    assert a["error"] == b["error"]   # plans from a random model do not parse: the same error
    assert a["frame_stamps"] == b["frame_stamps"] and a["frame_stamps"]
    assert a["answer"] == b["answer"] and a["raw_text"] == b["raw_text"] and a["steps"] == b["steps"]
    assert [(r["subject"], r["relation"], r["object"], r["holds"]) for r in a["relations"]] == \
        [(r["subject"], r["relation"], r["object"], r["holds"]) for r in b["relations"]]
    # one process at 2 torch threads, actors at 1: the sums may round differently in the last bits
    assert [r["probability"] for r in a["relations"]] == pytest.approx([r["probability"] for r in b["relations"]],
                                                                      rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def sequential(fleet_data, tmp_path_factory):
    """Every bag replayed on its own by the single-bag command: {(bag, id): result}."""
    out = {}
    for k, bag in enumerate(fleet_data["bags"]):
        path = tmp_path_factory.mktemp("single") / f"{k}.jsonl"
        assert _replay(bag, "--questions", fleet_data["questions"], "--params", fleet_data["params"], "--out", path) == 0
        for r in _lines(path):
            assert "bag" not in r   # the single-bag output is unchanged
            out[(bag, r["id"])] = r
    return out


def test_expand_bags_from_paths_folders_and_globs(fleet_data):
    bags, root = fleet_data["bags"], fleet_data["root"]
    assert fleet.expand_bags([str(root / "archive")]) == (sorted(bags), [])
    assert fleet.expand_bags([str(root / "archive" / "*" / "run[13]")])[0] == [bags[1], bags[3]]
    assert fleet.expand_bags([bags[2], bags[0], bags[2]])[0] == [bags[2], bags[0]]
    got, warnings = fleet.expand_bags([str(root / "nothing*.mcap"), str(root / "missing.mcap")])
    assert got == [str(root / "missing.mcap")] and "matches no bag" in warnings[0]
    assert fleet.single_bag([bags[0]]) and not fleet.single_bag([str(root / "archive")])
    assert fleet.questions_path("{bag}.questions.yaml", "/d/run0.mcap") == "/d/run0.questions.yaml"
    assert fleet.questions_path("{bag}.questions.yaml", "/d/run_folder/") == "/d/run_folder.questions.yaml"


def test_ray_replay_matches_sequential_replay_on_loopback_and_leaves_nothing(fleet_data, sequential, tmp_path,
                                                                           monkeypatch, capsys):
    seen: dict = {}
    real = fleet.bag_lines

    def probe(*a, **kw):   # the real function, plus a look at Ray's processes while the pool is up
        if not seen:
            procs = descendants()
            seen["procs"] = procs
            seen["sockets"] = listening_sockets(procs)
        return real(*a, **kw)

    monkeypatch.setattr(fleet, "bag_lines", probe)
    out = tmp_path / "fleet.jsonl"
    rc = _replay(str(fleet_data["root"] / "archive"), "--questions", fleet_data["questions"], "--params",
                 fleet_data["params"], "--out", out, "--ray", "local", "--actors", "2")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "2 actors x 1 CPU" in printed and "bags: 4 (4 replayed" in printed and "0 failed" in printed

    lines = _lines(out)
    assert [(x["bag"], x["id"]) for x in lines] == [(b, q) for b in sorted(fleet_data["bags"]) for q in ("ask", "rel", "plan")]
    for x in lines:
        _same_answer(x, sequential[(x["bag"], x["id"])])

    # Ray's servers listened on loopback only, and Ray is gone
    assert any("raylet" in c for c in seen["procs"].values()), seen["procs"]
    assert seen["sockets"], "no listening socket seen: the probe looked at the wrong processes"
    assert all(is_loopback(addr) for _, _, addr in seen["sockets"]), seen["sockets"]
    left = wait_until_empty(lambda: alive(seen["procs"]))
    assert not left, {p: seen["procs"][p] for p in left}


def test_interrupted_ray_replay_resumes_without_repeating_finished_bags(fleet_data, sequential, tmp_path,
                                                                         monkeypatch, capsys):
    """Ctrl-C after the first finished bag (a KeyboardInterrupt raised where the driver records it); a rerun
    without --ray keeps that bag's lines as they were and replays only the rest. A truncated bag fails alone,
    and is tried again by the rerun."""
    broken = tmp_path / "broken.mcap"
    with open(os.path.join(fleet_data["bags"][1], "run1.mcap"), "rb") as f:
        broken.write_bytes(f.read()[:-60])
    bags = fleet_data["bags"] + [str(broken)]
    out = tmp_path / "resume.jsonl"
    args = ["--questions", fleet_data["questions"], "--params", fleet_data["params"], "--out", out]

    real_add = fleet.ResultsFile.add

    def add_then_interrupt(self, bag, lines):
        real_add(self, bag, lines)
        if not lines[0].get("bag_error"):
            raise KeyboardInterrupt

    monkeypatch.setattr(fleet.ResultsFile, "add", add_then_interrupt)
    before = set(descendants())
    with pytest.raises(KeyboardInterrupt):
        _replay(*bags, *args, "--ray", "local", "--actors", "2")
    monkeypatch.undo()
    first = _lines(out)
    finished = {x["bag"] for x in first if not x.get("bag_error")}
    assert len(finished) == 1
    # the interrupted run stopped its Ray instance too
    assert not wait_until_empty(lambda: set(descendants()) - before), descendants()

    marked = [dict(x, marker=True) if x["bag"] in finished else x for x in first]
    out.write_text("".join(json.dumps(x) + "\n" for x in marked) + '{"bag": "cut mid-li')   # plus a cut line
    capsys.readouterr()
    assert _replay(*bags, *args) == 1   # the broken bag fails (again), the rest is done
    printed = capsys.readouterr().out
    assert "1 of 5 bags already in" in printed and "bags: 5 (4 replayed in this process, 1 already done), 1 failed" in printed

    lines = _lines(out)
    assert [(x["bag"], x["id"]) for x in lines] == [(b, q) for b in bags for q in ("ask", "rel", "plan")]
    for x in lines:
        if x["bag"] == str(broken):
            assert "cannot read bag" in x["bag_error"] and x["error"]
            continue
        assert x.get("marker") is (True if x["bag"] in finished else None)   # kept, not replayed again
        _same_answer(x, sequential[(x["bag"], x["id"])])
