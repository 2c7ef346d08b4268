"""Plan instructions about a synthetic scene, with ground-truth plans that the executor has checked.

Families (``SpatialRecord.family``):
- move: "Put the red cube left of the blue sphere." -> pick + place;
- refer: the same with a referring expression as target or reference, which only the image resolves ("the object
  closest to the camera", "the biggest cube", "the leftmost object", "the sphere behind the cone");
- multistep: "Line up the red cube, the blue sphere and the green cone from left to right.", "Put every cube in
  front of the yellow cylinder." -> several pick + place pairs;
- done: the instruction already holds -> no steps, reason "already done";
- missing: the instruction names an object that is not in view -> no steps, that object as ``missing``.

Every ground-truth plan is executed by ``data.executor`` before it becomes a record, so a training target never
fails its own check. Sentence templates come in two sets: ``TRAIN`` (training data) and ``HELD_OUT`` (evaluation
only, ``SpatialRecord.template == "held-out"``), so evaluation also measures instructions phrased in words the
model never saw in that role. Training instructions may also carry filler words at any word boundary
(``with_fillers``), so that an unknown word inside an instruction does not throw off which names the plan copies.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..engine import prompts
from .executor import PLACE_RELATIONS, goal_holds, judge_plan
from .records import SpatialRecord
from .scene import PALETTE, SHAPES, SynthScene, relation_holds

FAMILIES = ("move", "refer", "multistep", "done", "missing")
# Records per scene are drawn from the families with these weights.
FAMILY_WEIGHTS = {"move": 0.15, "refer": 0.3, "multistep": 0.35, "done": 0.1, "missing": 0.1}

# Training wording is varied on purpose: with one to three phrasings per kind the model learned the sentence, not
# its structure, and unseen phrasings failed (runs/S15: lineup/every held out 9% against 86% in training wording).
# The held-out templates keep words no training template uses ("Set ... down", "Can you", "Arrange ... in a row",
# "each"; test_data_executor checks it), so evaluation still measures wording the model never saw.
MOVE_TEMPLATES = {"train": ("Put {a} {rel} {b}.", "Place {a} {rel} {b}.", "Move {a} {rel} {b}.",
                            "Please put {a} {rel} {b}.", "Pick up {a} and place it {rel} {b}.",
                            "Take {a} and put it {rel} {b}.", "I want {a} {rel} {b}.",
                            "Make sure {a} ends up {rel} {b}.", "Get {a} {rel} {b}, please.",
                            "Position {a} {rel} {b}.", "Relocate {a} so that it is {rel} {b}.",
                            "Bring {a} {rel} {b}."),
                  "held-out": ("Set {a} down {rel} {b}.", "Can you put {a} {rel} {b}?")}
LINEUP_TEMPLATES = {"train": ("Line up {a}, {b} and {c} from left to right.",
                              "Order {a}, {b} and {c} from left to right.",
                              "Put {a}, {b} and {c} in order from left to right.",
                              "Sort {a}, {b} and {c} from left to right.",
                              "From left to right, line up {a}, {b} and {c}.",
                              "Place {a}, {b} and {c} from left to right.",
                              "Line {a}, {b} and {c} up, left to right."),
                    "held-out": ("Arrange {a}, {b} and {c} in a row from left to right.",)}
EVERY_TEMPLATES = {"train": ("Put every {shape} {rel} {b}.", "Move every {shape} {rel} {b}.",
                             "Put all the {shape}s {rel} {b}.", "Move all {shape}s {rel} {b}.",
                             "Every {shape} goes {rel} {b}.", "Take every {shape} and put it {rel} {b}.",
                             "All {shape}s should end up {rel} {b}.", "Bring every {shape} {rel} {b}."),
                   "held-out": ("Place each {shape} {rel} {b}.",)}
# Superlatives a referring expression can use: relation that the winner holds against every other candidate.
SUPERLATIVE_PHRASES = {
    "left of": "leftmost", "right of": "rightmost", "bigger than": "biggest", "smaller than": "smallest",
    "closer to the camera than": "{x} closest to the camera", "farther from the camera than": "{x} farthest from the camera",
}
REFER_RELATIONS = ("left of", "right of", "in front of", "behind")

# Fillers for training instructions. runs/S16 copied the right names for "Arrange A, B and C from left to right."
# (58/59) and the wrong ones once any unseen word stood between C and "from left to right" ("in a row" 0/59,
# "neatly" 0/59; "please", a training word, 57/59): the copy was keyed to word positions. Training with words that
# carry nothing, at random places, makes the positions vary. Half are English, half made up from a syllable set
# (``nonce_word``), so unknown tokens are among them; none is a word of a held-out template (test_data_executor).
# With them (runs/S17) the held-out line-ups went from 0/59 to 58/59.
FILLER_WORDS = ("now", "neatly", "carefully", "gently", "quickly", "slowly", "for me", "on the table", "if possible",
                "thanks", "again", "too", "as well", "exactly", "properly", "soon", "then", "here", "there", "today",
                "at once", "by hand", "with care", "okay", "just", "first of all", "when you are ready")
NONCE_CONSONANTS, NONCE_VOWELS = "bdfgklmnprstvz", "aeiou"
# Share of training plan instructions that get fillers (one, sometimes two); evaluation data gets none.
TRAIN_FILLER_RATE = 0.5


def _reserved_words() -> set[str]:
    """Words a made-up filler must not be: colours, shapes, relation words and every template's words."""
    texts = list(PALETTE) + list(SHAPES) + list(PLACE_RELATIONS) + list(SUPERLATIVE_PHRASES.values())
    texts += [t for table in (MOVE_TEMPLATES, LINEUP_TEMPLATES, EVERY_TEMPLATES) for ts in table.values() for t in ts]
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


_RESERVED = _reserved_words()


def nonce_word(rng: np.random.Generator) -> str:
    """A made-up word of two or three consonant-vowel syllables ("tamoki") that is none of the reserved words."""
    while True:
        word = "".join(NONCE_CONSONANTS[int(rng.integers(len(NONCE_CONSONANTS)))] +
                       NONCE_VOWELS[int(rng.integers(len(NONCE_VOWELS)))] for _ in range(int(rng.integers(2, 4))))
        if word not in _RESERVED:
            return word


def with_fillers(template: str, rng: np.random.Generator) -> str:
    """``template`` with one filler (sometimes two) at random word boundaries: before the first word (which then
    loses its capital, unless it is "I"), between two words, or after the last one (before its full stop); never
    inside "left to right", which says the order, nor between a relation and its reference."""
    words = template.replace("left to right", "left\0to\0right").split(" ")
    for _ in range(1 + int(rng.random() < 0.3)):
        filler = (FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))] if rng.random() < 0.5 else nonce_word(rng))
        gaps = [g for g in range(len(words) + 1) if g == 0 or "{rel}" not in words[g - 1]]
        gap = gaps[int(rng.integers(len(gaps)))]
        if gap == 0:
            first = words[0] if words[0] == "I" else words[0][:1].lower() + words[0][1:]
            words = [filler[:1].upper() + filler[1:], first] + words[1:]
        elif gap == len(words):
            last = words[-1]
            stop = last[-1] if last[-1] in ".?" else ""
            words = words[:-1] + [last[:len(last) - len(stop)], filler + stop]
        else:
            words.insert(gap, filler)
    return " ".join(words).replace("\0", " ")


def _the(name: str) -> str:
    return f"the {name}"


def _step(action: str, target: str, reference: str = "", relation: str = "") -> dict:
    return {"action": action, "target": target, "reference": reference, "relation": relation, "detail": ""}


def move_steps(target: str, relation: str, reference: str) -> list[dict]:
    return [_step("pick", target), _step("place", target, reference, relation)]


def referring_expressions(scene: SynthScene, camera: int = 0) -> list[tuple[str, str, str]]:
    """(expression, object name, anchor) triples that pick out exactly one object clearly: superlatives over all
    objects or over one shape ("the biggest cube"; anchor ""), and "the <shape> <relation> the <anchor>" among
    objects of that shape."""
    names = scene.names
    shape_of = {o.name: o.shape for o in scene.objects}
    out = []

    def winner(rel: str, cands: list[str]) -> str | None:
        for a in cands:
            if all(relation_holds(scene, a, rel, b, 0, camera) is True for b in cands if b != a):
                return a
        return None

    groups = [("object", names)] if len(names) >= 3 else []
    groups += [(s, [n for n in names if shape_of[n] == s]) for s in SHAPES]
    for noun, cands in groups:
        if len(cands) < 2:
            continue
        for rel, phrase in SUPERLATIVE_PHRASES.items():
            w = winner(rel, cands)
            if w is not None:
                text = phrase.format(x=noun) if "{x}" in phrase else f"{phrase} {noun}"
                out.append((f"the {text}", w, ""))
    for s in SHAPES:
        cands = [n for n in names if shape_of[n] == s]
        for ref in names:
            for rel in REFER_RELATIONS:
                others = [c for c in cands if c != ref]
                truth = {c: relation_holds(scene, c, rel, ref, 0, camera) for c in others}
                hits = [c for c, v in truth.items() if v is True]
                if len(hits) == 1 and all(v is False for c, v in truth.items() if c != hits[0]) and shape_of[ref] != s:
                    out.append((f"the {s} {rel} the {ref}", hits[0], ref))
    return out


class PlanMaker:
    """Draws plan records for one scene (camera 0, frame 0). ``templates`` is "train" or "all" (training plus the
    held-out sentence templates, for evaluation data); ``fillers`` is the share of training-set instructions that
    get filler words (``with_fillers``)."""

    def __init__(self, scene: SynthScene, image: str, rng: np.random.Generator, templates: str = "train",
                 fillers: float = 0.0):
        self.scene, self.image, self.rng = scene, image, rng
        self.sets = ["train"] + (["held-out"] if templates == "all" else [])
        self.names = scene.names
        self.fillers = fillers

    def _template(self, table: dict) -> tuple[str, str]:
        """(template, set): evaluation data draws the set first, half and half, so the held-out share of a family
        does not shrink when training gets more phrasings."""
        tset = self._pick(self.sets)
        template = self._pick(table[tset])
        if tset == "train" and self.fillers > 0 and self.rng.random() < self.fillers:
            template = with_fillers(template, self.rng)
        return template, tset

    def _pick(self, seq: Sequence):
        return seq[int(self.rng.integers(len(seq)))]

    def _ok(self, steps: list[dict], goal: list, movable: list[str]) -> bool:
        return judge_plan(self.scene, steps, goal, movable).success

    def _record(self, j: int, family: str, template_set: str, instruction: str, steps: list[dict], goal: list,
                movable: list[str], missing: Sequence[str] = (), reason: str = "", subj: str = "", rel: str = "",
                obj: str = "", expression: str = "") -> SpatialRecord:
        return SpatialRecord(
            id=f"synth-{self.scene.id}-c0-plan-{j}", images=[self.image], type="plan", source="synth",
            question=prompts.plan_request(instruction), answer=prompts.plan_reply(steps, reason, missing),
            plan=steps, relation=rel, subj=subj, obj=obj, family=family, goal=[list(g) for g in goal],
            movable=sorted(movable), missing=list(missing), expression=expression, scene=self.scene.id,
            template="" if template_set == "train" else template_set)

    def move(self, j: int, done: bool = False) -> SpatialRecord | None:
        """Put A rel B; ``done`` draws one that already holds (-> no steps, "already done")."""
        for _ in range(30):
            a, b = (str(x) for x in self.rng.choice(self.names, size=2, replace=False))
            rel = self._pick(PLACE_RELATIONS)
            holds = relation_holds(self.scene, a, rel, b)
            if holds is None or holds is not done:
                continue
            template, tset = self._template(MOVE_TEMPLATES)
            steps = [] if done else move_steps(a, rel, b)
            goal = [(a, rel, b)]
            if self._ok(steps, goal, [a]):
                return self._record(j, "done" if done else "move", tset, template.format(a=_the(a), rel=rel, b=_the(b)),
                                    steps, goal, [a], reason=prompts.PLAN_DONE_REASON if done else "", subj=a, rel=rel, obj=b)
        return None

    def refer(self, j: int) -> SpatialRecord | None:
        exprs = referring_expressions(self.scene)
        if not exprs:
            return None
        for _ in range(30):
            expr, who, anchor = exprs[int(self.rng.integers(len(exprs)))]
            others = [n for n in self.names if n not in (who, anchor)]
            if not others:
                continue
            other = str(self._pick(others))
            rel = self._pick(PLACE_RELATIONS)
            as_target = self.rng.random() < 0.6
            a, b, text_a, text_b = (who, other, expr, _the(other)) if as_target else (other, who, _the(other), expr)
            if relation_holds(self.scene, a, rel, b) is not False:
                continue
            template, tset = self._template(MOVE_TEMPLATES)
            steps, goal = move_steps(a, rel, b), [(a, rel, b)]
            if self._ok(steps, goal, [a]):
                return self._record(j, "refer", tset, template.format(a=text_a, rel=rel, b=text_b), steps, goal, [a],
                                    subj=a, rel=rel, obj=b, expression=expr)
        return None

    def multistep(self, j: int) -> SpatialRecord | None:
        shape_of = {o.name: o.shape for o in self.scene.objects}
        for _ in range(30):
            if len(self.names) >= 3 and self.rng.random() < 0.5:
                a, b, c = (str(x) for x in self.rng.choice(self.names, size=3, replace=False))
                goal = [(a, "left of", b), (b, "left of", c)]
                if goal_holds(self.scene, goal):
                    continue
                steps = [_step("pick", b), _step("place", b, a, "right of"), _step("pick", c), _step("place", c, b, "right of")]
                template, tset = self._template(LINEUP_TEMPLATES)
                if self._ok(steps, goal, [b, c]):
                    return self._record(j, "multistep", tset, template.format(a=_the(a), b=_the(b), c=_the(c)), steps,
                                        goal, [b, c], subj=b, rel="left of", obj=c)
                continue
            shape = self._pick(SHAPES)
            members = sorted(n for n in self.names if shape_of[n] == shape)
            refs = [n for n in self.names if shape_of[n] != shape]
            if len(members) < 2 or not refs:
                continue
            ref, rel = str(self._pick(refs)), self._pick(PLACE_RELATIONS)
            todo = [m for m in members if relation_holds(self.scene, m, rel, ref) is not True]
            if not todo:
                continue
            steps = [s for m in todo for s in move_steps(m, rel, ref)]
            goal = [(m, rel, ref) for m in members]
            template, tset = self._template(EVERY_TEMPLATES)
            if self._ok(steps, goal, todo):
                return self._record(j, "multistep", tset, template.format(shape=shape, rel=rel, b=_the(ref)), steps,
                                    goal, todo, subj=todo[0], rel=rel, obj=ref)
        return None

    def missing(self, j: int) -> SpatialRecord | None:
        """An instruction naming an object whose colour is not in view (the colour is what the image shows)."""
        absent = [c for c in PALETTE if c not in {o.colour for o in self.scene.objects}]
        if not absent:
            return None
        ghost = f"{self._pick(absent)} {self._pick(SHAPES)}"
        other = str(self._pick(self.names))
        rel = self._pick(PLACE_RELATIONS)
        a, b = (ghost, other) if self.rng.random() < 0.5 else (other, ghost)
        template, tset = self._template(MOVE_TEMPLATES)
        return self._record(j, "missing", tset, template.format(a=_the(a), rel=rel, b=_the(b)), [], [], [],
                            missing=[ghost], subj=a, rel=rel, obj=b)

    def draw(self, j: int, family: str) -> SpatialRecord | None:
        if family in ("move", "done"):
            return self.move(j, done=family == "done")
        return getattr(self, family)(j)


def instruction_of(record: SpatialRecord) -> str:
    """The instruction inside a plan record's question (``prompts.plan_request``)."""
    first = record.question.split("\n", 1)[0]
    return first[len("Instruction: "):] if first.startswith("Instruction: ") else first


def plan_records(scene: SynthScene, image: str, rng: np.random.Generator, n: int, templates: str = "train",
                 families: Sequence[str] | None = None, fillers: float = 0.0) -> list[SpatialRecord]:
    """``n`` plan records about camera 0's frame 0, families drawn by ``FAMILY_WEIGHTS`` (a family the scene
    cannot support, e.g. multistep with two objects, falls back to a move); ``fillers`` as in ``PlanMaker``."""
    if len(scene.names) < 2 or n <= 0:
        return []
    fams = list(families or FAMILIES)
    w = np.array([FAMILY_WEIGHTS[f] for f in fams], dtype=np.float64)
    maker = PlanMaker(scene, image, rng, templates, fillers)
    out: list[SpatialRecord] = []
    for _ in range(n):
        family = fams[int(rng.choice(len(fams), p=w / w.sum()))]
        rec = maker.draw(len(out), family) or (maker.move(len(out)) if family != "move" else None)
        if rec is not None:
            out.append(rec)
    return out
