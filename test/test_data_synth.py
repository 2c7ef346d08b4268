"""Synthetic scenes: reproducible, geometrically right, and their labels follow the 3D truth."""
import copy
import json
import os
import re

import numpy as np
import pytest

from phi3v_spatial.data.records import read_jsonl
from phi3v_spatial.data.render import render
from phi3v_spatial.data.scene import SynthObject, look_at, shape_dims
from phi3v_spatial.data.synth import generate_dataset, make_scene, relation_holds, scene_records
from phi3v_spatial.engine import prompts


def _obj(colour, shape, size, pos):
    return SynthObject(colour=colour, shape=shape, size=size, positions=[np.asarray(pos, float)], dims=shape_dims(shape, size))


# --- determinism -----------------------------------------------------------------------------------------

def test_same_seed_same_scene_different_seed_different():
    a, b, c = make_scene(11, cameras=2, frames=2, motion="object"), make_scene(11, cameras=2, frames=2, motion="object"), make_scene(12)
    assert a.names == b.names
    for cam in range(2):
        for f in range(2):
            assert np.array_equal(a.images[cam][f], b.images[cam][f])
    assert a.images[0][0].dtype == np.uint8 and a.images[0][0].shape == (120, 160, 3)
    assert not np.array_equal(a.images[0][0], c.images[0][0])


def test_generate_dataset_is_bit_identical_for_a_seed(tmp_path):
    p1 = generate_dataset(str(tmp_path / "a"), 4, seed=3, size=(96, 72))
    p2 = generate_dataset(str(tmp_path / "b"), 4, seed=3, size=(96, 72))
    p3 = generate_dataset(str(tmp_path / "c"), 4, seed=4, size=(96, 72))
    assert open(p1, "rb").read() == open(p2, "rb").read()
    assert open(p1, "rb").read() != open(p3, "rb").read()
    imgs = sorted(os.listdir(tmp_path / "a" / "images"))
    assert imgs and imgs == sorted(os.listdir(tmp_path / "b" / "images"))
    for name in imgs:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert (tmp_path / "a" / "images" / imgs[0]).read_bytes() != (tmp_path / "c" / "images" / imgs[0]).read_bytes()
    for r in read_jsonl(p1):
        assert all(os.path.isfile(tmp_path / "a" / p) for p in r.images)


# --- geometry ---------------------------------------------------------------------------------------------

def test_projection_of_known_points():
    cam = look_at((0, 0, 1), (0, 5, 1), (160, 120))  # level camera looking down +Y
    f = cam.fx
    uv, z = cam.project(np.array([[0, 5, 1], [1, 5, 1], [0, 5, 0], [-1, 10, 1]], float))
    assert np.allclose(uv[0], [79.5, 59.5]) and np.isclose(z[0], 5)
    assert np.allclose(uv[1], [79.5 + f / 5, 59.5])   # right in the world -> right in the image
    assert np.allclose(uv[2], [79.5, 59.5 + f / 5])   # lower in the world -> lower in the image
    assert np.allclose(uv[3], [79.5 - f / 10, 59.5])


def test_rendered_object_lands_on_its_projection():
    cam = look_at((0, 0, 1.3), (0, 3.0, 0.1), (160, 120))
    o = _obj("red", "sphere", 0.4, (0.7, 3.0, 0.2))
    _, mask = render([o], cam)
    vs, us = np.nonzero(mask == 1)
    expected = cam.project(o.positions[0][None])[0][0]
    assert abs(us.mean() - expected[0]) < 1.0 and abs(vs.mean() - expected[1]) < 1.0


def test_farther_object_renders_smaller():
    cam = look_at((0, 0, 1.3), (0, 3.0, 0.1), (160, 120))
    near = render([_obj("blue", "cube", 0.5, (0, 2.0, 0.25))], cam)[1]
    far = render([_obj("blue", "cube", 0.5, (0, 4.5, 0.25))], cam)[1]
    assert (near == 1).sum() > 2.5 * (far == 1).sum() > 0


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_painter_draws_the_nearer_object_on_top(order):
    cam = look_at((0, 0, 1.3), (0, 3.0, 0.1), (160, 120))
    near = _obj("red", "cube", 0.5, (0.0, 2.2, 0.25))
    far = _obj("green", "cube", 0.7, (0.0, 4.0, 0.35))  # straight behind: partly hidden
    objs = [[near, far][i] for i in order]
    img, mask = render(objs, cam)
    near_id, far_id = objs.index(near) + 1, objs.index(far) + 1
    u, v = np.round(cam.project(near.positions[0][None])[0][0]).astype(int)
    assert mask[v, u] == near_id
    assert img[v, u, 0] > img[v, u, 1]  # red, not green, at the near object's centre
    alone = (render([far], cam)[1] == 1).sum()
    assert 0 < (mask == far_id).sum() < alone


def test_relation_labels_agree_with_camera_frame_positions():
    checked = 0
    for seed in range(12):
        scene = make_scene(seed, cameras=2)
        recs = scene_records(scene, [["a.png"], ["b.png"]], np.random.default_rng(seed), kinds=["yesno"])
        for r in recs:
            cam = int(re.search(r"-c(\d)-", r.id).group(1))
            pa, pb = scene.camera_position(r.subj, 0, cam), scene.camera_position(r.obj, 0, cam)
            truth = {
                "left of": pa[0] < pb[0], "right of": pa[0] > pb[0],
                "above": pa[1] < pb[1], "below": pa[1] > pb[1],  # camera y points down
                "in front of": pa[2] < pb[2], "behind": pa[2] > pb[2],
                "closer to the camera than": np.linalg.norm(pa) < np.linalg.norm(pb),
                "farther from the camera than": np.linalg.norm(pa) > np.linalg.norm(pb),
                "bigger than": scene.object(r.subj).size > scene.object(r.obj).size,
                "smaller than": scene.object(r.subj).size < scene.object(r.obj).size,
            }[r.relation]
            assert r.label == int(truth), (r.id, r.question)
            assert r.answer == (prompts.YES if truth else prompts.NO)
            assert r.question == prompts.relation_question(r.subj, r.relation, r.obj)
            assert r.caption == f"The {r.subj} is {r.relation} the {r.obj}."
            checked += 1
    assert checked > 60


def test_ambiguous_pairs_are_not_labelled():
    cam_scene = make_scene(0, num_objects=2)
    a, b = cam_scene.names
    s = copy.deepcopy(cam_scene)
    s.object(b).positions[0] = s.object(a).positions[0] + np.array([0.05, 2.0, 0.0])  # nearly same x, far behind
    assert relation_holds(s, a, "left of", b) is None and relation_holds(s, a, "right of", b) is None
    assert relation_holds(s, a, "in front of", b) is True and relation_holds(s, b, "in front of", a) is False


def test_yes_no_balance_and_meta_categories(tmp_path):
    recs = [r for r in read_jsonl(generate_dataset(str(tmp_path), 30, seed=1, kinds=["yesno"])) if r.type == "yesno"]
    yes = sum(r.answer == prompts.YES for r in recs)
    assert len(recs) >= 100 and abs(yes - (len(recs) - yes)) <= 0.05 * len(recs)
    assert len({r.relation for r in recs}) >= 8
    for r in recs:
        assert r.source == "synth"
        expected = "Projective" if r.relation in ("left of", "right of", "above", "below", "in front of", "behind") else ""
        assert r.meta_category == expected


def test_quantitative_answers_within_tolerance(tmp_path):
    path = generate_dataset(str(tmp_path), 10, seed=2, kinds=["quantitative"])
    scenes = {json.loads(line)["id"]: json.loads(line) for line in open(tmp_path / "scenes.jsonl")}
    n = 0
    for r in read_jsonl(path):
        sc = scenes[r.id.split("-")[1]]
        objs = {o["name"]: o for o in sc["objects"]}
        pos = {k: np.array(o["positions"][0]) for k, o in objs.items()}
        if r.question.startswith("How far apart"):
            true = np.linalg.norm(pos[r.subj] - pos[r.obj])
        elif r.question.endswith("from the camera?"):
            cam = sc["cameras"][0][0]
            true = np.linalg.norm(np.array(cam["R"]) @ pos[r.subj] + np.array(cam["t"]))
        elif r.question.startswith("How tall"):
            true = objs[r.subj]["dims"][2]
        else:
            true = objs[r.subj]["size"] / objs[r.obj]["size"]
        answered = float(r.answer.split()[0])
        assert abs(answered - true) <= r.tolerance * true and abs(r.value - true) < 1e-3, r.question
        assert r.unit in ("m", "times") and r.answer.endswith(r.unit)
        n += 1
    assert n >= 15


def test_plan_records_round_trip_and_are_grounded():
    from phi3v_spatial.engine.parsing import parse_plan

    n = 0
    for seed in range(8):
        scene = make_scene(seed, num_objects=3)
        for r in scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["plan"]):
            steps = json.loads(r.answer)
            assert steps == r.plan and r.answer == prompts.plan_answer(r.plan)
            assert [s["action"] for s in parse_plan(r.answer)] == ["pick", "place"]
            assert r.question == prompts.plan_request(f"Put the {r.subj} {r.relation} the {r.obj}.")
            assert steps[0]["target"] == steps[1]["target"] == r.subj and steps[1]["reference"] == r.obj
            assert r.subj in scene.names and r.obj in scene.names
            x, z = (float(v) for v in re.findall(r"-?\d+\.\d", steps[1]["detail"]))
            ref = scene.camera_position(r.obj)
            ok = {"left of": x < ref[0], "right of": x > ref[0], "in front of": z < ref[2], "behind": z > ref[2]}[r.relation]
            assert ok, (r.relation, steps[1]["detail"], ref)
            n += 1
    assert n >= 6


def test_describe_does_not_leak_layout():
    scene = make_scene(5, num_objects=4)
    mirrored = copy.deepcopy(scene)
    for o in mirrored.objects:
        o.positions = [p * np.array([-1.0, 1.0, 1.0]) for p in o.positions]
    a, b = scene.names[:2]
    flips = [relation_holds(scene, x, "left of", y) for x in scene.names for y in scene.names if x != y]
    flips_m = [relation_holds(mirrored, x, "left of", y) for x in scene.names for y in scene.names if x != y]
    assert any(v is not None for v in flips) and [(None if v is None else not v) for v in flips] == flips_m
    kinds = ["describe", "count"]
    d1 = scene_records(scene, ["x.png"], np.random.default_rng(0), kinds=kinds)
    d2 = scene_records(mirrored, ["x.png"], np.random.default_rng(0), kinds=kinds)
    assert [r.answer for r in d1] == [r.answer for r in d2]
    desc = d1[0].answer
    named = sorted(scene.names, key=desc.index)
    assert named == sorted(scene.names)  # listed by colour name, not by position
    assert d1[1].answer == "4" and d1[1].value == 4


def test_multiframe_questions_follow_the_motion():
    seen_moved = seen_dir = 0
    for seed in range(6):
        for motion in ("object", "camera"):
            scene = make_scene(seed, frames=3, motion=motion)
            recs = scene_records(scene, [[f"f{i}.png" for i in range(3)]], np.random.default_rng(seed), kinds=["multiframe"])
            for r in recs:
                assert r.images == ["f0.png", "f1.png", "f2.png"] and r.answer in r.choices
                if r.question.startswith("Which object moved?"):
                    assert motion == "object" and r.answer == scene.moving
                    seen_moved += 1
                elif "towards or away" in r.question:
                    pos0, pos2 = scene.camera_position(r.subj, 0), scene.camera_position(r.subj, 2)
                    assert r.answer == ("away" if np.linalg.norm(pos2) > np.linalg.norm(pos0) else "towards")
                    seen_dir += 1
                else:
                    dx = scene.camera_position(r.subj, 2)[0] - scene.camera_position(r.subj, 0)[0]
                    assert r.answer == ("right" if dx > 0 else "left")
                    seen_dir += 1
    assert seen_moved >= 4 and seen_dir >= 6


def test_choice_and_open_answers_are_true():
    for seed in range(6):
        scene = make_scene(seed, num_objects=(3, 4))
        recs = scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["choice", "open"])
        for r in recs:
            others = [n for n in scene.names if n != r.subj]
            if r.type == "choice":
                assert r.answer in r.choices
                assert r.question.endswith(f"Choose one of: {', '.join(r.choices)}.")
                targets = [r.obj] if r.obj else others
                assert all(relation_holds(scene, r.answer, r.relation, o) is True for o in targets)
            else:
                hits = sorted(n for n in scene.names if n != r.obj and relation_holds(scene, n, r.relation, r.obj))
                expected = "nothing" if not hits else hits[0] if len(hits) == 1 else ", ".join(hits[:-1]) + " and " + hits[-1]
                assert r.answer == expected and r.question == f"What is {r.relation} the {r.obj}?"


def test_objects_are_distinct_visible_and_apart():
    for seed in range(10):
        s = make_scene(seed, num_objects=4, cameras=2)
        assert len({o.colour for o in s.objects}) == 4
        for cam in range(2):
            ids = set(np.unique(s.masks[cam][0])) - {0}
            assert ids == {1, 2, 3, 4}


def test_presence_questions_are_true_and_opt_in():
    from phi3v_spatial.data.questions import DEFAULT_KINDS
    from phi3v_spatial.data.scene import PALETTE

    assert "presence" not in DEFAULT_KINDS
    for seed in range(5):
        scene = make_scene(seed)
        recs = scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["presence"])
        assert sorted(r.subj for r in recs) == sorted(PALETTE)
        colours = {o.colour for o in scene.objects}
        for r in recs:
            article = "an" if r.subj[0] in "aeiou" else "a"
            assert r.type == "presence" and r.question == f"Is there {article} {r.subj} object? Answer yes or no."
            assert r.answer == ("yes" if r.subj in colours else "no") and r.label == int(r.subj in colours)
        assert not [r for r in scene_records(scene, ["x.png"], np.random.default_rng(seed)) if r.type == "presence"]


def test_locate_answers_follow_the_geometry():
    from phi3v_spatial.data.questions import LOCATE_COLUMNS

    for seed in range(6):
        scene = make_scene(seed)
        recs = scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["locate"])
        assert sorted(r.subj for r in recs) == sorted(scene.names)
        for r in recs:
            o = scene.object(r.subj)
            column, depth, support = r.answer.split(", ")
            assert r.question == f"Where is the {o.colour} object?"
            u = scene.pixel(r.subj)[0]
            assert LOCATE_COLUMNS.index(column) == min(4, int(u / scene.cameras[0][0].width * 5))
            z = scene.camera_position(r.subj)[2]
            assert depth == ("near" if z < 2.7 else "middle" if z < 3.6 else "far")
            assert (support == "in the air") == (o.bottom(0) > 0.05)
