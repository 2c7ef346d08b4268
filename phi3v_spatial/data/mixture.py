"""``--data`` specs for train/eval and a seeded weighted mixture of record sources.

Why: training mixes synthetic and VSR data with chosen proportions (as mbodiai's phi3v-spatial did), and
evaluation reads the same specs, so one parser serves both.

Specs (an optional trailing ``:weight``, default 1.0):
  ``synth:DIR[:w]``            DIR/records.jsonl, images relative to DIR
  ``vsr:JSONL:IMAGE_DIR[:w]``  a VSR-format file + local COCO folder (``vsr.load_vsr``)
  ``path/to/records.jsonl[:w]`` any SpatialRecord JSONL, images relative to its directory

``parse_data_spec(spec) -> DataSpec``; ``load_data_spec(spec, vsr_on_missing="error") -> DataSource``
(``.records``, ``.root``, ``.weight``, ``.name``; unpacks as ``records, root, weight``);
``MixtureSampler(sources, seed)``: ``take(n)`` / iteration -> ``(record, root)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .records import SpatialRecord, read_jsonl


@dataclass
class DataSpec:
    kind: str  # "synth", "vsr" or "jsonl"
    path: str  # records JSONL (synth: the directory)
    image_dir: str = ""  # vsr only
    weight: float = 1.0
    text: str = ""


@dataclass
class DataSource:
    records: list[SpatialRecord]
    root: str  # directory record image paths are relative to
    weight: float = 1.0
    name: str = ""

    def __iter__(self):  # records, root, weight = load_data_spec(...)
        return iter((self.records, self.root, self.weight))


def _split_weight(parts: list[str], min_parts: int, spec: str) -> tuple[list[str], float]:
    if len(parts) > min_parts:
        try:
            weight = float(parts[-1])
        except ValueError:
            raise ValueError(f"bad --data spec {spec!r}: {parts[-1]!r} is not a weight (a number)") from None
        if not weight > 0 or not np.isfinite(weight):
            raise ValueError(f"bad --data spec {spec!r}: weight must be a positive number, got {parts[-1]}")
        return parts[:-1], weight
    return parts, 1.0


def parse_data_spec(spec: str) -> DataSpec:
    """Parse one ``--data`` value (no file access)."""
    text = spec.strip()
    if not text:
        raise ValueError("empty --data spec")
    head = text.split(":", 1)[0]
    if head == "synth":
        parts, w = _split_weight(text.split(":")[1:], 1, spec)
        if len(parts) != 1 or not parts[0]:
            raise ValueError(f"bad --data spec {spec!r}: expected synth:DIR[:weight]")
        return DataSpec("synth", parts[0], weight=w, text=spec)
    if head == "vsr":
        parts, w = _split_weight(text.split(":")[1:], 2, spec)
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"bad --data spec {spec!r}: expected vsr:JSONL:IMAGE_DIR[:weight]")
        return DataSpec("vsr", parts[0], image_dir=parts[1], weight=w, text=spec)
    path, w = text, 1.0
    if ":" in text:
        maybe_path, last = text.rsplit(":", 1)
        try:
            float(last)
        except ValueError:
            pass  # a colon inside the path
        else:
            (path,), w = _split_weight([maybe_path, last], 1, spec)
    return DataSpec("jsonl", path, weight=w, text=spec)


def load_data_spec(spec: str | DataSpec, vsr_on_missing: str = "error") -> DataSource:
    """Read the records a spec names; errors name the missing file."""
    s = parse_data_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "synth":
        path = os.path.join(s.path, "records.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {s.text}: {path} not found (generate it with `phi3v-spatial synth --out {s.path}`)")
        return DataSource(list(read_jsonl(path)), s.path, s.weight, s.text or s.path)
    if s.kind == "vsr":
        from .vsr import load_vsr

        if not os.path.isfile(s.path):
            raise FileNotFoundError(f"--data {s.text}: VSR file {s.path} not found")
        data = load_vsr(s.path, s.image_dir, on_missing=vsr_on_missing)
        return DataSource(data.records, s.image_dir, s.weight, s.text or s.path)
    if not os.path.isfile(s.path):
        raise FileNotFoundError(f"--data {s.text}: records file {s.path} not found")
    return DataSource(list(read_jsonl(s.path)), os.path.dirname(os.path.abspath(s.path)), s.weight, s.text or s.path)


def load_data_specs(specs: Sequence[str], vsr_on_missing: str = "error") -> list[DataSource]:
    return [load_data_spec(s, vsr_on_missing) for s in specs]


@dataclass
class MixtureSampler:
    """Endless seeded stream of ``(record, root)``: a source is drawn with probability weight / sum(weights),
    then its next record from a per-source permutation (reshuffled each pass), so every record of a source is
    seen once per pass however the sources are weighted."""

    sources: Sequence[DataSource | tuple]
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.sources = [s if isinstance(s, DataSource) else DataSource(*s) for s in self.sources]
        self.sources = [s for s in self.sources if s.records]
        if not self.sources:
            raise ValueError("mixture has no records (all sources empty)")
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        if np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"mixture weights must be positive, got {w.tolist()}")
        self.probs = w / w.sum()
        self._rng = np.random.default_rng(self.seed)
        self._orders = [self._rng.permutation(len(s.records)) for s in self.sources]
        self._pos = [0] * len(self.sources)

    def __iter__(self) -> Iterator[tuple[SpatialRecord, str]]:
        while True:
            yield self.next()

    def next(self) -> tuple[SpatialRecord, str]:
        k = int(self._rng.choice(len(self.sources), p=self.probs))
        if self._pos[k] >= len(self._orders[k]):
            self._orders[k] = self._rng.permutation(len(self.sources[k].records))
            self._pos[k] = 0
        src = self.sources[k]
        rec = src.records[int(self._orders[k][self._pos[k]])]
        self._pos[k] += 1
        return rec, src.root

    def take(self, n: int) -> list[tuple[SpatialRecord, str]]:
        return [self.next() for _ in range(n)]
