"""Turning generated text into structure: plan steps (JSON, tolerantly) and stated relations.

Small models and big ones alike wrap JSON in code fences, use single quotes, leave trailing commas or
stop mid-list when they hit the token limit; the plan parser repairs what can be repaired without
guessing, and says what it saw when it cannot.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from .prompts import PLAN_STEP_FIELDS


class PlanParseError(ValueError):
    """The generated text holds no recognisable plan; the message quotes what was generated."""


@dataclass
class Relation:
    """A relation between two objects (the ROS-free twin of ``ObjectRelation``)."""

    subject: str
    relation: str
    object: str
    holds: bool = False
    probability: float = -1.0


# Canonical relation -> phrasings that mean it (longest first when matching).
RELATION_SYNONYMS = {
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "in front of": ["in front of"],
    "behind": ["behind", "in back of"],
    "closer to the camera than": ["closer to the camera than", "nearer to the camera than", "closer than"],
    "farther from the camera than": ["farther from the camera than", "further from the camera than", "farther than", "further than"],
    "bigger than": ["bigger than", "larger than"],
    "smaller than": ["smaller than"],
    "on top of": ["on top of", "on"],
    "next to": ["next to", "beside"],
    "near": ["near", "close to"],
    "far from": ["far from", "far away from"],
}
_PHRASES = sorted(((p, c) for c, ps in RELATION_SYNONYMS.items() for p in ps), key=lambda pc: -len(pc[0]))
_PHRASE_RE = "|".join(re.escape(p) for p, _ in _PHRASES)
_CANON = {p: c for p, c in _PHRASES}
_WORD = r"(?!(?:and|or|but|while|which|that|is|are|the|of|not)\b)[a-z]+"
_NOUN = rf"{_WORD}(?: {_WORD}){{0,2}}"
_REL_RE = re.compile(
    rf"(?:\bthe )?(?P<subj>{_NOUN}) (?:is|are) (?P<neg>not )?(?:(?:located|positioned|placed) )?(?P<rel>{_PHRASE_RE}) (?:the )?(?P<obj>{_NOUN})(?=[\s.,;!?]|$)",
    re.IGNORECASE,
)
_QUESTION_RE = re.compile(
    rf"^\s*is (?:the )?(?P<subj>{_NOUN}) (?P<rel>{_PHRASE_RE}) (?:the )?(?P<obj>{_NOUN})\?", re.IGNORECASE
)


def canonical_relation(phrase: str) -> str:
    """Map a relation phrasing onto the canonical name (unknown phrasings come back stripped)."""
    return _CANON.get(phrase.strip().lower(), phrase.strip().lower())


def relations_from_text(text: str) -> list[Relation]:
    """Relations a sentence states, e.g. "The red cube is left of the blue sphere." (negations -> holds=False)."""
    out: list[Relation] = []
    for sentence in re.split(r"(?<=[.;!?])\s+|\n+", text.strip()):
        for m in _REL_RE.finditer(sentence.strip()):
            out.append(Relation(m["subj"].lower(), canonical_relation(m["rel"]), m["obj"].lower(), holds=not m["neg"]))
    return out


def relation_from_question(question: str, answer: str) -> list[Relation]:
    """A yes/no answer to "Is the X <rel> the Y? ..." states that relation (or its negation)."""
    word = answer.strip().lower().rstrip(".!")
    m = _QUESTION_RE.match(question)
    if not m or word not in ("yes", "no"):
        return []
    return [Relation(m["subj"].lower(), canonical_relation(m["rel"]), m["obj"].lower(), holds=word == "yes")]


def _strip_fences(text: str) -> str:
    m = re.search(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", text, re.DOTALL)
    return m.group(1) if m else text


def _balanced_span(text: str, start: int) -> tuple[str, bool]:
    """The bracketed text starting at ``start`` and whether it closed (string-aware)."""
    opener = text[start]
    closer = "]" if opener == "[" else "}"
    depth, in_str, quote, esc = 0, False, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if ch in "\"'":
            in_str, quote = True, ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1], ch == closer
    return text[start:], False


def _loads_lenient(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    fixed = re.sub(r",\s*([\]}])", r"\1", s)  # trailing commas
    try:
        return json.loads(fixed)
    except json.JSONDecodeError:
        pass
    try:  # single quotes, True/False/None
        return ast.literal_eval(fixed)
    except (ValueError, SyntaxError):
        return None


def _truncated_list(s: str):
    """A list cut off by the token limit: keep the complete objects, close the list."""
    end = s.rfind("}")
    while end > 0:
        obj = _loads_lenient(s[: end + 1] + "]")
        if isinstance(obj, list):
            return obj
        end = s.rfind("}", 0, end)
    return None


def _step(item) -> dict:
    if isinstance(item, dict):
        lowered = {str(k).lower(): v for k, v in item.items()}
        step = {f: "" if lowered.get(f) is None else str(lowered.get(f)) for f in PLAN_STEP_FIELDS}
        if not step["action"]:
            step["action"] = str(lowered.get("step") or lowered.get("name") or lowered.get("verb") or "")
        return step
    if isinstance(item, str):
        words = item.strip().split(maxsplit=1)
        return {"action": words[0] if words else "", "target": words[1] if len(words) > 1 else "",
                "reference": "", "relation": "", "detail": item.strip()}
    raise PlanParseError(f"a plan step must be an object or a string, got {type(item).__name__}")


@dataclass
class PlanReply:
    """A parsed plan reply: the steps, or no steps and why. ``missing`` names objects the model says are not in
    view (the request then fails with that reason); an empty plan with a ``reason`` (e.g. "already done") is a
    successful answer that needs no action."""

    steps: list
    reason: str = ""
    missing: list = None

    def __post_init__(self):
        self.missing = list(self.missing or [])

    @property
    def failure(self) -> str:
        """The operator-facing reason this reply is a refusal ("" when it is a plan, possibly empty)."""
        if not self.missing:
            return ""
        names = ", ".join(f"the {m}" for m in self.missing)
        return f"not in view: {names}" + (f" ({self.reason})" if self.reason else "")


def _plan_json(text: str):
    """The first JSON list/object in ``text`` (fences, quotes, trailing commas and truncation repaired)."""
    body = _strip_fences(text).strip()
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    if not starts:
        raise PlanParseError(f"no JSON list of steps in the model output: {text[:200]!r}")
    span, closed = _balanced_span(body, min(starts))
    data = _loads_lenient(span) if closed else None
    if data is None and span.startswith("["):
        data = _truncated_list(span)
    if data is None and span.startswith("{"):
        inner = span.find("[")
        if inner >= 0:  # {"steps": [ ... cut off by the token limit
            data = {"steps": _truncated_list(span[inner:]) or []}
    return data


def parse_plan_reply(text: str) -> PlanReply:
    """Steps, reason and missing objects from generated text; raises ``PlanParseError`` when there is no plan and
    no stated reason for its absence."""
    data = _plan_json(text)
    reason, missing = "", []
    if isinstance(data, dict):
        lowered = {str(k).lower(): v for k, v in data.items()}
        reason = str(lowered.get("reason") or "").strip()
        raw_missing = lowered.get("missing") or []
        missing = [str(m).strip() for m in (raw_missing if isinstance(raw_missing, list) else [raw_missing])
                   if str(m).strip()]
        for key in ("steps", "plan", "actions"):
            if isinstance(lowered.get(key), list):
                data = lowered[key]
                break
        else:
            data = [data] if "action" in lowered else ([] if (reason or missing) else None)
    if not isinstance(data, list):
        raise PlanParseError(f"could not parse a JSON plan from the model output: {text[:200]!r}")
    steps = [s for s in (_step(item) for item in data) if s["action"]]
    if not steps and not (reason or missing):
        raise PlanParseError(f"the model output holds an empty plan and no reason: {text[:200]!r}")
    return PlanReply(steps, reason, missing)


def parse_plan(text: str) -> list[dict]:
    """Plan steps (dicts with the PlanStep fields) from generated text; raises ``PlanParseError`` (also for a
    reply with no steps: use ``parse_plan_reply`` to accept those with their reason)."""
    reply = parse_plan_reply(text)
    if not reply.steps:
        raise PlanParseError(f"the model output holds an empty plan: {text[:200]!r}")
    return reply.steps
