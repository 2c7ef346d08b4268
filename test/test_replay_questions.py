"""Replay's questions file, node-parameter file and scoring: the parts that need neither a bag nor a model."""
import textwrap

import pytest

from phi3v_spatial.replay.params import ParamsError, ReplaySettings, load_node_params, node_defaults, resolve_topic
from phi3v_spatial.replay.question_file import QuestionsError, load_questions, resolve_at
from phi3v_spatial.replay.scoring import format_summary, score, summarize

NS = 1_000_000_000
START = 1_700_000_000 * NS


def _write(tmp_path, text, name="q.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_at_relative_absolute_stamp_and_end():
    assert resolve_at(0, START) == START
    assert resolve_at(1.5, START) == START + 1_500_000_000
    assert resolve_at("2.25", START) == START + 2_250_000_000
    # above 1e9 s an `at` is an absolute stamp, kept exact to the nanosecond when written as text
    assert resolve_at(1_700_000_003.25, START) == 1_700_000_003 * NS + 250_000_000
    assert resolve_at("1700000003.000000001", START) == 1_700_000_003 * NS + 1
    assert resolve_at({"sec": 1_700_000_004, "nanosec": 7}, START) == 1_700_000_004 * NS + 7
    assert resolve_at("end", START) is None and resolve_at(None, START) is None
    for bad in (-1, "soon", True, {"nanosec": 3}, float("nan")):
        with pytest.raises(ValueError):
            resolve_at(bad, START)


def test_questions_file_all_types_and_aliases(tmp_path):
    path = _write(tmp_path, """
        questions:
          - id: a1
            at: 1.0
            type: ask
            question: Is the red cube left of the blue sphere?
            topics: /cam0/image_raw
            num_frames: 2
            max_new_tokens: 8
            expect: yes            # YAML reads this as a boolean
          - id: r1
            type: query_relations
            candidates:
              - {subject: red cube, relation: left of, object: blue sphere}
            image_topics: [/cam0/image_raw]
            expect:
              - {subject: red cube, relation: left of, object: blue sphere, holds: false}
          - id: p1
            at: end
            type: plan
            instruction: put the cube next to the sphere
            expect: [{action: pick, target: red cube}, "place red cube"]
        """)
    a, r, p = load_questions(path)
    assert [q.error for q in (a, r, p)] == ["", "", ""]
    assert (a.type, a.at, a.topics, a.num_frames, a.max_new_tokens, a.expect) == ("ask", 1.0, ["/cam0/image_raw"], 2, 8, ["yes"])
    assert r.type == "relations" and r.at == "end" and r.topics == ["/cam0/image_raw"]
    assert (r.candidates[0].subject, r.expect[0].holds) == ("red cube", False)
    assert p.expect == [{"action": "pick", "target": "red cube"}, "place red cube"]


def test_bad_entries_are_reported_one_by_one(tmp_path):
    path = _write(tmp_path, """
        - {id: ok, type: ask, question: "where?"}
        - {id: typo, type: ask, questoin: "where?"}
        - {id: notype, question: "where?"}
        - {id: late, type: ask, question: "where?", at: yesterday}
        - {id: nocand, type: relations, candidates: []}
        - {id: noholds, type: relations, candidates: [{subject: a, relation: near, object: b}], expect: [{subject: a, relation: near, object: b}]}
        - {id: ok, type: plan, instruction: go}
        - just a string
        """)
    qs = load_questions(path)
    errors = {q.id: q.error for q in qs}
    assert qs[0].error == "" and qs[6].error.startswith("question ok (entry 7): duplicate id")
    assert "questoin" in errors["typo"]
    assert "'type' must be one of" in errors["notype"]
    assert "'at' must be" in errors["late"]
    assert "candidates" in errors["nocand"]
    assert "holds" in errors["noholds"]
    assert "entry 8 must be a mapping" in errors["#8"]


def test_unusable_questions_files(tmp_path):
    with pytest.raises(QuestionsError, match="cannot read"):
        load_questions(tmp_path / "missing.yaml")
    with pytest.raises(QuestionsError, match="not valid YAML"):
        load_questions(_write(tmp_path, "- [unclosed"))
    with pytest.raises(QuestionsError, match="must hold a list"):
        load_questions(_write(tmp_path, "id: q1\ntype: ask\n"))


def test_scoring_is_forgiving_about_form_strict_about_content(tmp_path):
    qs = load_questions(_write(tmp_path, """
        - {id: yn, type: ask, question: "q?", expect: 'yes'}
        - {id: txt, type: ask, question: "q?", expect: [the red cube, blue sphere]}
        - id: rel
          type: relations
          candidates: [{subject: cup, relation: left of, object: plate}, {subject: cup, relation: above, object: plate}]
          expect:
            - {subject: The cup, relation: to the left of, object: plate, holds: true}
            - {subject: cup, relation: above, object: plate, holds: false}
        - {id: plan, type: plan, instruction: go, expect: [{action: pick, target: cup}, place cup]}
        """))
    yn, txt, rel, plan = qs
    assert score(yn, {"answer": "Yes, it is."})[0] is True
    assert score(yn, {"answer": "No."})[0] is False
    assert score(yn, {"answer": "yesterday"})[0] is False
    assert score(txt, {"answer": "Red cube."})[0] is True
    assert score(txt, {"answer": "red"})[0] is False
    assert score(yn, {"answer": "yes", "error": "stale"})[0] is False
    rels = [{"subject": "cup", "relation": "left of", "object": "plate", "holds": True, "probability": 0.7},
            {"subject": "cup", "relation": "above", "object": "plate", "holds": True, "probability": 0.6}]
    ok, detail = score(rel, {"relations": rels})
    assert ok is False and detail == {"relations_correct": 1, "relations_expected": 2}
    rels[1]["holds"] = False
    assert score(rel, {"relations": rels})[0] is True
    steps = [{"action": "Pick", "target": "the cup", "reference": "", "relation": "", "detail": "x"},
             {"action": "place", "target": "cup", "reference": "table", "relation": "on", "detail": ""}]
    assert score(plan, {"steps": steps}) == (True, {"steps_correct": 2, "steps_expected": 2})
    assert score(plan, {"steps": steps + steps[:1]})[0] is False  # an extra step is a different plan
    assert score(plan, {"steps": steps[::-1]})[0] is False


def test_summary_counts_accuracy_per_type():
    results = [
        {"type": "ask", "correct": True, "latency_s": 1.0, "error": ""},
        {"type": "ask", "correct": False, "latency_s": 3.0, "error": ""},
        {"type": "ask", "error": "stale window", "correct": False},
        {"type": "relations", "correct": True, "relations_correct": 2, "relations_expected": 2, "error": ""},
        {"type": "plan", "error": ""},
    ]
    s = summarize(results)
    assert list(s) == ["ask", "relations", "plan", "all"]
    assert (s["ask"]["questions"], s["ask"]["errors"], s["ask"]["scored"], s["ask"]["correct"]) == (3, 1, 3, 1)
    assert s["ask"]["accuracy"] == pytest.approx(1 / 3) and s["ask"]["mean_latency_s"] == pytest.approx(2.0)
    assert s["plan"]["accuracy"] is None
    assert s["all"]["correct"] == 2 and s["all"]["scored"] == 4
    table = format_summary(s)
    assert "33.3%" in table and "100.0% (2/2 rel.)" in table and table.splitlines()[0].split()[0] == "type"


def test_node_parameter_file_sections(tmp_path):
    path = _write(tmp_path, """
        /**:
          ros__parameters:
            use_sim_time: true
            window:
              num_frames: 3
        spatial_node:
          ros__parameters:
            image_topics: ["cam0/image_raw", "/cam1/image_raw/compressed:compressed"]
            window.max_age_s: 0.5
            generation:
              max_new_tokens: 12
            adapters: ["mine=/tmp/adapter"]
            active_adapter: mine
        other_node:
          ros__parameters: {window: {num_frames: 9}}
        """, "params.yaml")
    params = load_node_params(path)
    assert params["window.num_frames"] == 3 and params["window.max_age_s"] == 0.5
    s = ReplaySettings.from_params(params, path)
    assert s.image_topics == ["/cam0/image_raw", "/cam1/image_raw/compressed"]
    assert (s.num_frames, s.max_age_s, s.max_new_tokens) == (3, 0.5, 12)
    assert s.min_interval_s == node_defaults()["window.min_interval_s"]
    assert s.adapters == {"mine": "/tmp/adapter"} and s.active_adapter == "mine"
    s.check()
    bad = ReplaySettings.from_params({"adapters": [], "active_adapter": "ghost"})
    with pytest.raises(ParamsError, match="ghost"):
        bad.check()
    with pytest.raises(ParamsError, match="no 'spatial_node"):
        load_node_params(_write(tmp_path, "other:\n  ros__parameters: {a: 1}\n", "other.yaml"))
    with pytest.raises(ParamsError, match="window.num_frames|invalid literal"):
        ReplaySettings.from_params({"window.num_frames": "many"})


def test_topics_resolve_like_the_node():
    assert resolve_topic("camera/image_raw") == "/camera/image_raw"
    assert resolve_topic("/cam/image/compressed:compressed") == "/cam/image/compressed"
    assert resolve_topic("/cam/image:raw") == "/cam/image"
    assert resolve_topic("~/debug") == "/spatial_node/debug"
