"""Plan and relation parsing: what models really emit, repaired where possible, refused clearly otherwise."""
import pytest

from phi3v_spatial.engine import prompts
from phi3v_spatial.engine.parsing import (
    PlanParseError,
    canonical_relation,
    parse_plan,
    relation_from_question,
    relations_from_text,
)

STEPS = [
    {"action": "pick", "target": "red cube", "reference": "", "relation": "", "detail": ""},
    {"action": "place", "target": "red cube", "reference": "blue sphere", "relation": "left of", "detail": "gently"},
]


def test_canonical_plan_answer_round_trips():
    assert parse_plan(prompts.plan_answer(STEPS)) == STEPS


@pytest.mark.parametrize(
    "text",
    [
        "```json\n" + prompts.plan_answer(STEPS) + "\n```",
        "Here is the plan: " + prompts.plan_answer(STEPS) + " Done.",
        '{"steps": ' + prompts.plan_answer(STEPS) + "}",
        prompts.plan_answer(STEPS).replace('"', "'"),
        prompts.plan_answer(STEPS)[:-1] + ",]",
    ],
    ids=["fenced", "surrounded", "wrapped", "single-quotes", "trailing-comma"],
)
def test_tolerant_plan_parser(text):
    assert parse_plan(text) == STEPS


def test_truncated_plan_keeps_complete_steps():
    text = prompts.plan_answer(STEPS)
    cut = text[: text.index("blue")]
    assert parse_plan(cut) == STEPS[:1]


def test_string_steps_and_missing_fields():
    steps = parse_plan('["pick red cube", {"Action": "push", "target": "green cone"}]')
    assert steps[0]["action"] == "pick" and steps[0]["target"] == "red cube"
    assert steps[1] == {"action": "push", "target": "green cone", "reference": "", "relation": "", "detail": ""}


@pytest.mark.parametrize("text", ["I can't help with that.", "[]", '[{"target": "x"}]', "[1, 2]", ""])
def test_unparsable_plans_raise_with_the_text(text):
    with pytest.raises(PlanParseError) as e:
        parse_plan(text)
    assert "model output" in str(e.value) or "must be an object" in str(e.value)


def test_relations_stated_in_text():
    rels = relations_from_text(
        "The red cube is to the left of the blue sphere and the green cone is not behind the red cube. "
        "The yellow cylinder is larger than the cone."
    )
    got = [(r.subject, r.relation, r.object, r.holds) for r in rels]
    assert got == [
        ("red cube", "left of", "blue sphere", True),
        ("green cone", "behind", "red cube", False),
        ("yellow cylinder", "bigger than", "cone", True),
    ]
    assert relations_from_text("yes") == []


def test_yes_no_answer_to_a_relation_question_states_it():
    q = prompts.relation_question("red cube", "closer to the camera than", "blue sphere")
    (r,) = relation_from_question(q, "No.")
    assert (r.subject, r.relation, r.object, r.holds) == ("red cube", "closer to the camera than", "blue sphere", False)
    assert relation_from_question(q, "maybe") == []
    assert canonical_relation("To the right of") == "right of"


def test_plan_reply_object_with_reason_or_missing_objects():
    from phi3v_spatial.engine.parsing import parse_plan_reply

    steps = [{"action": "pick", "target": "red cube", "reference": "", "relation": "", "detail": ""},
             {"action": "place", "target": "red cube", "reference": "blue sphere", "relation": "left of", "detail": ""}]
    reply = parse_plan_reply(prompts.plan_reply(steps))
    assert reply.steps == steps and reply.reason == "" and reply.missing == [] and reply.failure == ""
    assert prompts.plan_reply(steps).count('"detail"') == 0   # empty fields are left out of the target text
    done = parse_plan_reply(prompts.plan_reply([], reason=prompts.PLAN_DONE_REASON))
    assert done.steps == [] and done.reason == "already done" and done.failure == ""
    missing = parse_plan_reply(prompts.plan_reply([], missing=["green cone"]))
    assert missing.steps == [] and missing.missing == ["green cone"] and "green cone" in missing.failure
    cut = prompts.plan_reply(steps)[:-30]   # cut off by the token limit inside the second step
    assert parse_plan_reply(cut).steps == steps[:1]
    with pytest.raises(PlanParseError, match="no reason"):
        parse_plan_reply('{"steps": []}')
    with pytest.raises(PlanParseError):
        parse_plan(prompts.plan_reply([], reason="already done"))   # parse_plan wants steps
