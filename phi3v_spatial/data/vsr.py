"""VSR (Visual Spatial Reasoning, Liu et al. 2023) JSONL + a local COCO image folder -> ``SpatialRecord``s.

Why: VSR is the public benchmark for exactly the relations the adapter learns, so training and evaluation
read it through the same record format and the same prompt wording as the synthetic data. Each VSR line
becomes a caption-verification yes/no record and, when the line names ``subj``/``obj`` (zero-shot split),
also a relation yes/no record ``prompts.relation_question(subj, relation, obj)``.

``load_vsr(jsonl_path, image_dir, on_missing="error", relation_questions=True) -> VsrData`` (``.records``,
``.skipped`` missing image names). ``read_vsr(...) -> list[SpatialRecord]`` is the same without the report.
Images are found at ``image_dir/<image>``, at the COCO split folder named in ``image_link``
(``image_dir/train2017/<image>``) or in any direct sub-folder of ``image_dir``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ..engine import prompts
from .records import SpatialRecord

log = logging.getLogger(__name__)

# Relation -> VSR meta-category, exactly as cambridgeltl/visual-spatial-reasoning
# analysis_scripts/rel_meta_category_dict.txt (commit b1cf884). "among" is listed under both Topological and
# Unallocated there; VSR's own eval_compute_acc_by_rel_meta_cat.py reads the file line by line into a dict,
# so the later line wins: "among" -> "Unallocated". Kept identical so per-category scores compare with VSR's.
_VSR_META_TEXT = """\
Adjacency: adjacent to, alongside, at the side of, at the right side of, at the left side of, attached to, at the back of, ahead of, against, at the edge of
Directional: off, past, toward, down, deep down, up, away from, along, around, from, into, to, across, across from, through, down from
Orientation: facing, facing away from, parallel to, perpendicular to
Projective: on top of, beneath, beside, behind, left of, right of, under, in front of, below, above, over, in the middle of
Proximity: by, close to, near, far from, far away from
Topological: connected to, detached from, has as a part, part of, contains, within, at, on, in, with, surrounding, among, consists of, out of, between, inside, outside, touching
Unallocated: beyond, next to, opposite to, after, among, enclosed by
"""


def _parse_meta(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.strip().splitlines():
        cat, rels = line.split(": ", 1)
        for rel in rels.split(","):
            out[rel.strip()] = cat.strip()
    return out


VSR_META_CATEGORIES: dict[str, str] = _parse_meta(_VSR_META_TEXT)
META_CATEGORY_NAMES = ("Adjacency", "Directional", "Orientation", "Projective", "Proximity", "Topological", "Unallocated")


class VsrMissingImageError(FileNotFoundError):
    """A VSR line names an image that is not in the local COCO folder."""


@dataclass
class VsrData:
    records: list[SpatialRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # image names not found (on_missing="skip")


def _label(value, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "0", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise ValueError(f"{where}: label must be 1/0 or true/false, got {value!r}")


class _ImageIndex:
    """Finds VSR image names under image_dir (top level, COCO split named by image_link, or one level down)."""

    def __init__(self, image_dir: str):
        self.image_dir = image_dir
        self.subdirs = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d))) \
            if os.path.isdir(image_dir) else []

    def find(self, name: str, link: str = "") -> str | None:
        candidates = [name]
        parts = link.rstrip("/").split("/")
        if len(parts) >= 2:
            candidates.append(os.path.join(parts[-2], name))
        candidates += [os.path.join(d, name) for d in self.subdirs]
        for rel in candidates:
            if os.path.isfile(os.path.join(self.image_dir, rel)):
                return rel
        return None


def load_vsr(jsonl_path: str, image_dir: str, on_missing: str = "error", relation_questions: bool = True) -> VsrData:
    """Read a VSR-format JSONL file (keys ``image``, ``caption``, ``label``, ``relation``, optional ``subj``/``obj``;
    other keys ignored). Image paths in the records are relative to ``image_dir``.

    ``on_missing="error"`` raises ``VsrMissingImageError`` naming the first missing file; ``"skip"`` drops those
    lines and reports them in ``.skipped`` (and a log warning with the count).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"VSR image folder not found: {image_dir}")
    index = _ImageIndex(image_dir)
    data = VsrData()
    stem = os.path.splitext(os.path.basename(jsonl_path))[0]
    with open(jsonl_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{jsonl_path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON: {e}") from e
            for key in ("image", "caption", "label", "relation"):
                if key not in d:
                    raise ValueError(f"{where}: missing VSR key {key!r}")
            rel_path = index.find(d["image"], str(d.get("image_link", "")))
            if rel_path is None:
                if on_missing == "error":
                    raise VsrMissingImageError(
                        f"{where}: image {d['image']!r} not found in {image_dir} (nor in its sub-folders); "
                        f"download the COCO 2017 images or pass on_missing='skip'")
                data.skipped.append(d["image"])
                continue
            label = _label(d["label"], where)
            relation, caption = str(d["relation"]).strip(), str(d["caption"]).strip()
            subj, obj = str(d.get("subj", "") or "").strip(), str(d.get("obj", "") or "").strip()
            common = dict(images=[rel_path], answer=prompts.YES if label else prompts.NO, type="yesno", relation=relation,
                          subj=subj, obj=obj, label=label, caption=caption,
                          meta_category=VSR_META_CATEGORIES.get(relation, ""), source="vsr")
            data.records.append(SpatialRecord(id=f"vsr-{stem}-{lineno}-caption",
                                              question=prompts.caption_question(caption), **common))
            if relation_questions and subj and obj:
                data.records.append(SpatialRecord(id=f"vsr-{stem}-{lineno}-relation",
                                                  question=prompts.relation_question(subj, relation, obj), **common))
    if data.skipped:
        log.warning("VSR %s: skipped %d line(s) whose image is missing from %s", jsonl_path, len(data.skipped), image_dir)
    return data


def read_vsr(jsonl_path: str, image_dir: str, on_missing: str = "error", relation_questions: bool = True) -> list[SpatialRecord]:
    return load_vsr(jsonl_path, image_dir, on_missing, relation_questions).records
