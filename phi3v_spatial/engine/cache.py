"""Byte-bounded caches that make repeated questions about the same frames cheap (no ROS, no model code).

Two caches sit in front of the model (see ``SpatialEngine``):

* ``VisionCache``: projected image embeddings per frame. A frame shared by consecutive windows or asked about
  again is encoded once. Keyed by the frame's identity (from the node and replay: camera topic + header stamp +
  a BLAKE2b digest of the message bytes, so another picture under a stamp seen before -- sim reset, driver
  restart, a bag played twice -- is never served an old entry; a pixel digest otherwise), the crop count, and
  the adapter when the adapter changes the vision tower.
* ``PrefixCache``: the language model's key/value tensors for the prompt prefix that holds a window's images.
  Every following question on that window prefills only its own words. Entries are never modified: users get a
  fresh cache built from them (copy-on-use), so a cancelled or failed request cannot corrupt the next one.

Both are LRU, bounded by bytes (the tensors they hold), and count hits / misses / evictions for diagnostics.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np


def tensor_bytes(*tensors) -> int:
    return sum(int(t.numel()) * t.element_size() for t in tensors)


def content_key(image: np.ndarray) -> tuple:
    """Identity of an image that came without one (CLI files, request-supplied images): a digest of its pixels."""
    arr = np.ascontiguousarray(image)
    return ("pixels", arr.shape, str(arr.dtype), hashlib.blake2b(memoryview(arr).cast("B"), digest_size=16).hexdigest())


class ByteLRU:
    """A thread-safe LRU map whose capacity is a number of bytes; ``max_bytes <= 0`` disables it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value, nbytes: int) -> bool:
        """Store ``value``; False when it is larger than the whole cache (it is then not kept)."""
        with self._lock:
            old = self._items.pop(key, None)  # a value that is not kept must not leave a stale one behind
            if old is not None:
                self.bytes -= old[1]
            if not self.enabled or nbytes > self.max_bytes:
                return False
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._items:
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            while self._items and (self.bytes > self.max_bytes or self.max_bytes <= 0):
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}


@dataclass(frozen=True)
class ImageEmbedding:
    """One image as the language model sees it: its padded HD size, token count and projected features."""

    hd_size: tuple[int, int]
    num_tokens: int
    features: Any  # torch.Tensor (num_tokens, hidden) on the model's device

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.features)


class VisionCache(ByteLRU):
    """frame key -> ImageEmbedding."""


@dataclass(frozen=True)
class PrefixEntry:
    """Key/value tensors per layer for ``length`` prompt tokens (batch 1), never modified after creation."""

    length: int
    layers: tuple  # ((keys, values), ...) with shape (1, heads, length, head_dim)

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(k, v) for k, v in self.layers)

    @classmethod
    def from_cache(cls, cache, length: int) -> "PrefixEntry":
        """The first ``length`` positions of a batch-1 DynamicCache, copied (the cache itself goes on growing)."""
        return cls(length, tuple((layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone())
                                 for layer in cache.layers))

    def to_cache(self, batch: int = 1):
        """A new DynamicCache holding a copy of the prefix (repeated ``batch`` times); the entry stays untouched."""
        from transformers import DynamicCache

        # DynamicCache's first update concatenates onto an empty tensor: that is the one copy made here.
        return DynamicCache([(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in self.layers])


class PrefixCache(ByteLRU):
    """(adapter state, frame keys, crop count, prefix token ids) -> PrefixEntry."""
