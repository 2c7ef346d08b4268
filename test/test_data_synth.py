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
    from phi3v_spatial.data.executor import PLACE_RELATIONS, judge_plan
    from phi3v_spatial.data.plans import FAMILIES, instruction_of
    from phi3v_spatial.engine.parsing import parse_plan_reply

    families = set()
    for seed in range(8):
        scene = make_scene(seed, num_objects=3)
        for r in scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["plan"], counts={"plan": 5}):
            reply = json.loads(r.answer)
            assert isinstance(reply["steps"], list) and set(reply) <= {"steps", "reason", "missing"}
            parsed = parse_plan_reply(r.answer)
            assert r.answer == prompts.plan_reply(r.plan, parsed.reason, parsed.missing)
            assert [{k: v for k, v in st.items() if v} for st in parsed.steps] == reply["steps"] == \
                   [{k: v for k, v in st.items() if v} for st in r.plan]
            assert r.family in FAMILIES and r.scene == scene.id and r.images == ["x.png"]
            assert r.question == prompts.plan_request(instruction_of(r))
            # grounded: every step names objects in view, picks before it places, and the place steps say where
            assert {x for st in r.plan for x in (st["target"], st["reference"]) if x} <= set(scene.names)
            assert [st["action"] for st in r.plan] == ["pick", "place"] * (len(r.plan) // 2)
            for p, q in zip(r.plan[::2], r.plan[1::2]):
                assert p["target"] == q["target"] != q["reference"] and q["relation"] in PLACE_RELATIONS
            if r.family == "missing":
                assert not r.plan and parsed.missing == r.missing and r.missing[0] not in scene.names
                assert parsed.failure.startswith("not in view: the " + r.missing[0])
            elif not r.plan:
                assert r.family == "done" and parsed.reason == prompts.PLAN_DONE_REASON and not parsed.failure
            else:
                assert r.family in ("move", "refer", "multistep") and not parsed.reason and not parsed.missing
            verdict = judge_plan(scene, parsed.steps, r.goal, r.movable, r.missing, parsed.missing)
            assert verdict.success, (r.question, r.answer, verdict.reason)
            families.add(r.family)
    assert families == set(FAMILIES)


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


def _check_multiframe_record(scene, r, seen, labels):
    """One motion / relation-change record against the 3D truth of camera 0's first and last frame."""
    from phi3v_spatial.data.scene import camera_distance

    last = scene.num_frames - 1
    assert r.type == "multiframe" and r.scene == scene.id
    if r.label is not None:
        assert r.answer == (prompts.YES if r.label else prompts.NO)
        labels.append(r.label)
    else:
        assert r.answer in r.choices and r.question.endswith(f"Choose one of: {', '.join(r.choices)}.")
    if r.question.startswith("Which object moved?"):
        assert scene.motion == "object" and r.family == "motion" and r.answer == scene.moving
        moved = [o.name for o in scene.objects if not np.allclose(o.positions[0], o.positions[last])]
        assert moved == [scene.moving]
        seen["moved"] += 1
    elif r.family == "relation change":
        first, end = (relation_holds(scene, r.subj, r.relation, r.obj, f) for f in (0, last))
        assert first is not None and end is not None
        assert r.question == f"Is the {r.subj} {r.relation} the {r.obj} in the last frame but not in the first? Answer yes or no."
        assert r.label == int(end and not first)
        seen["relation change"] += 1
    elif "towards or away" in r.question:
        d = camera_distance(scene, r.subj, last) - camera_distance(scene, r.subj, 0)
        assert r.family == "motion" and r.answer == ("towards" if d < 0 else "away") and abs(d) > 0.15
        seen["towards/away"] += 1
    else:
        m = re.fullmatch(r"Did the (\w+ \w+) move (closer to|farther from|to) the (camera|left|right)\? Answer yes or no\.",
                         r.question)
        assert m and m.group(1) == r.subj and r.family == "motion", r.question
        if m.group(3) == "camera":   # distance to the camera, first frame to last (3D truth)
            d = camera_distance(scene, r.subj, last) - camera_distance(scene, r.subj, 0)
            d = -d if m.group(2) == "closer to" else d
            assert (d > 0.15) if r.label else (d < 0.05), (r.question, r.label, d)
            seen["closer/farther"] += 1
        else:                        # camera-frame x and image column move the same way
            dx = scene.camera_position(r.subj, last)[0] - scene.camera_position(r.subj, 0)[0]
            du = scene.pixel(r.subj, last)[0] - scene.pixel(r.subj, 0)[0]
            sign = -1 if m.group(3) == "left" else 1
            assert (sign * dx > 0.05 and sign * du > 0) if r.label else (sign * dx < 0.05), (r.question, dx)
            seen["left/right"] += 1


def test_multiframe_questions_follow_the_motion():
    from phi3v_spatial.data.questions import multiframe_records
    from phi3v_spatial.data.scene import SynthScene
    from phi3v_spatial.data.synth import CAM0_EYE, RIG_TARGET

    seen = {"moved": 0, "closer/farther": 0, "left/right": 0, "towards/away": 0, "relation change": 0}
    labels = []
    for seed in range(8):
        for motion in ("object", "camera"):
            scene = make_scene(seed, frames=3, motion=motion)
            recs = scene_records(scene, [[f"f{i}.png" for i in range(3)]], np.random.default_rng(seed), kinds=["multiframe"],
                                 counts={"multiframe": 4})
            assert recs
            for r in recs:
                assert r.images == ["f0.png", "f2.png"]   # the first and the last frame
                _check_multiframe_record(scene, r, seen, labels)
    assert seen["moved"] >= 2 and all(seen[k] >= 3 for k in ("closer/farther", "left/right", "towards/away")), seen
    assert abs(sum(labels) - (len(labels) - sum(labels))) <= 0.2 * len(labels)
    # A relation that changes needs an object to pass another, which random scenes rarely do: a hand-made one.
    cam = look_at(CAM0_EYE, RIG_TARGET, (160, 120))
    red = _obj("red", "cube", 0.4, (-0.8, 3.0, 0.2))
    red.positions.append(red.positions[0] + np.array([1.6, 0.0, 0.0]))
    blue = _obj("blue", "sphere", 0.4, (0.0, 3.6, 0.2))
    blue.positions.append(blue.positions[0].copy())
    passing = SynthScene("pass", [red, blue], [[cam, cam]], [0, 1], motion="object", moving="red cube", direction="right")
    assert relation_holds(passing, "red cube", "right of", "blue sphere", 1) is True
    assert relation_holds(passing, "red cube", "right of", "blue sphere", 0) is False
    seen["relation change"] = 0
    for seed in range(6):
        for r in multiframe_records(passing, ["f0.png", "f1.png"], np.random.default_rng(seed), 4):
            assert r.images == ["f0.png", "f1.png"]
            _check_multiframe_record(passing, r, seen, labels)
    assert seen["relation change"] >= 4, seen


def _check_two_camera_record(scene, r, seen):
    assert r.type == "multiframe" and r.family == "two cameras" and r.about_image in (0, 1)
    truth = [relation_holds(scene, r.subj, r.relation, r.obj, 0, camera=k) for k in (0, 1)]
    if r.label is not None:
        ordinal = ("first", "second")[r.about_image]
        assert r.question == f"In the {ordinal} image, is the {r.subj} {r.relation} the {r.obj}? Answer yes or no."
        assert truth[r.about_image] is bool(r.label) and r.answer == (prompts.YES if r.label else prompts.NO)
        seen["yes/no"] += 1
    else:
        assert r.choices == ["first", "second"] and r.answer == r.choices[r.about_image]
        assert r.question.startswith(f"In which image is the {r.subj} {r.relation} the {r.obj}?")
        assert truth[r.about_image] is True and truth[1 - r.about_image] is False
        seen["which image"] += 1


def test_two_camera_questions_follow_each_camera():
    from phi3v_spatial.data.questions import two_camera_records
    from phi3v_spatial.data.scene import SynthScene
    from phi3v_spatial.data.synth import CAM0_EYE, CAM1_EYE, RIG_TARGET

    seen = {"yes/no": 0, "which image": 0}
    for seed in range(12):
        scene = make_scene(seed, cameras=2)
        recs = scene_records(scene, [["a.png"], ["b.png"]], np.random.default_rng(seed), kinds=["multiframe"],
                             counts={"multicamera": 3})
        assert recs and all(r.images == ["a.png", "b.png"] for r in recs)
        for r in recs:
            _check_two_camera_record(scene, r, seen)
    assert seen["yes/no"] >= 30, seen
    # A hand-made scene whose depth order flips between the cameras, so "In which image ...?" gets asked.
    cams = [[look_at(eye, RIG_TARGET, (160, 120))] for eye in (CAM0_EYE, CAM1_EYE)]
    flip = SynthScene("flip", [_obj("red", "cube", 0.4, (-1.2, 2.4, 0.2)), _obj("blue", "sphere", 0.4, (1.2, 3.2, 0.2))],
                      cams, [0])
    assert relation_holds(flip, "red cube", "in front of", "blue sphere", 0, 0) is True
    assert relation_holds(flip, "red cube", "in front of", "blue sphere", 0, 1) is False
    seen["which image"] = 0
    for seed in range(5):
        for r in two_camera_records(flip, ["a.png", "b.png"], np.random.default_rng(seed), 10):
            _check_two_camera_record(flip, r, seen)
    assert seen["which image"] >= 3, seen


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


def test_refer_questions_name_the_object_the_expression_means_and_are_opt_in():
    """"Which one is the biggest cube?" and "Which one is the cone behind the red sphere?": the answer is read back
    from the sentence and the 3D truth here, not from the generator's own tables."""
    from phi3v_spatial.data.questions import DEFAULT_KINDS
    from phi3v_spatial.data.scene import SHAPES

    assert "refer" not in DEFAULT_KINDS
    word = {"leftmost": "left of", "rightmost": "right of", "biggest": "bigger than", "smallest": "smaller than"}
    superlative = re.compile(r"^Which one is the (leftmost|rightmost|biggest|smallest) (\w+)\?$")
    camera = re.compile(r"^Which one is the (\w+) (closest to|farthest from) the camera\?$")
    relative = re.compile(r"^Which one is the (\w+) (left of|right of|in front of|behind) the (\w+ \w+)\?$")
    seen = {"superlative": 0, "camera": 0, "relative": 0}
    for seed in range(40):
        scene = make_scene(seed, num_objects=(3, 4))
        shape_of = {o.name: o.shape for o in scene.objects}
        recs = scene_records(scene, ["x.png"], np.random.default_rng(seed), kinds=["refer"])
        assert len(recs) <= 2 and len({r.question for r in recs}) == len(recs)
        for r in recs:
            assert r.type == "refer" and r.answer == r.subj and r.answer in scene.names
            if m := superlative.match(r.question) or camera.match(r.question):
                noun = m[2] if m.re is superlative else m[1]
                rel = word[m[1]] if m.re is superlative else (
                    "closer to the camera than" if m[2] == "closest to" else "farther from the camera than")
                cands = [n for n in scene.names if noun == "object" or shape_of[n] == noun]
                assert noun in ("object", *SHAPES) and r.answer in cands and len(cands) >= 2
                assert all(relation_holds(scene, r.answer, rel, o) is True for o in cands if o != r.answer), r.question
                seen["superlative" if m.re is superlative else "camera"] += 1
            else:
                m = relative.match(r.question)
                assert m is not None, r.question
                shape, rel, ref = m[1], m[2], m[3]
                assert shape_of[r.answer] == shape and ref in scene.names and r.obj == ref
                for n in scene.names:
                    if shape_of[n] == shape and n != ref:
                        assert relation_holds(scene, n, rel, ref) is (n == r.answer), (r.question, n)
                seen["relative"] += 1
    assert all(v > 0 for v in seen.values()), seen


def test_adding_refer_questions_leaves_the_other_records_of_a_scene_as_they_were():
    kinds = ["yesno", "choice", "open", "plan", "multiframe"]
    for seed in range(5):
        scene = make_scene(seed, num_objects=(3, 4), frames=2, cameras=2)
        paths = [["c0f0.png", "c0f1.png"], ["c1f0.png", "c1f1.png"]]
        without = scene_records(scene, paths, np.random.default_rng(seed), kinds=kinds)
        with_refer = scene_records(scene, paths, np.random.default_rng(seed), kinds=kinds + ["refer"])
        assert [r.to_json() for r in with_refer[:len(without)]] == [r.to_json() for r in without]
        assert all(r.type == "refer" for r in with_refer[len(without):])
