"""``--data`` specs for train/eval and a seeded weighted mixture of record sources.

Why: training mixes synthetic and VSR data with chosen proportions (as mbodiai's phi3v-spatial did), and
evaluation reads the same specs, so one parser serves both.

Specs (an optional trailing ``:weight``, default 1.0):
  ``synth:DIR[:w]``            DIR/records.jsonl, images relative to DIR
  ``vsr:JSONL:IMAGE_DIR[:w]``  a VSR-format file + local COCO folder (``vsr.load_vsr``)
  ``path/to/records.jsonl[:w]`` any SpatialRecord JSONL, images relative to its directory

``parse_data_spec(spec) -> DataSpec``; ``load_data_spec(spec, vsr_on_missing="error") -> DataSource``
(``.records``, ``.root``, ``.weight``, ``.name``; unpacks as ``records, root, weight``);
``ResumableMixture(sizes, weights, seed)``: the sampling policy, ``next() -> (dataset, index)``, resumable (the
trainer's); ``MixtureSampler(sources, seed)``: ``take(n)`` / iteration -> ``(record, root)`` by that policy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
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


class ResumableMixture:
    """Draws (dataset, index) pairs: the dataset by weight, then the next item of that dataset's own shuffled
    epoch order, so every record of a dataset is seen once per pass however the datasets are weighted. Its whole
    state is a small dict (draw counts + RNG state; permutations are re-derived from the seed), so a resumed
    training run draws exactly what an uninterrupted run would have drawn."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"every dataset needs at least one record (sizes {list(sizes)})")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"dataset weights must be >= 0 and not all 0 (got {list(weights)})")
        self.sizes = list(sizes)
        self.probs = w / w.sum()
        self.seed = seed
        self.draws = [0] * len(sizes)
        self.rng = np.random.default_rng([seed, 0xD5])
        self._perm_cache: dict = {}

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != d}
            self._perm_cache[key] = np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d])
        return self._perm_cache[key]

    def next(self) -> tuple[int, int]:
        d = int(self.rng.choice(len(self.sizes), p=self.probs)) if len(self.sizes) > 1 else 0
        k = self.draws[d]
        self.draws[d] += 1
        return d, int(self._perm(d, k // self.sizes[d])[k % self.sizes[d]])

    def state_dict(self) -> dict:
        return {"draws": list(self.draws), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.draws = list(state["draws"])
        self.rng.bit_generator.state = state["rng"]


class MixtureSampler:
    """Endless seeded stream of ``(record, root)`` from weighted sources, drawn by :class:`ResumableMixture`."""

    def __init__(self, sources: Sequence[DataSource | tuple], seed: int = 0):
        self.sources = [s if isinstance(s, DataSource) else DataSource(*s) for s in sources]
        self.sources = [s for s in self.sources if s.records]
        if not self.sources:
            raise ValueError("mixture has no records (all sources empty)")
        self._order = ResumableMixture([len(s.records) for s in self.sources], [s.weight for s in self.sources], seed)

    def __iter__(self) -> Iterator[tuple[SpatialRecord, str]]:
        while True:
            yield self.next()

    def next(self) -> tuple[SpatialRecord, str]:
        d, i = self._order.next()
        return self.sources[d].records[i], self.sources[d].root

    def take(self, n: int) -> list[tuple[SpatialRecord, str]]:
        return [self.next() for _ in range(n)]
