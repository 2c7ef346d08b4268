"""The training / evaluation record: one question about one or more images, as a JSONL line.

Synthetic scenes and VSR both become ``SpatialRecord``s, so training, evaluation and the demo read one
format. The JSON keys follow VSR where they overlap (``image``, ``caption``, ``label``, ``relation``,
``subj``, ``obj``), so a synthetic JSONL file is also a valid VSR-style file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Iterator

# Question kinds. "yesno"/"choice"/"open" are qualitative; "quantitative" answers carry a value + tolerance;
# "presence" ("Is there a red object?") and "locate" ("Where is the red object?" -> coarse image column,
# distance band, on the ground / in the air) pretrain the embedded base model; neither is a relation question.
# "refer" asks which object a plan's referring expression means ("Which one is the biggest cube?" -> an object
# name): the grounding step of a refer plan, on its own.
RECORD_TYPES = ("yesno", "choice", "open", "quantitative", "multiframe", "plan", "describe", "count", "presence",
                "locate", "refer")


@dataclass
class SpatialRecord:
    id: str
    # Image paths, relative to the JSONL file's directory (or absolute). Order = <|image_k|> order.
    images: list[str]
    # User text without image placeholders, already phrased with phi3v_spatial.engine.prompts.
    question: str
    # Target answer text (without <|end|>).
    answer: str
    type: str
    relation: str = ""
    subj: str = ""
    obj: str = ""
    # VSR truth label of ``caption`` (1 true, 0 false); for yes/no records 1 means the answer is "yes".
    label: int | None = None
    caption: str = ""
    choices: list[str] = field(default_factory=list)
    # Quantitative ground truth and the relative tolerance a prediction must fall within.
    value: float | None = None
    unit: str = ""
    tolerance: float | None = None
    # Ground-truth plan steps (dicts with the PlanStep fields) for "plan" records.
    plan: list[dict] = field(default_factory=list)
    # Plan records, for the executor's check (``data.executor``): the instruction family (move | refer | multistep |
    # done | missing), the relations [subject, relation, object] that must hold in camera 0's view afterwards, the
    # objects the plan may move (all others must stay put), and the named objects that are not in the scene.
    family: str = ""
    goal: list = field(default_factory=list)
    movable: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    # Refer plans and refer questions: the referring expression as the question words it ("the biggest cube"); the
    # object it means is ``subj`` (or a refer plan's ``obj`` when it names the reference). The geometry loss
    # supervises the expression's last token with that object's place (``train.geometry``).
    expression: str = ""
    # Plan and multi-image records: "held-out" when the sentence template is one training never uses.
    template: str = ""
    # Which of the record's images a relation question is about (two-camera questions: "In the second image ...").
    about_image: int = 0
    # Synthetic records: the scene's id in ``scenes.jsonl`` beside the records file (its 3D ground truth).
    scene: str = ""
    meta_category: str = ""
    source: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["image"] = self.images[0] if self.images else ""   # VSR-compatible single-image key
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SpatialRecord":
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if not d.get("images") and d.get("image"):
            d["images"] = [d["image"]]
        return cls(**{k: v for k, v in d.items() if k in known})

    def image_paths(self, root: str) -> list[str]:
        """Absolute image paths given the directory the JSONL file lives in."""
        return [p if os.path.isabs(p) else os.path.join(root, p) for p in self.images]


def write_jsonl(path: str, records: Iterable[SpatialRecord]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str) -> Iterator[SpatialRecord]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield SpatialRecord.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a valid record: {e}") from e
