"""The questions file of ``phi3v-spatial replay``: what to ask, when (bag time), and what answer to expect.

Each entry mirrors the request of the node interface it replays (``~/ask``, ``~/query_relations``,
``~/plan``) plus ``id``, ``at`` and ``expect``, so a question can be moved between a live robot and a bag
unchanged. A bad entry does not stop the others: it is kept with ``error`` set and reported in its result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..engine.parsing import Relation

NS = 1_000_000_000
TYPES = ("ask", "relations", "plan")
# `at` above this many seconds is an absolute stamp (2001-09-09), below it seconds from the bag start.
ABSOLUTE_AT_S = 1e9
END = "end"

_COMMON = {"id", "at", "type", "topics", "image_topics", "num_frames", "expect", "note"}
_FIELDS = {
    "ask": _COMMON | {"question", "max_new_tokens"},
    "relations": _COMMON | {"candidates"},
    "plan": _COMMON | {"instruction", "max_new_tokens"},
}
_TYPE_ALIASES = {"query_relations": "relations", "relation": "relations"}
STEP_KEYS = ("action", "target", "reference", "relation", "detail")


class QuestionsError(Exception):
    """The questions file as a whole is unusable (missing, not YAML, not a list)."""


@dataclass
class Question:
    """One entry; ``error`` is set (and the rest may be partial) when the entry itself is malformed."""

    id: str
    type: str
    at: Any = END                 # as written: seconds (relative or absolute), {sec, nanosec} or "end"
    question: str = ""
    candidates: list[Relation] = field(default_factory=list)
    instruction: str = ""
    topics: list[str] = field(default_factory=list)
    num_frames: int = 0
    max_new_tokens: int = 0
    expect: Any = None
    index: int = 0                # position in the file (ties at the same time keep file order)
    error: str = ""

    def resolve_at(self, start_ns: int) -> int | None:
        """Question time in ns (header-stamp clock), or None for ``end``; raises ValueError on a bad ``at``."""
        return resolve_at(self.at, start_ns)

    def request(self):
        """The request of the node interface this entry replays, for the request layer (``engine/requests.py``)."""
        from ..engine.requests import AskRequest, PlanRequest, RelationsRequest

        frames = {"topics": list(self.topics), "num_frames": self.num_frames}
        if self.type == "ask":
            return AskRequest(question=self.question, max_new_tokens=self.max_new_tokens, **frames)
        if self.type == "relations":
            return RelationsRequest(candidates=list(self.candidates), **frames)
        return PlanRequest(instruction=self.instruction, max_new_tokens=self.max_new_tokens, **frames)


def _seconds_to_ns(value) -> int:
    try:
        d = Decimal(str(value).strip())  # str(float) is the shortest exact repr: 1700000000.25 stays exact
    except InvalidOperation:
        raise ValueError(f"'at' must be seconds (a number), {{sec, nanosec}} or 'end', got {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"'at' must be a finite number of seconds, got {value!r}")
    return int((d * NS).to_integral_value())


def resolve_at(at, start_ns: int) -> int | None:
    """``end`` -> None; ``{sec, nanosec}`` or seconds > 1e9 -> that absolute stamp; smaller seconds -> start + at."""
    if at is None or (isinstance(at, str) and at.strip().lower() == END):
        return None
    if isinstance(at, bool):
        raise ValueError(f"'at' must be seconds or 'end', got {at!r}")
    if isinstance(at, dict):
        if set(at) - {"sec", "nanosec"} or "sec" not in at:
            raise ValueError(f"'at' as a stamp needs keys sec and nanosec, got {sorted(at)}")
        sec, nsec = int(at["sec"]), int(at.get("nanosec", 0))
        if not 0 <= nsec < NS:
            raise ValueError(f"'at'.nanosec must be in [0, 1e9), got {nsec}")
        return sec * NS + nsec
    ns = _seconds_to_ns(at)
    if abs(ns) > ABSOLUTE_AT_S * NS:
        return ns
    if ns < 0:
        raise ValueError(f"'at' = {at} s is before the bag start; use seconds from the start (>= 0), an absolute stamp or 'end'")
    return start_ns + ns


def _str_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"'{what}' must be a topic name or a list of topic names, got {value!r}")


def _count(value, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{what}' must be an integer >= 0 (0 = the node's default), got {value!r}")
    return value


def _relation(item, what: str, need_holds: bool = False) -> Relation:
    if not isinstance(item, dict):
        raise ValueError(f"{what} must be a mapping with subject, relation, object; got {item!r}")
    missing = [k for k in ("subject", "relation", "object") if not str(item.get(k) or "").strip()]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}: {item!r}")
    extra = set(item) - {"subject", "relation", "object", "holds", "probability"}
    if extra:
        raise ValueError(f"{what} has unknown key(s) {', '.join(sorted(extra))}")
    holds = item.get("holds", None if need_holds else False)
    if need_holds and not isinstance(holds, bool):
        raise ValueError(f"{what} needs 'holds: true' or 'holds: false', got {holds!r}")
    return Relation(str(item["subject"]), str(item["relation"]), str(item["object"]), holds=bool(holds))


def _check_expect(qtype: str, expect):
    """Normalise ``expect``: ask -> list of accepted answers; relations -> list[Relation]; plan -> list of steps."""
    if expect is None:
        return None
    if qtype == "ask":
        items = expect if isinstance(expect, list) else [expect]
        out = []
        for e in items:
            if isinstance(e, bool):  # YAML 1.1 reads an unquoted yes/no as a boolean
                out.append("yes" if e else "no")
            elif isinstance(e, (str, int, float)):
                out.append(str(e))
            else:
                raise ValueError(f"ask 'expect' must be answer text (or a list of accepted answers), got {e!r}")
        if not out:
            raise ValueError("ask 'expect' is an empty list")
        return out
    if qtype == "relations":
        if not isinstance(expect, list) or not expect:
            raise ValueError("relations 'expect' must be a non-empty list of {subject, relation, object, holds}")
        return [_relation(e, f"expect[{i}]", need_holds=True) for i, e in enumerate(expect)]
    if not isinstance(expect, list) or not expect:
        raise ValueError("plan 'expect' must be a non-empty list of steps ({action, target, ...} or 'action target' text)")
    steps = []
    for i, s in enumerate(expect):
        if isinstance(s, str) and s.strip():
            steps.append(s.strip())
        elif isinstance(s, dict) and s:
            bad = set(s) - set(STEP_KEYS)
            if bad:
                raise ValueError(f"plan expect[{i}] has unknown key(s) {', '.join(sorted(bad))}; steps have {', '.join(STEP_KEYS)}")
            steps.append({k: str(v) for k, v in s.items()})
        else:
            raise ValueError(f"plan expect[{i}] must be a step mapping or text, got {s!r}")
    return steps


def parse_entry(entry, index: int) -> Question:
    """One question from its YAML mapping; problems end up in ``Question.error`` (never raised)."""
    if not isinstance(entry, dict):
        return Question(id=f"#{index + 1}", type="?", index=index,
                        error=f"entry {index + 1} must be a mapping with id, at, type, ...; got {entry!r}")
    qid = str(entry.get("id", "")).strip() or f"#{index + 1}"
    raw_type = str(entry.get("type", "")).strip().lower()
    qtype = _TYPE_ALIASES.get(raw_type, raw_type)
    q = Question(id=qid, type=qtype or "?", at=entry.get("at", END), index=index)
    try:
        if qtype not in TYPES:
            raise ValueError(f"'type' must be one of {', '.join(TYPES)}, got {entry.get('type')!r}")
        unknown = set(entry) - _FIELDS[qtype]
        if unknown:
            raise ValueError(f"unknown key(s) for a {qtype} question: {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(_FIELDS[qtype]))})")
        resolve_at(q.at, 0)  # validate now, resolve once the bag start is known
        if "topics" in entry and "image_topics" in entry:
            raise ValueError("give either 'topics' or 'image_topics', not both")
        q.topics = _str_list(entry.get("topics", entry.get("image_topics")), "topics")
        q.num_frames = _count(entry.get("num_frames"), "num_frames")
        q.max_new_tokens = _count(entry.get("max_new_tokens"), "max_new_tokens")
        if qtype == "ask":
            q.question = str(entry.get("question") or "").strip()
            if not q.question:
                raise ValueError("an ask question needs a non-empty 'question'")
        elif qtype == "relations":
            cands = entry.get("candidates")
            if not isinstance(cands, list) or not cands:
                raise ValueError("a relations question needs 'candidates': a non-empty list of {subject, relation, object}")
            q.candidates = [_relation(c, f"candidates[{i}]") for i, c in enumerate(cands)]
        else:
            q.instruction = str(entry.get("instruction") or "").strip()
            if not q.instruction:
                raise ValueError("a plan question needs a non-empty 'instruction'")
        q.expect = _check_expect(qtype, entry.get("expect"))
    except (ValueError, TypeError) as e:
        q.error = f"question {qid} (entry {index + 1}): {e}"
    return q


def load_questions(path: str | os.PathLike) -> list[Question]:
    """All entries of a questions file: a YAML list, or a mapping with a ``questions:`` list."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise QuestionsError(f"cannot read questions file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise QuestionsError(f"questions file {str(path)!r} is not valid YAML: {e}") from None
    if isinstance(data, dict) and "questions" in data:
        data = data["questions"]
    if not isinstance(data, list):
        raise QuestionsError(f"questions file {str(path)!r} must hold a list of questions (or 'questions: [...]'), "
                             f"got {type(data).__name__}")
    questions = [parse_entry(e, i) for i, e in enumerate(data)]
    seen: dict[str, int] = {}
    for q in questions:
        if q.id in seen and not q.error:
            q.error = f"question {q.id} (entry {q.index + 1}): duplicate id (entry {seen[q.id] + 1} has it too)"
        seen.setdefault(q.id, q.index)
    return questions
