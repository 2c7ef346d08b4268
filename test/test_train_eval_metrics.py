"""Evaluation scoring and aggregation on hand-made predictions (no model needed)."""
import pytest

from phi3v_spatial.data.records import SpatialRecord
from phi3v_spatial.engine import prompts
from phi3v_spatial.train.evaluate import (aggregate, format_table, judge, parse_quantity, scoring_kind,
                                          within_tolerance)


def rec(i, type_, answer, relation="", meta="", **kw):
    return SpatialRecord(id=str(i), images=["a.png"], question="q", answer=answer, type=type_, relation=relation,
                         meta_category=meta, **kw)


def test_scoring_kind_routes_each_record_type():
    assert scoring_kind(rec(0, "yesno", "yes")) == "yesno"
    assert scoring_kind(rec(0, "multiframe", "no")) == "yesno"
    assert scoring_kind(rec(0, "choice", "red cube", choices=["red cube", "blue sphere"])) == "choice"
    assert scoring_kind(rec(0, "quantitative", "1.2 m", value=1.2, unit="m", tolerance=0.25)) == "quantitative"
    assert scoring_kind(rec(0, "plan", "[]")) == "plan"
    assert scoring_kind(rec(0, "open", "the red cube")) == "generate"


def test_quantity_parsing_converts_units():
    assert parse_quantity("About 1.5 meters.", "m") == pytest.approx(1.5)
    assert parse_quantity("roughly 150 cm", "m") == pytest.approx(1.5)
    assert parse_quantity("2 feet", "cm") == pytest.approx(60.96)
    assert parse_quantity("no idea", "m") is None


def test_tolerance_is_relative():
    assert within_tolerance(1.2, 1.0, 0.25)
    assert within_tolerance(0.75, 1.0, 0.25)
    assert not within_tolerance(1.3, 1.0, 0.25)
    assert not within_tolerance(None, 1.0, 0.25)


def test_aggregate_per_type_relation_and_meta_category():
    records_and_preds = [
        (rec(1, "yesno", "yes", "left of", "Directional"), "yes"),        # right
        (rec(2, "yesno", "no", "left of", "Directional"), "yes"),         # wrong
        (rec(3, "yesno", "yes", "touching", "Topological"), "Yes."),      # right (normalised)
        (rec(4, "yesno", "no", "near", "Proximity"), "no"),               # right
        (rec(5, "choice", "red cube", "closer to the camera than", choices=["red cube", "blue cone"]), "blue cone"),  # wrong
        (rec(6, "quantitative", "1 m", value=1.0, unit="m", tolerance=0.2), "1.1 meters"),   # right
        (rec(7, "quantitative", "1 m", value=1.0, unit="m", tolerance=0.2), "150 cm"),       # wrong
        (rec(8, "quantitative", "1 m", value=1.0, unit="m", tolerance=0.2), "far away"),     # unparsed
    ]
    preds = [judge(r, p) for r, p in records_and_preds]
    report = aggregate(preds)
    assert report["overall"] == {"n": 8, "correct": 4, "accuracy": 0.5}
    assert report["per_type"]["yesno"]["accuracy"] == 0.75
    assert report["per_type"]["choice"]["accuracy"] == 0.0
    assert report["per_relation"]["left of"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert report["per_relation"]["touching"]["accuracy"] == 1.0
    assert list(report["per_meta_category"]) == ["Directional", "Proximity", "Topological"]  # VSR order
    assert report["per_meta_category"]["Directional"]["accuracy"] == 0.5
    assert report["quantitative"]["n"] == 3
    assert report["quantitative"]["within_tolerance"] == pytest.approx(1 / 3)
    assert report["quantitative"]["parsed"] == pytest.approx(2 / 3)
    assert report["yesno_predicted_yes_rate"] == 0.75
    table = format_table(report, title="hand-made")
    assert "Directional" in table and "50.0%" in table and "quantitative within tolerance" in table


def test_plan_validity_needs_matching_targets():
    pytest.importorskip("phi3v_spatial.engine.parsing")
    steps = [{"action": "pick", "target": "red cube"}, {"action": "place", "target": "blue bowl", "relation": "in"}]
    r = rec(9, "plan", prompts.plan_answer(steps), plan=steps)
    good = judge(r, prompts.plan_answer(steps))
    swapped = judge(r, prompts.plan_answer(list(reversed(steps))))
    garbage = judge(r, "I would pick it up")
    assert good.correct and good.plan_parsed
    assert swapped.plan_parsed and not swapped.correct
    assert not garbage.plan_parsed and not garbage.correct
    report = aggregate([good, swapped, garbage])
    assert report["plan"] == {"n": 3, "parse_rate": pytest.approx(2 / 3), "validity": pytest.approx(1 / 3)}
