"""Templated questions about a synthetic scene (SpatialVLM / VQASynth spirit), labelled from its 3D truth.

Why templated: training and inference must phrase relation, caption, choice and plan questions identically,
so those go through ``phi3v_spatial.engine.prompts``. Ambiguous pairs (``relation_holds`` is None) are never
asked; yes/no labels are balanced per scene and camera. "describe" lists objects sorted by name (colour
first), never by position, so base pretraining cannot leak left/right into the model.

Kinds: yesno, choice, open (one object name), quantitative (value + unit + relative tolerance), multiframe (two
frames of camera 0 with motion, or the two cameras' images), plan (``data.plans``: answer =
``prompts.plan_reply(...)``, steps also in ``plan``), describe, count, and the opt-in presence, locate and refer
("Which one is the biggest cube?": the object a plan's referring expression means).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..engine import prompts
from .records import RECORD_TYPES, SpatialRecord
from .plans import TRAIN_FILLER_RATE, instruction_of, plan_records, referring_expressions
from .scene import (
    CONVERSE, IMAGE_MARGIN_FRAC, PALETTE, RELATIONS, SynthScene, camera_distance, distance,
    relation_holds,
)
from .vsr import VSR_META_CATEGORIES

KINDS = RECORD_TYPES
# "presence", "locate" (base pretraining of the embedded model) and "refer" (referring-expression grounding, in the
# embedded adapter's data: train/embedded.py) are opt-in, so default datasets are unchanged.
DEFAULT_KINDS = tuple(k for k in KINDS if k not in ("presence", "locate", "refer"))
# Records per scene (per camera for the single-image kinds); presence asks about every palette colour.
DEFAULT_COUNTS = {"yesno": 4, "choice": 2, "open": 1, "quantitative": 2, "multiframe": 2, "multicamera": 1, "plan": 1, "describe": 1, "count": 1,
                  "presence": 6, "locate": 4, "refer": 2}
QUANT_TOLERANCE = 0.25  # relative
MOTION_MARGIN_M = 0.2

DESCRIBE_QUESTION = "What objects are in the image?"
PRESENCE_QUESTION = "Is there {colour} object? Answer yes or no."   # colour with its article
LOCATE_QUESTION = "Where is the {colour} object?"
LOCATE_COLUMNS = ("far left", "left", "centre", "right", "far right")   # fifths of the image width
LOCATE_DEPTHS = ((2.7, "near"), (3.6, "middle"), (float("inf"), "far"))  # camera-frame depth (m) bands
COUNT_QUESTION = "How many objects are there?"
MOVED_QUESTION = "Which object moved?"
SUPERLATIVES = {
    "left of": ("Which object is leftmost?", "the leftmost object"),
    "right of": ("Which object is rightmost?", "the rightmost object"),
    "closer to the camera than": ("Which object is closest to the camera?", "the object closest to the camera"),
    "farther from the camera than": ("Which object is farthest from the camera?", "the object farthest from the camera"),
    "bigger than": ("Which object is the biggest?", "the biggest object"),
    "smaller than": ("Which object is the smallest?", "the smallest object"),
    "above": ("Which object is the highest?", "the highest object"),
}
PAIR_CHOICES = {
    "left of": "Which is further left, the {a} or the {b}?",
    "right of": "Which is further right, the {a} or the {b}?",
    "closer to the camera than": "Which is closer to the camera, the {a} or the {b}?",
    "farther from the camera than": "Which is farther from the camera, the {a} or the {b}?",
    "bigger than": "Which is bigger, the {a} or the {b}?",
    "smaller than": "Which is smaller, the {a} or the {b}?",
    "above": "Which is higher, the {a} or the {b}?",
    "below": "Which is lower, the {a} or the {b}?",
}
OPEN_QUESTION = "What is {rel} the {ref}?"
REFER_QUESTION = "Which one is {expression}?"
QUANT_QUESTIONS = {
    "distance": "How far apart are the {a} and the {b}?",
    "camera": "How far is the {a} from the camera?",
    "height": "How tall is the {a}?",
    "ratio": "How many times bigger is the {a} than the {b}?",
}


def caption(subj: str, relation: str, obj: str) -> str:
    """VSR-style statement, e.g. "The red cube is left of the blue sphere."."""
    return f"The {subj} is {relation} the {obj}."


def meta_category(relation: str) -> str:
    """VSR meta-category ("" for the synthetic-only relations such as "bigger than")."""
    return VSR_META_CATEGORIES.get(relation, "")


def format_quantity(value: float) -> str:
    """Two significant figures below 1, one decimal above: "0.85", "1.3"."""
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _ctx(scene: SynthScene, camera: int, image: str, kind: str, j: int) -> dict:
    return dict(id=f"synth-{scene.id}-c{camera}-{kind}-{j}", images=[image], type=kind, source="synth", scene=scene.id)


def _pair(rng: np.random.Generator, names: list[str]) -> tuple[str, str]:
    i, k = rng.choice(len(names), size=2, replace=False)
    return names[int(i)], names[int(k)]


# Each group is a relation and its converse; groups are drawn uniformly among those with a clear pair, so rare
# relations (above/below need a floating object) are not drowned by the common ones.
_GROUPS = ("left of", "above", "in front of", "closer to the camera than", "bigger than")
# One direction of each relation pair. With both directions asked equally, the answer is (direction word) XOR
# (geometry): neither alone says anything about it, and a model trained from scratch sits at chance for long
# (toy version: left-only learns in 750 steps, left+right leaves chance after 2750). Training on these first
# breaks the tie (the embedded recipe's ``lora_canonical_steps``).
CANONICAL_RELATIONS = frozenset(_GROUPS)


def yesno_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """``n`` yes/no relation questions, labels balanced (a shuffled half-yes half-no list)."""
    names = scene.names
    if len(names) < 2 or n <= 0:
        return []
    clear: dict[str, list[tuple[str, str]]] = {}
    for g in _GROUPS:
        pairs = [(a, b) for a in names for b in names if a != b and relation_holds(scene, a, g, b, 0, camera) is not None]
        if pairs:
            clear[g] = pairs
    if not clear:
        return []
    labels = ([1, 0] * ((n + 1) // 2))[:n]
    rng.shuffle(labels)
    seen: set[tuple[str, str, str]] = set()
    out = []
    groups = sorted(clear)
    for label in labels:
        for _ in range(40):
            g = groups[int(rng.integers(len(groups)))]
            a, b = clear[g][int(rng.integers(len(clear[g])))]
            rel = g if rng.random() < 0.5 else CONVERSE[g]
            if relation_holds(scene, a, rel, b, 0, camera) != bool(label):
                rel = CONVERSE[rel]
            if (a, rel, b) in seen or (b, CONVERSE[rel], a) in seen:
                continue
            seen.add((a, rel, b))
            out.append(SpatialRecord(**_ctx(scene, camera, image, "yesno", len(out)),
                                     question=prompts.relation_question(a, rel, b),
                                     answer=prompts.YES if label else prompts.NO, relation=rel, subj=a, obj=b,
                                     label=label, caption=caption(a, rel, b), meta_category=meta_category(rel)))
            break
    return out


def _winner(scene: SynthScene, rel: str, names: list[str], camera: int) -> str | None:
    for a in names:
        if all(relation_holds(scene, a, rel, b, 0, camera) is True for b in names if b != a):
            return a
    return None


def choice_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """Superlatives over all objects ("Which object is leftmost?") and two-way choices ("Which is bigger, ...?")."""
    names = sorted(scene.names)
    if len(names) < 2:
        return []
    out, asked = [], set()
    for _ in range(n):
        for _ in range(30):
            if rng.random() < 0.5 and len(names) >= 3:
                rel = list(SUPERLATIVES)[int(rng.integers(len(SUPERLATIVES)))]
                winner = _winner(scene, rel, names, camera)
                if winner is None or ("sup", rel) in asked:
                    continue
                asked.add(("sup", rel))
                text, phrase = SUPERLATIVES[rel]
                out.append(SpatialRecord(**_ctx(scene, camera, image, "choice", len(out)),
                                         question=prompts.choice_question(text, names), answer=winner, choices=list(names),
                                         relation=rel, subj=winner, label=1, caption=f"The {winner} is {phrase}.",
                                         meta_category=meta_category(rel)))
                break
            rel = list(PAIR_CHOICES)[int(rng.integers(len(PAIR_CHOICES)))]
            a, b = _pair(rng, names)
            holds = relation_holds(scene, a, rel, b, 0, camera)
            if holds is None or (rel, frozenset((a, b))) in asked:
                continue
            asked.add((rel, frozenset((a, b))))
            win, lose = (a, b) if holds else (b, a)
            out.append(SpatialRecord(**_ctx(scene, camera, image, "choice", len(out)),
                                     question=prompts.choice_question(PAIR_CHOICES[rel].format(a=a, b=b), [a, b]),
                                     answer=win, choices=[a, b], relation=rel, subj=win, obj=lose, label=1,
                                     caption=caption(win, rel, lose), meta_category=meta_category(rel)))
            break
    return out


def open_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """"What is left of the red cube?" -> the one object for which it clearly holds (asked only when exactly one
    does and it clearly fails for every other), so the answer is an object name the model must read off the image."""
    names = sorted(scene.names)
    if len(names) < 2:
        return []
    out, asked = [], set()
    for _ in range(n):
        for _ in range(30):
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            ref = names[int(rng.integers(len(names)))]
            truth = {o: relation_holds(scene, o, rel, ref, 0, camera) for o in names if o != ref}
            hits = [o for o, v in truth.items() if v]
            if any(v is None for v in truth.values()) or len(hits) != 1 or (rel, ref) in asked:
                continue
            asked.add((rel, ref))
            out.append(SpatialRecord(**_ctx(scene, camera, image, "open", len(out)),
                                     question=OPEN_QUESTION.format(rel=rel, ref=ref), answer=hits[0], relation=rel,
                                     subj=hits[0], obj=ref, meta_category=meta_category(rel)))
            break
    return out


def refer_records(scene: SynthScene, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """"Which one is the biggest cube?" -> "green cube": up to ``n`` different referring expressions of the plans'
    kind (``plans.referring_expressions``, camera 0, frame 0), each picking out exactly one object clearly."""
    found = referring_expressions(scene, 0)
    out = []
    for k in rng.permutation(len(found))[:n] if found else ():
        expression, name, anchor = found[int(k)]
        out.append(SpatialRecord(**_ctx(scene, 0, image, "refer", len(out)),
                                 question=REFER_QUESTION.format(expression=expression), answer=name, subj=name,
                                 obj=anchor, expression=expression))
    return out


def quantitative_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """Metric answers ("0.85 m") with the true ``value`` and a relative ``tolerance``."""
    names = scene.names
    out, asked = [], set()
    for _ in range(n):
        for _ in range(20):
            kind = list(QUANT_QUESTIONS)[int(rng.integers(len(QUANT_QUESTIONS)))]
            if kind in ("distance", "ratio"):
                if len(names) < 2:
                    continue
                a, b = _pair(rng, names)
            else:
                a, b = names[int(rng.integers(len(names)))], ""
            if kind == "distance":
                value, unit = distance(scene, a, b), "m"
            elif kind == "camera":
                value, unit = camera_distance(scene, a, 0, camera), "m"
            elif kind == "height":
                value, unit = scene.object(a).height, "m"
            else:
                value, unit = scene.object(a).size / scene.object(b).size, "times"
                if relation_holds(scene, a, "bigger than", b) is not True:
                    continue
            key = (kind, frozenset((a, b)))
            if key in asked:
                continue
            asked.add(key)
            out.append(SpatialRecord(**_ctx(scene, camera, image, "quantitative", len(out)),
                                     question=QUANT_QUESTIONS[kind].format(a=a, b=b),
                                     answer=f"{format_quantity(value)} {unit}", relation="bigger than" if kind == "ratio" else "",
                                     subj=a, obj=b, value=round(float(value), 4), unit=unit, tolerance=QUANT_TOLERANCE))
            break
    return out


def _motion_truths(scene: SynthScene, x: str) -> dict[str, bool | None]:
    """Whether ``x`` clearly moved closer / farther / left / right in camera 0's images from the first frame to the
    last (image motion: camera motion moves every object in the image); None when too small to call either way."""
    last = scene.num_frames - 1
    d = camera_distance(scene, x, last) - camera_distance(scene, x, 0)
    du = float(scene.pixel(x, last)[0] - scene.pixel(x, 0)[0])
    dx = float(scene.camera_position(x, last)[0] - scene.camera_position(x, 0)[0])
    m = IMAGE_MARGIN_FRAC * scene.cameras[0][0].width

    def signed(yes: bool, no: bool) -> bool | None:
        return True if yes else (False if no else None)

    return {
        "closer to the camera": signed(d <= -MOTION_MARGIN_M, d >= -0.02),
        "farther from the camera": signed(d >= MOTION_MARGIN_M, d <= 0.02),
        "to the left": signed(du <= -m and dx <= -0.1, du >= -0.5 and dx >= -0.01),
        "to the right": signed(du >= m and dx >= 0.1, du <= 0.5 and dx <= 0.01),
    }


MOTION_RELATIONS = ("left of", "right of", "in front of", "behind")


def multiframe_records(scene: SynthScene, images: list[str], rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """Questions that need two frames of camera 0 (first and last): which object moved, did an object move closer /
    farther / left / right (yes/no, labels balanced), towards or away, and whether a relation holds in the last
    frame but not in the first. ``family``: "motion" or "relation change"."""
    if scene.num_frames < 2 or scene.motion == "none" or n <= 0:
        return []
    last = scene.num_frames - 1
    frames = [images[0], images[last]]
    names = sorted(scene.names)
    out: list[SpatialRecord] = []

    def add(question, answer, family, choices=(), subj="", obj="", relation="", label=None):
        out.append(SpatialRecord(id=f"synth-{scene.id}-c0-multiframe-{len(out)}", images=list(frames),
                                 type="multiframe", source="synth", scene=scene.id, family=family,
                                 question=prompts.choice_question(question, choices) if choices else question,
                                 answer=answer, choices=list(choices), subj=subj, obj=obj, relation=relation,
                                 label=label))

    if scene.motion == "object" and len(names) >= 2 and rng.random() < 0.5:
        add(MOVED_QUESTION, scene.moving, "motion", names, subj=scene.moving)
    # A relation that holds in the last frame but not in the first: rare, so asked as a yes and a no together.
    changes: dict[bool, list] = {True: [], False: []}
    for a in names:
        for b in names:
            for rel in MOTION_RELATIONS if a != b else ():
                first, end = relation_holds(scene, a, rel, b, 0), relation_holds(scene, a, rel, b, last)
                if first is not None and end is not None:
                    changes[bool(end and not first)].append((a, rel, b))
    if changes[True] and changes[False] and rng.random() < 0.5 and n - len(out) >= 2:
        for label in (1, 0):
            a, rel, b = changes[bool(label)][int(rng.integers(len(changes[bool(label)])))]
            add(f"Is the {a} {rel} the {b} in the last frame but not in the first? Answer yes or no.",
                prompts.YES if label else prompts.NO, "relation change", subj=a, obj=b, relation=rel, label=label)
    truths = {x: _motion_truths(scene, x) for x in names}
    labels = ([1, 0] * n)[: max(0, n - len(out))]
    rng.shuffle(labels)
    for label in labels:
        options = [(x, w) for x in names for w, v in truths[x].items() if v is bool(label)]
        if not options:
            continue
        x, w = options[int(rng.integers(len(options)))]
        if rng.random() < 0.3 and w in ("closer to the camera", "farther from the camera") and label:
            add(f"Is the {x} moving towards or away from the camera?", "towards" if w.startswith("closer") else "away",
                "motion", ["towards", "away"], subj=x)
            continue
        add(f"Did the {x} move {w}? Answer yes or no.", prompts.YES if label else prompts.NO, "motion", subj=x,
            relation=w, label=label)
    return out[:n]


TWO_CAMERA_ORDINALS = ("first", "second")


def two_camera_records(scene: SynthScene, images: list[str], rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """Questions about the two cameras' frame-0 images of one scene (``family`` "two cameras"): a relation in the
    first or the second image (yes/no, balanced), and in which image a relation holds when it holds in one only."""
    if scene.num_cameras < 2 or len(scene.names) < 2 or n <= 0:
        return []
    names = sorted(scene.names)
    out: list[SpatialRecord] = []
    labels = ([1, 0] * n)[:n]
    rng.shuffle(labels)

    def add(k: int, **kw):
        out.append(SpatialRecord(id=f"synth-{scene.id}-cams-{len(out)}", images=list(images), type="multiframe",
                                 source="synth", scene=scene.id, family="two cameras", about_image=k, **kw))

    for label in labels:
        for _ in range(30):
            a, b = (str(v) for v in rng.choice(names, size=2, replace=False))
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            truth = [relation_holds(scene, a, rel, b, 0, c) for c in range(2)]
            if rng.random() < 0.3 and None not in truth and truth[0] != truth[1]:
                k = truth.index(True)
                add(k, question=prompts.choice_question(f"In which image is the {a} {rel} the {b}?", TWO_CAMERA_ORDINALS),
                    answer=TWO_CAMERA_ORDINALS[k], choices=list(TWO_CAMERA_ORDINALS), subj=a, obj=b, relation=rel)
                break
            k = int(rng.integers(2))
            if truth[k] is None or truth[k] != bool(label):
                continue
            add(k, question=f"In the {TWO_CAMERA_ORDINALS[k]} image, is the {a} {rel} the {b}? Answer yes or no.",
                answer=prompts.YES if label else prompts.NO, subj=a, obj=b, relation=rel, label=label)
            break
    return out


def presence_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """"Is there a red object?" for ``n`` palette colours (all six by default, in a random order): colour
    grounding without any layout, for base pretraining (the answer never depends on where things are)."""
    present = {o.colour for o in scene.objects}
    colours = [list(PALETTE)[int(i)] for i in rng.permutation(len(PALETTE))][: max(0, n)]
    return [SpatialRecord(**_ctx(scene, camera, image, "presence", j), question=PRESENCE_QUESTION.format(colour=_article(c)),
                          answer=prompts.YES if c in present else prompts.NO, subj=c, label=int(c in present))
            for j, c in enumerate(colours)]


def locate_answer(scene: SynthScene, name: str, camera: int = 0) -> str:
    """"left, near, on the ground": image column of the centre (fifths), depth band, resting or floating."""
    cam = scene.cameras[camera][0]
    u = float(scene.pixel(name, 0, camera)[0])
    column = LOCATE_COLUMNS[min(len(LOCATE_COLUMNS) - 1, max(0, int(u / cam.width * len(LOCATE_COLUMNS))))]
    z = float(scene.camera_position(name, 0, camera)[2])
    depth = next(label for limit, label in LOCATE_DEPTHS if z < limit)
    support = "in the air" if scene.object(name).bottom(0) > 0.05 else "on the ground"
    return f"{column}, {depth}, {support}"


def locate_records(scene: SynthScene, camera: int, image: str, rng: np.random.Generator, n: int) -> list[SpatialRecord]:
    """"Where is the red object?" for up to ``n`` objects (random order), answered by ``locate_answer``."""
    out = []
    for j, i in enumerate(rng.permutation(len(scene.objects))[: max(0, n)]):
        o = scene.objects[int(i)]
        out.append(SpatialRecord(**_ctx(scene, camera, image, "locate", j), question=LOCATE_QUESTION.format(colour=o.colour),
                                 answer=locate_answer(scene, o.name, camera), subj=o.name))
    return out


def describe_answer(names: Sequence[str]) -> str:
    """Objects sorted by name (i.e. by colour): the order carries no layout information."""
    names = sorted(names)
    if len(names) == 1:
        return f"There is 1 object: {_article(names[0])}."
    return f"There are {len(names)} objects: {_join([_article(x) for x in names])}."


def scene_records(scene: SynthScene, image_paths, rng: np.random.Generator, kinds: Sequence[str] | None = None,
                  counts: dict[str, int] | None = None, plan_templates: str = "train") -> list[SpatialRecord]:
    """All question records for one scene. ``image_paths[camera][frame]`` as stored (a flat list = camera 0's
    frames). Single-image kinds are asked of frame 0 of every camera; plans and motion questions use camera 0;
    two-camera questions (kind multiframe, ``counts["multicamera"]``) both cameras' frame 0. ``plan_templates``:
    "train" (training data: filler words in ``plans.TRAIN_FILLER_RATE`` of the instructions), or "all" to add the
    held-out instruction templates (evaluation data, no fillers)."""
    kinds = list(DEFAULT_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown record kind(s) {unknown}; known: {', '.join(KINDS)}")
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    paths = [list(image_paths)] if image_paths and isinstance(image_paths[0], str) else [list(p) for p in image_paths]
    out: list[SpatialRecord] = []
    for cam, frames in enumerate(paths[: scene.num_cameras]):
        img = frames[0]
        if "describe" in kinds and cam == 0:
            out.append(SpatialRecord(**_ctx(scene, cam, img, "describe", 0), question=DESCRIBE_QUESTION,
                                     answer=describe_answer(scene.names)))
        if "count" in kinds and cam == 0:
            out.append(SpatialRecord(**_ctx(scene, cam, img, "count", 0), question=COUNT_QUESTION,
                                     answer=str(len(scene.objects)), value=float(len(scene.objects)), unit="objects",
                                     tolerance=0.0))
        if "presence" in kinds and cam == 0:
            out += presence_records(scene, cam, img, rng, counts["presence"])
        if "locate" in kinds and cam == 0:
            out += locate_records(scene, cam, img, rng, counts["locate"])
        if "yesno" in kinds:
            out += yesno_records(scene, cam, img, rng, counts["yesno"])
        if "choice" in kinds:
            out += choice_records(scene, cam, img, rng, counts["choice"])
        if "open" in kinds:
            out += open_records(scene, cam, img, rng, counts["open"])
        if "quantitative" in kinds:
            out += quantitative_records(scene, cam, img, rng, counts["quantitative"])
    if "plan" in kinds:
        # training data ("train") gets filler words in half its instructions; evaluation data ("all") none
        out += plan_records(scene, paths[0][0], rng, counts["plan"], templates=plan_templates,
                            fillers=TRAIN_FILLER_RATE if plan_templates == "train" else 0.0)
    if "multiframe" in kinds and len(paths[0]) == scene.num_frames:
        out += multiframe_records(scene, paths[0], rng, counts["multiframe"])
    if "multiframe" in kinds and len(paths) >= 2:
        out += two_camera_records(scene, [paths[0][0], paths[1][0]], rng, counts["multicamera"])
    if "refer" in kinds:   # last, so that adding it leaves every other record of the scene as it was
        out += refer_records(scene, paths[0][0], rng, counts["refer"])
    return out


def camera_topic(camera: int) -> tuple[str, bool]:
    """Bag topic of a synthetic camera and whether it is compressed: cam0 raw rgb8, the others jpeg."""
    return ("/cam0/image_raw", False) if camera == 0 else (f"/cam{camera}/image_raw/compressed", True)


def replay_entries(scene: SynthScene, rng: np.random.Generator, bag_start_ns: int) -> list[dict]:
    """Entries of a ``phi3v-spatial replay`` questions file for one scene of a synthetic bag.

    Single-frame questions are asked 0.1 s after the scene's first frame (so the replay window's newest frame
    is frame 0, which the labels describe); multi-frame ones 0.1 s after its last frame with all its frames.
    """
    def at(stamp_ns: int) -> float:
        return round((stamp_ns - bag_start_ns) / 1e9 + 0.1, 3)

    first, last = scene.stamps_ns[0], scene.stamps_ns[-1]
    base = f"scene{scene.id}"
    entries: list[dict] = []
    for cam in range(scene.num_cameras):
        topic = camera_topic(cam)[0]
        for r in yesno_records(scene, cam, "", rng, 1):
            entries.append({"id": f"{base}-c{cam}-ask", "at": at(first), "type": "ask", "question": r.question,
                            "topics": [topic], "num_frames": 1, "expect": r.answer})
    if len(scene.objects) >= 2:
        rels = yesno_records(scene, 0, "", rng, 3)
        if rels:
            entries.append({"id": f"{base}-relations", "at": at(first), "type": "relations",
                            "candidates": [{"subject": r.subj, "relation": r.relation, "object": r.obj} for r in rels],
                            "topics": [camera_topic(0)[0]], "num_frames": 1,
                            "expect": [{"subject": r.subj, "relation": r.relation, "object": r.obj, "holds": bool(r.label)}
                                       for r in rels]})
        for r in plan_records(scene, "", rng, 1, families=["move"]):
            entries.append({"id": f"{base}-plan", "at": at(first), "type": "plan", "instruction": instruction_of(r),
                            "topics": [camera_topic(0)[0]], "num_frames": 1, "expect": r.plan})
    for j, r in enumerate(multiframe_records(scene, [""] * scene.num_frames, rng, 2)):
        entries.append({"id": f"{base}-multiframe-{j}", "at": at(last), "type": "ask", "question": r.question,
                        "topics": [camera_topic(0)[0]], "num_frames": scene.num_frames, "expect": r.answer})
    return entries
