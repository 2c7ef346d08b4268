"""The plan executor on hand-made 3D scenes, and the plan records of ``data.plans`` checked by it.

Hand-made scenes use camera 0 of the synthetic rig (``data.synth``: eye (0, 0, 1.3) looking at (0, 3, 0.1), so
world +X is image right and +Y is depth), objects resting on the ground; nothing is rendered.
"""
import collections
import json
import re

import numpy as np
import pytest

from fixtures.plans import template_regex
from phi3v_spatial.data.executor import execute_plan, judge_plan, scene_from_json
from phi3v_spatial.data.plans import (
    EVERY_TEMPLATES, FAMILIES, FILLER_WORDS, LINEUP_TEMPLATES, MOVE_TEMPLATES, TRAIN_FILLER_RATE, instruction_of,
    nonce_word, plan_records, referring_expressions, with_fillers,
)
from phi3v_spatial.data.scene import SHAPES, SynthObject, SynthScene, look_at, relation_holds, shape_dims
from phi3v_spatial.data.synth import CAM0_EYE, RIG_TARGET, make_scene
from phi3v_spatial.engine import prompts
from phi3v_spatial.engine.parsing import parse_plan_reply


def obj(colour, shape, x, y, size=0.4):
    dims = shape_dims(shape, size)
    return SynthObject(colour=colour, shape=shape, size=size, positions=[np.array([x, y, dims[2] / 2])], dims=dims)


def scene(*objects):
    return SynthScene(id="hand", objects=list(objects), cameras=[[look_at(CAM0_EYE, RIG_TARGET, (160, 120))]],
                      stamps_ns=[0])


def pick(target):
    return {"action": "pick", "target": target}


def place(target, reference, relation, detail=""):
    return {"action": "place", "target": target, "reference": reference, "relation": relation, "detail": detail}


def at(s, name):
    """``detail`` naming where ``name`` stands, in camera 0's frame (what a robot's placement module reads)."""
    x, _, z = s.camera_position(name)
    return f"x={x:.2f} m, z={z:.2f} m"


@pytest.fixture
def three():
    """red cube left, blue sphere right, green cone behind in the middle."""
    return scene(obj("red", "cube", -0.8, 3.0), obj("blue", "sphere", 0.8, 3.0), obj("green", "cone", 0.0, 4.0))


GOAL = [("blue sphere", "left of", "red cube")]   # "Put the blue sphere left of the red cube."
MOVABLE = ["blue sphere"]


# --- single moves ------------------------------------------------------------------------------------------

def test_a_correct_plan_succeeds_and_only_its_object_moves(three):
    before = {o.name: o.positions[0].copy() for o in three.objects}
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "left of")]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert v.success and v.goal_holds and v.others_untouched, v.reason
    assert (v.steps_total, v.steps_valid) == (2, 2) and v.reason == "goal holds"
    ex = execute_plan(three, steps)
    assert ex.ok and ex.moved == {"blue sphere"}
    assert relation_holds(ex.scene, "blue sphere", "left of", "red cube") is True
    assert ex.scene.object("blue sphere").positions[0][2] == pytest.approx(0.2)   # resting on the ground
    # the caller's scene is never changed
    assert all(np.array_equal(o.positions[0], before[o.name]) for o in three.objects)
    assert relation_holds(three, "blue sphere", "left of", "red cube") is False


def test_step_text_is_normalised_like_a_model_writes_it(three):
    steps = [{"action": "Pick", "target": "the Blue Sphere"}, place("The blue sphere.", "the red cube", "Left of")]
    assert judge_plan(three, steps, GOAL, MOVABLE).success


def test_explicit_free_coordinates_are_used(three):
    spot = scene(obj("x", "cube", -1.6, 3.0))   # a phantom at the wanted spot, only to read its camera coordinates
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "left of", at(spot, "x cube"))]
    ex = execute_plan(three, steps)
    assert ex.ok, ex.errors
    assert ex.scene.object("blue sphere").positions[0][:2] == pytest.approx([-1.6, 3.0], abs=0.05)
    assert judge_plan(three, steps, GOAL, MOVABLE).success


def test_wrong_target_fails(three):
    steps = [pick("green cone"), place("green cone", "red cube", "left of")]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert not v.success and not v.goal_holds and not v.others_untouched
    assert "goal does not hold" in v.reason and "blue sphere left of red cube: False" in v.reason


def test_wrong_side_fails(three):
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "right of")]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert not v.success and not v.goal_holds and v.others_untouched
    assert v.steps_valid == 2 and "goal does not hold" in v.reason


def test_placing_into_another_object_fails(three):
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "left of", at(three, "green cone"))]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 1
    assert "step 2" in v.reason and "into the green cone" in v.reason


def test_unknown_object_fails(three):
    v = judge_plan(three, [pick("purple cube"), place("purple cube", "red cube", "left of")], GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 0
    assert "step 1" in v.reason and "'purple cube': no such object" in v.reason
    v = judge_plan(three, [pick("blue sphere"), place("blue sphere", "yellow cone", "left of")], GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 1 and "'yellow cone': no such object" in v.reason


def test_place_without_pick_fails(three):
    v = judge_plan(three, [place("blue sphere", "red cube", "left of")], GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 0 and "without picking it first" in v.reason


def test_a_plan_that_ends_holding_an_object_fails(three):
    v = judge_plan(three, [pick("blue sphere")], GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 1 and "ends holding the blue sphere" in v.reason


def test_unknown_action_and_unplaceable_relation_fail(three):
    v = judge_plan(three, [{"action": "push", "target": "blue sphere"}], GOAL, MOVABLE)
    assert not v.success and "unknown action 'push'" in v.reason
    v = judge_plan(three, [pick("blue sphere"), place("blue sphere", "red cube", "above")], GOAL, MOVABLE)
    assert not v.success and "a place step needs one of" in v.reason


@pytest.mark.parametrize("detail", ["x=5.00 m, z=3.00 m", "x=0.00 m, z=0.20 m", "x=-0.50 m, z=12.0 m"])
def test_placing_off_the_ground_plane_fails(three, detail):
    v = judge_plan(three, [pick("blue sphere"), place("blue sphere", "red cube", "left of", detail)], GOAL, MOVABLE)
    assert not v.success and v.steps_valid == 1 and "off the ground plane" in v.reason


def test_moving_an_object_the_instruction_did_not_name_fails(three):
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "left of"),
             pick("green cone"), place("green cone", "red cube", "right of")]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert v.goal_holds and not v.others_untouched and not v.success
    assert v.reason == "moved the green cone, which the instruction did not name"
    # the reference itself is not movable either
    steps = [pick("red cube"), place("red cube", "blue sphere", "right of")]
    v = judge_plan(three, steps, GOAL, MOVABLE)
    assert v.goal_holds and not v.success and "moved the red cube" in v.reason


def test_an_instruction_that_already_holds_succeeds_with_no_steps(three):
    goal = [("red cube", "left of", "blue sphere")]
    v = judge_plan(three, [], goal, ["red cube"])
    assert v.success and v.reason == "goal holds (nothing to do)"
    assert not judge_plan(three, [], GOAL, MOVABLE).success   # an empty plan for an unmet goal fails


# --- objects not in view ----------------------------------------------------------------------------------

def test_missing_object_succeeds_only_with_no_steps_and_the_object_named(three):
    missing = ["purple cube"]
    v = judge_plan(three, [], [], [], missing=missing, said_missing=["the Purple cube"])
    assert v.success and "purple cube not in view" in v.reason
    v = judge_plan(three, [pick("blue sphere"), place("blue sphere", "red cube", "left of")], [], [],
                   missing=missing, said_missing=missing)
    assert not v.success and "planned 2 steps although the purple cube is not in view" in v.reason
    v = judge_plan(three, [], [], [], missing=missing, said_missing=[])
    assert not v.success and "did not say that the purple cube is not in view" in v.reason
    v = judge_plan(three, [], [], [], missing=missing, said_missing=["red cube"])
    assert not v.success
    # saying a visible object is missing fails too
    v = judge_plan(three, [], GOAL, MOVABLE, said_missing=["blue sphere"])
    assert not v.success and "said blue sphere is not in view, but it is" in v.reason


# --- multi-step plans -------------------------------------------------------------------------------------

@pytest.fixture
def row():
    """Goal: red cube, blue sphere, green cone from left to right; now the sphere is leftmost, the cone in between."""
    return scene(obj("red", "cube", 0.0, 3.0), obj("blue", "sphere", -1.0, 2.5), obj("green", "cone", -0.3, 4.0))


LINEUP = [("red cube", "left of", "blue sphere"), ("blue sphere", "left of", "green cone")]


def test_line_up_succeeds_in_the_right_order(row):
    steps = [pick("blue sphere"), place("blue sphere", "red cube", "right of"),
             pick("green cone"), place("green cone", "blue sphere", "right of")]
    v = judge_plan(row, steps, LINEUP, ["blue sphere", "green cone"])
    assert v.success and (v.steps_total, v.steps_valid) == (4, 4), v.reason


def test_line_up_fails_when_a_later_step_breaks_an_earlier_relation(row):
    # the cone is put right of the sphere first; moving the sphere right of the cube afterwards undoes that
    steps = [pick("green cone"), place("green cone", "blue sphere", "right of"),
             pick("blue sphere"), place("blue sphere", "red cube", "right of")]
    ex = execute_plan(row, steps[:2])
    assert ex.ok and relation_holds(ex.scene, "green cone", "right of", "blue sphere") is True
    v = judge_plan(row, steps, LINEUP, ["blue sphere", "green cone"])
    assert not v.success and v.steps_valid == 4 and not v.goal_holds
    assert "red cube left of blue sphere: True" in v.reason and "blue sphere left of green cone: False" in v.reason


@pytest.fixture
def cubes():
    """Two cubes and a yellow cylinder; goal: every cube in front of the cylinder (only the red one is)."""
    return scene(obj("red", "cube", -0.9, 2.2), obj("blue", "cube", 0.9, 4.3), obj("yellow", "cylinder", 0.0, 3.2))


EVERY = [("red cube", "in front of", "yellow cylinder"), ("blue cube", "in front of", "yellow cylinder")]


def test_every_shape_succeeds_when_each_member_is_placed(cubes):
    assert relation_holds(cubes, "red cube", "in front of", "yellow cylinder") is True
    steps = [pick("blue cube"), place("blue cube", "yellow cylinder", "in front of")]
    v = judge_plan(cubes, steps, EVERY, ["blue cube"])
    assert v.success, v.reason


def test_every_shape_fails_when_a_member_is_left_out_or_a_later_step_undoes_one(cubes):
    assert not judge_plan(cubes, [], EVERY, ["blue cube"]).success
    # moving the cylinder in front of the blue cube after placing it breaks "blue cube in front of the cylinder"
    steps = [pick("blue cube"), place("blue cube", "yellow cylinder", "in front of"),
             pick("yellow cylinder"), place("yellow cylinder", "blue cube", "in front of")]
    v = judge_plan(cubes, steps, EVERY, ["blue cube", "yellow cylinder"])
    assert v.steps_valid == 4 and not v.goal_holds and not v.success
    assert "blue cube in front of yellow cylinder: False" in v.reason


def test_scene_from_json_round_trips_the_judgement(three):
    back = scene_from_json(json.loads(json.dumps(three.to_json())))
    assert back.names == three.names
    for steps in ([pick("blue sphere"), place("blue sphere", "red cube", "left of")],
                  [pick("blue sphere"), place("blue sphere", "red cube", "right of")]):
        assert judge_plan(back, steps, GOAL, MOVABLE) == judge_plan(three, steps, GOAL, MOVABLE)


# --- plan records (data.plans) ----------------------------------------------------------------------------

def _scenes(n, **kw):
    return [make_scene(seed, num_objects=(2, 4), size=(64, 48), **kw) for seed in range(n)]


@pytest.fixture(scope="module")
def scenes():
    return _scenes(40)


# Sentence templates per family (the multi-step ones start like a move: "Place each cube ...").
FAMILY_TEMPLATES = {f: (LINEUP_TEMPLATES, EVERY_TEMPLATES) if f == "multistep" else (MOVE_TEMPLATES,) for f in FAMILIES}


def _matching_sets(family: str, instruction: str, fillers: bool = False) -> set:
    return {s for table in FAMILY_TEMPLATES[family] for s, ts in table.items()
            if any(template_regex(t, fillers and s == "train").match(instruction) for t in ts)}


@pytest.mark.parametrize("templates,fillers", [("train", 0.0), ("train", TRAIN_FILLER_RATE), ("all", 0.0)])
def test_every_ground_truth_plan_passes_the_executor(scenes, templates, fillers):
    families, sets = collections.Counter(), collections.Counter()
    filled = 0
    for i, s in enumerate(scenes):
        for r in plan_records(s, "x.png", np.random.default_rng([i, 7]), 6, templates=templates, fillers=fillers):
            families[r.family] += 1
            sets[r.template or "train"] += 1
            assert r.type == "plan" and r.scene == s.id and r.images == ["x.png"]
            reply = parse_plan_reply(r.answer)
            assert r.answer == prompts.plan_reply(r.plan, reply.reason, r.missing)
            assert [{k: v for k, v in st.items() if v} for st in reply.steps] == \
                   [{k: v for k, v in st.items() if v} for st in r.plan]
            v = judge_plan(s, reply.steps, r.goal, r.movable, r.missing, reply.missing)
            assert v.success, (r.id, r.question, r.answer, v.reason)
            instruction = instruction_of(r)
            assert r.question == prompts.plan_request(instruction)
            assert _matching_sets(r.family, instruction, fillers > 0) == {r.template or "train"}, (r.template, instruction)
            filled += not _matching_sets(r.family, instruction)
            if r.family == "missing":
                assert not r.plan and r.missing and all(m not in s.names for m in r.missing)
                assert all(m in instruction for m in r.missing)
            else:
                assert not r.missing and r.goal and set(r.movable) <= set(s.names)
            if r.family in ("move", "refer", "done"):   # one relation, clear before the plan: holds iff done
                assert len(r.goal) == 1 and [r.subj, r.relation, r.obj] == list(r.goal[0]) == [r.movable[0]] + r.goal[0][1:]
                assert relation_holds(s, *r.goal[0]) is (r.family == "done")
            if r.family == "done":
                assert not r.plan and reply.reason == prompts.PLAN_DONE_REASON
            if r.family in ("move", "refer", "multistep"):
                assert r.plan and not all(relation_holds(s, a, rel, b) is True for a, rel, b in r.goal)
                assert {st["target"] for st in r.plan} == set(r.movable)
            if r.family == "move":
                a, rel, b = r.goal[0]
                assert instruction.index(f"the {a} ") < instruction.index(f"{rel} the {b}")
            if r.family == "refer":   # one of the two objects is described, not named
                a, rel, b = r.goal[0]
                assert (f"the {a} " in instruction) != (f" the {b}" in instruction), instruction
    assert set(families) == set(FAMILIES), families
    assert sum(families.values()) >= 200
    n = sum(families.values())
    # fillers go into that share of the instructions (and only then); the move-family instructions are matched by
    # the template's placeholders when the filler sits beside one, so fewer show up as "not a bare template"
    assert (0.25 * fillers * n < filled <= fillers * n * 1.3) if fillers else filled == 0, (filled, n)
    if templates == "train":
        assert set(sets) == {"train"}
    else:
        # the set is drawn first, half and half, however many phrasings each set has
        assert 0.35 * sum(sets.values()) < sets["held-out"] < 0.65 * sum(sets.values()), sets


def _words(template: str) -> set:
    return set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template).lower()))


def test_held_out_templates_use_words_no_training_template_uses():
    """Held-out evaluation measures unseen wording only while training never uses the held-out phrasing's words."""
    tables = (MOVE_TEMPLATES, LINEUP_TEMPLATES, EVERY_TEMPLATES)
    train_words = set().union(*(_words(t) for table in tables for t in table["train"]), *map(_words, FILLER_WORDS))
    for table in tables:
        assert len(table["train"]) >= 5, table["train"]   # varied wording, so the structure is what gets learned
        for t in table["held-out"]:
            assert _words(t) - train_words, t


def test_fillers_keep_the_template_and_never_split_left_to_right_or_a_relation_from_its_reference():
    rng = np.random.default_rng(3)
    reserved = set().union(*(_words(t) for table in (MOVE_TEMPLATES, LINEUP_TEMPLATES, EVERY_TEMPLATES)
                             for ts in table.values() for t in ts), {"red", "blue", "cube", "cone", "sphere"})
    for template in [t for table in (MOVE_TEMPLATES, LINEUP_TEMPLATES, EVERY_TEMPLATES) for t in table["train"]]:
        for _ in range(40):
            out = with_fillers(template, rng)
            assert out != template and template_regex(template, fillers=True).match(out), (template, out)
            assert ("left to right" in out) == ("left to right" in template), out
            assert ("{rel} {b}" in out) == ("{rel} {b}" in template), out
            assert re.sub(r"\{\w+\}", "", out).count("{") == 0
            assert out[-1] == template[-1] and out[0].isupper(), out
    words = {nonce_word(rng) for _ in range(2000)}
    assert len(words) > 500 and not words & reserved
    assert all(re.fullmatch(r"(?:[bdfgklmnprstvz][aeiou]){2,3}", w) for w in words)


def test_training_data_has_fillers_and_evaluation_data_none(scenes):
    """``scene_records``: plan_templates "train" puts fillers into about half the instructions, "all" into none."""
    from phi3v_spatial.data.questions import scene_records

    def filled(plan_templates):
        recs = [r for i, s in enumerate(scenes) for r in scene_records(s, ["x.png"], np.random.default_rng(i), ["plan"],
                                                                       {"plan": 6}, plan_templates=plan_templates)]
        bare = [bool(_matching_sets(r.family, instruction_of(r))) for r in recs]
        return bare.count(False), len(recs)

    k, n = filled("train")
    assert n >= 200 and 0.2 * n < k < TRAIN_FILLER_RATE * n, (k, n)
    assert filled("all")[0] == 0


def test_plan_records_are_reproducible_for_a_seed(scenes):
    a = plan_records(scenes[3], "x.png", np.random.default_rng(5), 6, templates="all")
    b = plan_records(scenes[3], "x.png", np.random.default_rng(5), 6, templates="all")
    assert a and [r.to_json() for r in a] == [r.to_json() for r in b]


_SUPERLATIVE_RELATIONS = {"leftmost": "left of", "rightmost": "right of", "biggest": "bigger than",
                          "smallest": "smaller than"}


def _resolve(s: SynthScene, expression: str) -> list[str]:
    """Every object ``expression`` fits, read off the 3D truth independently of ``referring_expressions``."""
    shape_of = {o.name: o.shape for o in s.objects}
    m = re.fullmatch(r"the (\w+) (left of|right of|in front of|behind) the (\w+ \w+)", expression)
    if m:
        shape, rel, anchor = m.groups()
        assert shape in SHAPES and anchor in s.names
        cands = [n for n in s.names if shape_of[n] == shape and n != anchor]
        truth = {n: relation_holds(s, n, rel, anchor) for n in cands}
        hits = [n for n, t in truth.items() if t is True]
        return hits if all(t is False for n, t in truth.items() if n not in hits) else hits + ["<ambiguous>"]
    m = re.fullmatch(r"the (leftmost|rightmost|biggest|smallest) (\w+)", expression) or \
        re.fullmatch(r"the (\w+) (closest to|farthest from) the camera", expression)
    assert m, expression
    if m.group(1) in _SUPERLATIVE_RELATIONS:
        word, noun = m.groups()
        rel = _SUPERLATIVE_RELATIONS[word]
    else:
        noun, word = m.groups()
        rel = "closer to the camera than" if word == "closest to" else "farther from the camera than"
    cands = [n for n in s.names if noun == "object" or shape_of[n] == noun]
    assert len(cands) >= 2, expression
    return [a for a in cands if all(relation_holds(s, a, rel, b) is True for b in cands if b != a)]


def test_referring_expressions_resolve_uniquely(scenes):
    kinds = collections.Counter()
    for s in scenes:
        exprs = referring_expressions(s)
        assert len({e for e, _, _ in exprs}) == len(exprs)   # each expression once
        for expression, who, anchor in exprs:
            assert _resolve(s, expression) == [who], (s.id, expression)
            assert who != anchor and (anchor == "" or anchor in expression)
            kinds["relative" if anchor else "superlative"] += 1
    assert kinds["relative"] >= 20 and kinds["superlative"] >= 40, kinds


def test_refer_records_use_an_expression_for_the_object_they_move_or_the_reference(scenes):
    seen = 0
    for i, s in enumerate(scenes):
        exprs = {e: who for e, who, _ in referring_expressions(s)}
        for r in plan_records(s, "x.png", np.random.default_rng(i), 4, families=["refer"]):
            if r.family != "refer":   # the scene has no expression: falls back to a move
                continue
            instruction = instruction_of(r)
            used = [e for e in exprs if e in instruction]
            assert used and any(exprs[e] in (r.subj, r.obj) for e in used), instruction
            seen += 1
    assert seen >= 40
