"""Records -> model batches, with the loss restricted to the answer tokens.

The public phi3v-spatial collators got the label mask wrong (whole sequence, or nothing). Here a
sample's ids are the processor's ids for the prompt exactly as inference builds it
(``prompts.chat_prompt``), followed by the tokenizer's ids for ``prompts.answer_target(answer)``;
every label is -100 except those target ids. Training therefore sees the same prompt ids the engine
feeds at inference, and learns to emit answer + ``<|end|>\\n<|endoftext|>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..data.records import SpatialRecord
from ..engine import prompts
from .geometry import GEOMETRY_FEATURES

IGNORE_INDEX = -100


def load_images(record: SpatialRecord, root: str) -> list:
    """The record's images as RGB PIL images (paths are relative to the JSONL's folder)."""
    from PIL import Image

    out = []
    for path in record.image_paths(root):
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def record_prompt(record: SpatialRecord) -> str:
    return prompts.chat_prompt(record.question, len(record.images))


def target_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of ``answer_target(answer)`` as they follow the prompt (no BOS)."""
    return list(tokenizer(prompts.answer_target(answer), add_special_tokens=False)["input_ids"])


def _as_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):   # batch of one
        ids = ids[0]
    return [int(i) for i in ids]


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: object = None     # tensor (n_images, crops, 3, H, W) or None
    image_sizes: object = None      # tensor (n_images, 2) or None
    # Auxiliary geometry targets (``train.geometry``): (kind, position, target), kind GEOMETRY_NAME at an object
    # name's last token (target: that object's features), GEOMETRY_ANSWER at the last prompt token (first-named
    # minus second-named object's features), GEOMETRY_MOTION at an object name of a two-frame question (its
    # change between the frames), GEOMETRY_TARGET where the answer's next token starts naming an object (that
    # object's features: open answers, choices, the objects of a plan) and at a referring expression's last token
    # (the features of the object it means).
    geometry: list = field(default_factory=list)


GEOMETRY_NAME, GEOMETRY_ANSWER, GEOMETRY_MOTION, GEOMETRY_TARGET = 0, 1, 2, 3
GEOMETRY_KEYS = ((GEOMETRY_NAME, "geometry_name"), (GEOMETRY_ANSWER, "geometry_answer"),
                 (GEOMETRY_MOTION, "geometry_motion"), (GEOMETRY_TARGET, "geometry_target"))


def encode_prompt(processor, prompt: str, images: Sequence):
    """Processor output for one prompt: (ids list, pixel_values or None, image_sizes or None)."""
    enc = processor(prompt, images=list(images) if images else None, return_tensors="pt")
    pv = enc.get("pixel_values") if hasattr(enc, "get") else None
    sizes = enc.get("image_sizes") if hasattr(enc, "get") else None
    return _as_list(enc["input_ids"]), pv, sizes


def encode_record(processor, record: SpatialRecord, root: str, images: Sequence | None = None) -> EncodedSample:
    """One training sample: prompt ids (masked) + answer-target ids (learned)."""
    if images is None:
        images = load_images(record, root) if record.images else []
    prompt_ids, pv, sizes = encode_prompt(processor, record_prompt(record), images)
    tgt = target_ids(processor.tokenizer, record.answer)
    return EncodedSample(
        input_ids=prompt_ids + tgt,
        labels=[IGNORE_INDEX] * len(prompt_ids) + tgt,
        pixel_values=pv,
        image_sizes=sizes,
    )


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> dict:
    """Right-pad a list of samples into one batch; image tensors of all samples are concatenated in
    order, which is the order the model fills the negative-id image slots (row-major)."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        L = len(s.input_ids)
        input_ids[i, :L] = torch.tensor(s.input_ids, dtype=torch.long)
        lab = torch.tensor(s.labels, dtype=torch.long)
        lab[torch.tensor(s.input_ids) < 0] = IGNORE_INDEX   # image slots never carry a label
        labels[i, :L] = lab
        attention[i, :L] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if any(s.geometry for s in samples):
        for kind, key in GEOMETRY_KEYS:
            rows = [(i, pos, t) for i, s in enumerate(samples) for k, pos, t in s.geometry if k == kind]
            batch[key + "_index"] = torch.tensor([[i, pos] for i, pos, _ in rows], dtype=torch.long).reshape(-1, 2)
            targets = np.array([t for _, _, t in rows], dtype=np.float32)
            batch[key + "_target"] = torch.tensor(targets).reshape(-1, len(GEOMETRY_FEATURES))
    pvs = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pvs:
        batch["pixel_values"] = torch.cat([torch.as_tensor(p) for p in pvs], dim=0)
        batch["image_sizes"] = torch.cat(
            [torch.as_tensor(s.image_sizes).reshape(-1, 2) for s in samples if s.image_sizes is not None], dim=0
        )
    return batch


def _name_positions(offsets, q0: int, ids_offset: int, objs) -> list | None:
    """Sample positions of each named object's last token (``objs``: (start in question, name, features))."""
    out = []
    for start, name, feats in objs:
        last_char = q0 + start + len(name) - 1
        j = next((j for j, (a, b) in enumerate(offsets) if a <= last_char < b), None)
        if j is None:
            return None
        out.append((ids_offset + j, feats))
    return out


def turn_geometry(tokenizer, geometry, record: SpatialRecord, root: str, text: str, ids: Sequence[int]) -> list:
    """Geometry targets of one turn whose text ``text`` ends ``ids`` (the sample's ids so far): each named object's
    last token, a referring expression's last token (the object it means), and the last token of the turn (where
    the answer's first token is predicted). Positions are found through the tokenizer's character offsets and
    checked against ``ids``; a turn whose tokens do not line up (or whose record has no geometry) gets none."""
    if geometry is None:
        return []
    objs = geometry.question_objects(record, root)
    moving = geometry.motion_objects(record, root)
    answer_obj = geometry.answer_object(record, root)
    expression = geometry.expression_object(record, root)
    if not objs and not moving and answer_obj is None and expression is None:
        return []
    from ..model.processing_phi3v import IMAGE_TAG

    text = IMAGE_TAG.split(text)[-1]   # the processor tokenizes the text after the last image on its own
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    text_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    n, q0 = len(text_ids), text.rfind(record.question)
    if q0 < 0 or n > len(ids) or list(ids[len(ids) - n:]) != text_ids:
        return []
    out = []
    expressions = [expression] if expression is not None else []
    for kind, found in ((GEOMETRY_NAME, objs), (GEOMETRY_MOTION, moving), (GEOMETRY_TARGET, expressions)):
        if found:
            positions = _name_positions(offsets, q0, len(ids) - n, found)
            if positions is None:
                return []
            out += [(kind, pos, feats) for pos, feats in positions]
    if objs:
        out.append((GEOMETRY_ANSWER, len(ids) - 1, objs[0][2] - objs[1][2]))
    if answer_obj is not None:
        out.append((GEOMETRY_TARGET, len(ids) - 1, answer_obj))
    return out


def answer_geometry(tokenizer, geometry, record: SpatialRecord, root: str, target_start: int) -> list:
    """Geometry targets inside a plan answer that starts at sample position ``target_start``: GEOMETRY_TARGET at the
    position that predicts the first token of each object's first mention (that object's features), and
    GEOMETRY_ANSWER where the reply starts its step list (first-named minus second-named object of a one-relation
    instruction: whether the goal already holds)."""
    objs = geometry.plan_objects(record, root) if geometry is not None else None
    pair = geometry.plan_pair(record, root) if geometry is not None else None
    if not objs and pair is None:
        return []
    text = prompts.answer_target(record.answer)
    offsets = list(tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"])
    out = []
    first_step = text.find("[") + 1   # where the reply says whether there is anything to do: "]" or "{"
    j = next((j for j, (a, b) in enumerate(offsets) if a <= first_step < b), None)
    if pair is not None and j:
        out.append((GEOMETRY_ANSWER, target_start + j - 1, pair))
    for name, feats in objs or ():
        c = text.find(f'"{name}"')
        j = next((j for j, (a, b) in enumerate(offsets) if a <= c + 1 < b), None) if c >= 0 else None
        if j is not None and j > 0:
            out.append((GEOMETRY_TARGET, target_start + j - 1, feats))
    return out


def encode_conversation(processor, records: Sequence[SpatialRecord], root: str,
                        images: Sequence | None = None, geometry=None) -> EncodedSample:
    """Several records about the same images as one multi-turn chat, every answer learned.

    The first turn is exactly ``encode_record``'s prompt (what inference sends); each later record is a
    follow-up user turn, answered with ``answer<|end|>\\n``; ``<|endoftext|>`` closes only the last answer.
    One image encoding then carries several supervised answers, which is what lets a tiny model trained
    from scratch learn question x image interactions within a CPU budget. ``geometry`` (a
    ``train.geometry.SceneGeometry``) adds the auxiliary geometry targets of every turn that has them."""
    records = list(records)
    if len(records) == 1 and geometry is None:
        return encode_record(processor, records[0], root, images)
    first = records[0]
    if images is None:
        images = load_images(first, root) if first.images else []
    ids, pv, sizes = encode_prompt(processor, record_prompt(first), images)
    labels = [IGNORE_INDEX] * len(ids)
    tok = processor.tokenizer
    aux = turn_geometry(tok, geometry, first, root, record_prompt(first), ids)
    eot = tok.convert_tokens_to_ids(prompts.ENDOFTEXT)
    for k, r in enumerate(records):
        tgt = target_ids(tok, r.answer)
        last = k == len(records) - 1
        if not last and tgt and tgt[-1] == eot:
            tgt = tgt[:-1]
        aux += answer_geometry(tok, geometry, r, root, len(ids))
        ids += tgt
        labels += tgt
        if not last:
            follow_up = prompts.chat_prompt(records[k + 1].question, 0)  # a later user turn: no images
            nxt = list(tok(follow_up, add_special_tokens=False)["input_ids"])
            ids += nxt
            labels += [IGNORE_INDEX] * len(nxt)
            aux += turn_geometry(tok, geometry, records[k + 1], root, follow_up, ids)
    return EncodedSample(input_ids=ids, labels=labels, pixel_values=pv, image_sizes=sizes, geometry=aux)


def _pair_key(record: SpatialRecord):
    """The unordered object pair a relation question is about (None for other questions)."""
    if record.subj and record.obj:
        return frozenset((record.subj, record.obj))
    return None


class SpatialCollator:
    """``collator([(record, root), ...]) -> batch`` for a ``torch.utils.data.DataLoader``.

    ``turns > 1`` (training only): each drawn record is followed, in the same chat, by up to ``turns - 1``
    other records about the same images (from ``items``, the full training list), chosen deterministically
    (the next ones in file order, wrapping around), so resumed runs see identical batches. A chat never holds
    two relation questions about the same pair of objects: "Is A left of B?" answered earlier in the text gives
    away "Is B left of A?", and the model would learn to read the chat instead of the image."""

    def __init__(self, processor, turns: int = 1, items: Sequence[tuple[SpatialRecord, str]] | None = None,
                 geometry=None):
        self.processor = processor
        self.geometry = geometry
        self.pad_id = pad_id_of(processor.tokenizer)
        self.turns = max(1, int(turns))
        self._groups: dict = {}
        self._index: dict = {}
        if self.turns > 1 and items:
            for r, root in items:
                key = (root, tuple(r.images))
                group = self._groups.setdefault(key, [])
                self._index[(key, r.id)] = len(group)
                group.append(r)

    def encode(self, record: SpatialRecord, root: str) -> EncodedSample:
        if self.turns == 1:
            if self.geometry is not None:
                return encode_conversation(self.processor, [record], root, geometry=self.geometry)
            return encode_record(self.processor, record, root)
        key = (root, tuple(record.images))
        group = self._groups.get(key, [record])
        i = self._index.get((key, record.id), 0)
        chat, pairs = [record], {_pair_key(record)}
        for g in group[i + 1:] + group[:i]:
            if len(chat) == self.turns:
                break
            key = _pair_key(g)
            if g is record or (key is not None and key in pairs):
                continue
            chat.append(g)
            pairs.add(key)
        return encode_conversation(self.processor, chat, root, geometry=self.geometry)

    def __call__(self, items: Sequence[tuple[SpatialRecord, str]]) -> dict:
        return collate([self.encode(r, root) for r, root in items], self.pad_id)

    def batches(self, items: Sequence[tuple[SpatialRecord, str]], groups: int = 1) -> list[dict]:
        """``items`` as up to ``groups`` batches of samples of similar length (sorted by length, cut into runs of
        near-equal size), each padded only to its own longest sample: a micro-batch mixing short questions with
        three-turn plan chats otherwise spends about half its positions on padding. One batch for ``groups`` 1."""
        samples = [self.encode(r, root) for r, root in items]
        k = max(1, min(int(groups), len(samples)))
        if k == 1:
            return [collate(samples, self.pad_id)]
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        cuts = [g * len(order) // k for g in range(k + 1)]
        return [collate([samples[i] for i in order[a:b]], self.pad_id) for a, b in zip(cuts, cuts[1:])]


def answer_token_count(labels) -> int:
    """How many tokens of a label row are learned (for logging and tests)."""
    return int((np.asarray(labels) != IGNORE_INDEX).sum())


def jsonl_root(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))
