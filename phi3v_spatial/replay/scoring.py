"""Scoring replay answers against the questions file's ``expect`` values, and the summary table.

Matching is deliberately forgiving about form (case, punctuation, articles, relation synonyms) and strict
about content, so that "Yes." matches ``yes`` but "left" never matches "right".
"""
from __future__ import annotations

import re
from typing import Any

from ..engine.parsing import canonical_relation
from .question_file import STEP_KEYS

_ARTICLES = {"a", "an", "the"}


def norm(text: Any) -> str:
    """Lowercase words without punctuation or articles: 'The red cube.' -> 'red cube'."""
    words = re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def yes_no(text: str) -> str | None:
    """'yes'/'no' when the answer starts with it ("Yes, it is." -> 'yes'), else None."""
    words = norm(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def _rel_key(subject: str, relation: str, obj: str) -> tuple[str, str, str]:
    return norm(subject), norm(canonical_relation(relation)), norm(obj)


def score_ask(expect: list[str], answer: str) -> tuple[bool, dict]:
    """Yes/no expectations compare the answer's first word; others compare the normalised text."""
    for e in expect:
        want = norm(e)
        if want in ("yes", "no"):
            if yes_no(answer) == want:
                return True, {}
        elif norm(answer) == want:
            return True, {}
    return False, {}


def score_relations(expect, relations: list[dict]) -> tuple[bool, dict]:
    """Every expected relation must be among the scored ones with the same ``holds``."""
    got = {_rel_key(r["subject"], r["relation"], r["object"]): r for r in relations}
    hits, missing = 0, []
    for e in expect:
        r = got.get(_rel_key(e.subject, e.relation, e.object))
        if r is None:
            missing.append(f"{e.subject} | {e.relation} | {e.object}")
        elif bool(r["holds"]) == bool(e.holds):
            hits += 1
    detail = {"relations_correct": hits, "relations_expected": len(expect)}
    if missing:
        detail["relations_missing"] = missing
    return hits == len(expect), detail


def _step_matches(want, step: dict) -> bool:
    if isinstance(want, str):
        return norm(want) == norm(f"{step.get('action', '')} {step.get('target', '')}")
    return all(norm(v) == norm(step.get(k, "")) for k, v in want.items() if k in STEP_KEYS)


def score_plan(expect: list, steps: list[dict]) -> tuple[bool, dict]:
    """Same number of steps, each matching the fields the expected step gives (in order)."""
    hits = sum(1 for w, s in zip(expect, steps) if _step_matches(w, s))
    return hits == len(expect) == len(steps), {"steps_correct": hits, "steps_expected": len(expect)}


def score(question, result: dict) -> tuple[bool | None, dict]:
    """(correct, detail) for one result; None when there is nothing to compare; an error is never correct."""
    if question.expect is None or question.error:
        return None, {}
    if result.get("error"):
        return False, {}
    if question.type == "ask":
        return score_ask(question.expect, result.get("answer", ""))
    if question.type == "relations":
        return score_relations(question.expect, result.get("relations", []))
    return score_plan(question.expect, result.get("steps", []))


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per question type (and 'all'): counts, errors, accuracy over the questions with an ``expect``."""
    rows: dict[str, dict] = {}
    for r in results:
        for key in (r.get("type") or "?", "all"):
            row = rows.setdefault(key, {"questions": 0, "answered": 0, "errors": 0, "scored": 0, "correct": 0,
                                        "latency_s": 0.0, "rel_correct": 0, "rel_expected": 0})
            row["questions"] += 1
            if r.get("error"):
                row["errors"] += 1
            else:
                row["answered"] += 1
                row["latency_s"] += float(r.get("latency_s") or 0.0)
            if r.get("correct") is not None:
                row["scored"] += 1
                row["correct"] += int(bool(r["correct"]))
            row["rel_correct"] += int(r.get("relations_correct", 0))
            row["rel_expected"] += int(r.get("relations_expected", 0))
    for row in rows.values():
        row["accuracy"] = row["correct"] / row["scored"] if row["scored"] else None
        row["mean_latency_s"] = row["latency_s"] / row["answered"] if row["answered"] else None
    order = [t for t in ("ask", "relations", "plan") if t in rows] + sorted(set(rows) - {"ask", "relations", "plan", "all"})
    return {k: rows[k] for k in order + ["all"] if k in rows}


def format_summary(summary: dict[str, dict]) -> str:
    """A plain-text table: type | questions | answered | errors | scored | correct | accuracy | mean latency."""
    head = ("type", "questions", "answered", "errors", "scored", "correct", "accuracy", "latency_s")
    lines = []
    for name, row in summary.items():
        acc = f"{row['accuracy'] * 100:.1f}%" if row["accuracy"] is not None else "-"
        if row["rel_expected"] and name != "all":
            acc += f" ({row['rel_correct']}/{row['rel_expected']} rel.)"
        lat = f"{row['mean_latency_s']:.2f}" if row["mean_latency_s"] is not None else "-"
        lines.append((name, str(row["questions"]), str(row["answered"]), str(row["errors"]), str(row["scored"]),
                      str(row["correct"]), acc, lat))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)
