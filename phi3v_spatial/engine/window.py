"""A per-camera frame window keyed by header stamps, shared by the node and bag replay.

Why one implementation: answers recorded by the node and answers recomputed from a bag must see the
same frames, so both go through :class:`FrameWindow` with the same parameters.

Time is always the *stamp* time in ns (never wall clock): the caller passes ``now_ns`` (the node's clock,
i.e. sim time under ``use_sim_time``; the question time during replay).

Keyframe rule (``min_interval_s``): each topic keeps

* the single **latest** frame (always replaced by a newer one, so answers see the freshest image), and
* a bounded history of **keyframes** spaced at least ``min_interval_s`` apart. A frame closer than
  ``min_interval_s`` to the last keyframe is *dropped from the history* (it only replaces the latest slot).

``select`` returns, per topic, the latest frame plus the newest keyframes at least ``min_interval_s``
older than it, up to ``num_frames``; frames older than ``max_age_s`` are never used.

Frames are stored undecoded (a reference to the message's byte buffer, no copy on the subscription
callback) and decoded lazily, once, by whoever selects them (see :class:`Frame.rgb`).

Frame identity: (topic, header stamp) alone does not name a picture -- a simulator reset, a camera driver
restart or a bag played twice sends *different* pixels under stamps already seen. Every frame therefore also
carries a digest of its payload bytes (:attr:`Frame.digest`, BLAKE2b-128 over the encoding, size and data),
computed once, lazily (by the request that first selects the frame, or by ``add`` when the stamp collides with
a held frame), never per frame on the subscription callback. ``Selection.keys`` -- what the engine's caches key
on -- is (topic, stamp, digest): different pixels never share a cache entry. Stamp rules in ``add``:

* a stamp older than the topic's latest frame means the clock went back (sim time reset, a bag looped or
  played again, a driver restart): the topic's buffer starts afresh, so old pictures are never mixed into a
  window with new ones -- unless it is a re-delivery of a frame held already (same stamp, same bytes);
* the same stamp as the latest frame with the same bytes is a duplicate (dropped); with other bytes it is a
  new picture and also starts the topic afresh.
"""
from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .images import ImageDecodeError, ImageTooLarge, decode_compressed, decode_raw, validate_image

NS = 1_000_000_000
DIGEST_BYTES = 16


class WindowError(Exception):
    """No usable frames for a request; ``str(err)`` names the topic(s) and what to check."""


class StaleWindowError(WindowError):
    """The newest frame of a requested camera is older than ``max_age_s``."""


@dataclass(frozen=True)
class RawPayload:
    """The fields of a sensor_msgs/Image, ``data`` kept by reference (array.array / bytes)."""
    encoding: str
    height: int
    width: int
    step: int
    data: Any
    is_bigendian: bool = False


@dataclass(frozen=True)
class CompressedPayload:
    """The fields of a sensor_msgs/CompressedImage."""
    format: str
    data: Any


def decode_payload(payload, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 HxWx3 from a RawPayload, a CompressedPayload or an RGB array (ImageDecodeError says why not)."""
    if isinstance(payload, RawPayload):
        return decode_raw(payload.encoding, payload.height, payload.width, payload.step, payload.data,
                          is_bigendian=payload.is_bigendian, max_pixels=max_pixels)
    if isinstance(payload, CompressedPayload):
        return decode_compressed(payload.data, payload.format, max_pixels=max_pixels)
    return validate_image(payload, max_pixels=max_pixels)


def _bytes_view(data) -> memoryview:
    """The bytes of a message buffer (bytes, array.array, numpy array, list) without a copy where possible."""
    try:
        view = memoryview(data)
        if view.c_contiguous:
            return view.cast("B")
    except TypeError:
        pass
    return memoryview(np.ascontiguousarray(np.asarray(data, dtype=np.uint8))).cast("B")


def payload_digest(payload) -> str:
    """Hex BLAKE2b-128 of what makes the picture: encoding / format, size, and every data byte."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    if isinstance(payload, RawPayload):
        h.update(f"raw|{payload.encoding}|{payload.height}|{payload.width}|{payload.step}|"
                 f"{int(bool(payload.is_bigendian))}|".encode())
        h.update(_bytes_view(payload.data))
    elif isinstance(payload, CompressedPayload):
        h.update(f"compressed|{payload.format}|".encode())
        h.update(_bytes_view(payload.data))
    else:
        arr = np.ascontiguousarray(payload)
        h.update(f"array|{arr.shape}|{arr.dtype}|".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class Frame:
    """One camera frame; decodes its payload at most once, on first use, off the subscription thread.

    ``digest`` (the payload bytes' BLAKE2b) is computed at most once too, on first use; it stays valid after the
    payload buffer is dropped for the decoded image.
    """

    __slots__ = ("topic", "stamp_ns", "payload", "_rgb", "_error", "_lock", "_digest")

    def __init__(self, topic: str, stamp_ns: int, payload):
        self.topic = topic
        self.stamp_ns = int(stamp_ns)
        self.payload = payload
        self._rgb: np.ndarray | None = None
        self._error: ImageDecodeError | None = None
        self._digest: str | None = None
        self._lock = threading.Lock()

    @property
    def digest(self) -> str:
        """Content identity of the frame's payload (hex); with topic and stamp, the frame's cache identity."""
        with self._lock:
            return self._digest_locked()

    def _digest_locked(self) -> str:
        if self._digest is None:
            self._digest = payload_digest(self.payload if self.payload is not None else self._rgb)
        return self._digest

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.topic, self.stamp_ns, self.digest)

    def rgb(self, max_pixels: int | None = None) -> np.ndarray:
        """RGB uint8 HxWx3; raises ImageDecodeError naming the topic when the payload is unusable."""
        with self._lock:
            if self._rgb is None and self._error is None:
                try:
                    self._rgb = decode_payload(self.payload, max_pixels)
                    self._digest_locked()  # of the message bytes, before they go
                    self.payload = None  # the decoded array replaces the message buffer
                except ImageTooLarge as exc:  # the limit may be raised at runtime: try again next time
                    raise ImageTooLarge(f"camera {self.topic}: {exc}") from None
                except ImageDecodeError as exc:
                    self._error = type(exc)(f"camera {self.topic}: {exc}")
            if self._error is not None:
                raise self._error
            return self._rgb

    def __repr__(self):
        return f"Frame({self.topic!r}, stamp_ns={self.stamp_ns})"


@dataclass
class Selection:
    """Frames chosen for one request, oldest slot first, cameras in a fixed (sorted) order inside a slot."""
    frames: list[Frame]
    topics: list[str]
    skew_ns: int = 0  # largest stamp spread across cameras within one slot

    @property
    def stamps_ns(self) -> list[int]:
        return [f.stamp_ns for f in self.frames]

    @property
    def keys(self) -> list[tuple[str, int, str]]:
        """(topic, header stamp, payload digest) per frame: the frame identity the engine's caches use.

        The digest makes it honest: a different picture under a (topic, stamp) seen before is a different key."""
        return [f.key for f in self.frames]

    def images(self, max_pixels: int | None = None) -> list[np.ndarray]:
        return [f.rgb(max_pixels) for f in self.frames]


class _TopicBuffer:
    __slots__ = ("keyframes", "latest", "received", "dropped", "resets")

    def __init__(self, capacity: int):
        self.keyframes: deque[Frame] = deque(maxlen=capacity)
        self.latest: Frame | None = None
        self.received = 0
        self.dropped = 0
        self.resets = 0


_LIMITS = {"num_frames": (int, 1), "min_interval_s": (float, 0), "max_age_s": (float, 0), "capacity": (int, 1)}


class FrameWindow:
    """Thread-safe bounded per-topic frame buffers (see the module docstring for the rules)."""

    def __init__(self, num_frames: int = 1, min_interval_s: float = 0.0, max_age_s: float = 2.0,
                 capacity: int = 8):
        self._lock = threading.Lock()
        self._topics: dict[str, _TopicBuffer] = {}
        self.configure(num_frames=num_frames, min_interval_s=min_interval_s, max_age_s=max_age_s,
                       capacity=capacity)

    # -- configuration -----------------------------------------------------------------------
    def configure(self, *, num_frames: int | None = None, min_interval_s: float | None = None,
                  max_age_s: float | None = None, capacity: int | None = None) -> None:
        """Change parameters at runtime (the node's parameter callback); buffers are kept."""
        values = {"num_frames": num_frames, "min_interval_s": min_interval_s, "max_age_s": max_age_s,
                  "capacity": capacity}
        with self._lock:
            for name, value in values.items():
                if value is None:
                    continue
                kind, low = _LIMITS[name]
                if kind(value) < low:
                    raise ValueError(f"window.{name} must be >= {low}" + (" (0 = no age limit)" if name == "max_age_s" else ""))
                setattr(self, name, kind(value))
            if capacity is not None:
                for buf in self._topics.values():
                    buf.keyframes = deque(buf.keyframes, maxlen=self.capacity)

    def add_topic(self, topic: str) -> None:
        """Declare a camera (subscribed, maybe no frames yet) so requests can tell 'silent' from 'unknown'."""
        with self._lock:
            self._topics.setdefault(topic, _TopicBuffer(self.capacity))

    def remove_topic(self, topic: str) -> None:
        with self._lock:
            self._topics.pop(topic, None)

    def clear(self) -> None:
        with self._lock:
            for t in list(self._topics):
                self._topics[t] = _TopicBuffer(self.capacity)

    @property
    def topics(self) -> list[str]:
        with self._lock:
            return sorted(self._topics)

    # -- ingest (hot path: O(1), no decoding, no copying, no hashing but on a stamp collision) ----------------------------------------
    def add(self, topic: str, stamp_ns: int, payload) -> str:
        """Store a frame; returns what happened: 'keyframe', 'latest', 'duplicate' or 'reset'.

        'reset': the stamp went back (or a new picture came under the latest stamp): the topic starts afresh with
        this frame. 'duplicate': a frame held already (same stamp, same bytes), delivered again: dropped.
        """
        frame = Frame(topic, stamp_ns, payload)
        min_ns = int(self.min_interval_s * NS)
        with self._lock:
            buf = self._topics.get(topic)
            same_stamp = [] if buf is None or buf.latest is None or frame.stamp_ns > buf.latest.stamp_ns else \
                [f for f in (*buf.keyframes, buf.latest) if f.stamp_ns == frame.stamp_ns]
        if same_stamp:  # rare (a re-delivery or a clock reset): hash outside the window lock; frames keep digests
            for f in (frame, *same_stamp):
                f.digest  # noqa: B018 - computes and keeps it
        with self._lock:
            buf = self._topics.get(topic)
            if buf is None:
                buf = self._topics[topic] = _TopicBuffer(self.capacity)
            buf.received += 1
            status = "keyframe"
            latest = buf.latest
            if latest is not None and frame.stamp_ns <= latest.stamp_ns:
                if any(f.stamp_ns == frame.stamp_ns and f.digest == frame.digest for f in (*buf.keyframes, latest)):
                    buf.dropped += 1
                    return "duplicate"
                # the clock went back (or another picture came under a stamp seen before): start afresh
                buf.keyframes.clear()
                buf.latest = None
                buf.resets += 1
                status = "reset"
            buf.latest = frame
            if not buf.keyframes or frame.stamp_ns - buf.keyframes[-1].stamp_ns >= min_ns:
                buf.keyframes.append(frame)
                return status
            return "latest" if status == "keyframe" else status

    # -- select ------------------------------------------------------------------------------
    def select(self, topics: Iterable[str] | None = None, num_frames: int | None = None,
               now_ns: int | None = None) -> Selection:
        """Pick up to ``num_frames`` frames per topic (empty/None topics = all known topics).

        Raises WindowError for unknown/silent topics and StaleWindowError when a camera's newest frame
        is older than ``max_age_s`` relative to ``now_ns``.
        """
        with self._lock:
            wanted = sorted(dict.fromkeys(topics)) if topics else sorted(self._topics)
            n = int(num_frames) if num_frames else self.num_frames
            if n < 1:
                raise WindowError("num_frames must be >= 1")
            if not wanted:
                raise WindowError("no camera topics are subscribed (parameter image_topics is empty) "
                                  "and the request carries no images")
            unknown = [t for t in wanted if t not in self._topics]
            if unknown:
                raise WindowError(f"camera topic(s) {', '.join(unknown)} not subscribed; subscribed: "
                                  f"{', '.join(sorted(self._topics)) or 'none'} (parameter image_topics)")
            silent = [t for t in wanted if self._topics[t].latest is None]
            if silent:
                raise WindowError(f"no frames received yet on {', '.join(silent)}; is the camera publishing "
                                  f"(sensor-data QoS, best effort) on this ROS_DOMAIN_ID?")
            max_age_ns = int(self.max_age_s * NS)
            min_ns = int(self.min_interval_s * NS)
            ages = {t: (now_ns - self._topics[t].latest.stamp_ns) / NS for t in wanted} if now_ns is not None else {}
            if now_ns is not None and max_age_ns > 0:
                stale = [t for t in wanted if ages[t] * NS > max_age_ns]
                if stale:
                    detail = ", ".join(f"{t} newest frame is {ages[t]:.2f} s old" for t in stale)
                    raise StaleWindowError(
                        f"stale camera window: {detail} (limit window.max_age_s = {self.max_age_s:g} s); "
                        f"is the camera still publishing, and do the node and camera agree on the clock "
                        f"(use_sim_time)?")
            per_topic: dict[str, list[Frame]] = {}
            for t in wanted:
                buf = self._topics[t]
                latest = buf.latest
                chosen = [latest]
                for kf in reversed(buf.keyframes):
                    if len(chosen) >= n:
                        break
                    if latest.stamp_ns - kf.stamp_ns < max(min_ns, 1):
                        continue  # the latest frame itself, or too close to it
                    if now_ns is not None and max_age_ns > 0 and now_ns - kf.stamp_ns > max_age_ns:
                        break
                    if kf.stamp_ns < chosen[-1].stamp_ns and chosen[-1].stamp_ns - kf.stamp_ns >= min_ns:
                        chosen.append(kf)
                per_topic[t] = list(reversed(chosen))  # oldest first
            # Align by stamp: the camera with the most frames (ties: the one whose newest frame is oldest) sets
            # the slot times; every other camera contributes, per slot, its held frame nearest to that time.
            ref = max(wanted, key=lambda t: (len(per_topic[t]), -per_topic[t][-1].stamp_ns))
            frames: list[Frame] = []
            skew = 0
            for anchor in per_topic[ref]:
                slot = []
                for t in wanted:
                    if t == ref:
                        slot.append(anchor)
                        continue
                    pool = self._held(t, now_ns, max_age_ns)
                    slot.append(min(pool, key=lambda f: (abs(f.stamp_ns - anchor.stamp_ns), -f.stamp_ns)))
                stamps = [f.stamp_ns for f in slot]
                skew = max(skew, max(stamps) - min(stamps))
                frames.extend(slot)
            return Selection(frames=frames, topics=wanted, skew_ns=skew)

    def _held(self, topic: str, now_ns: int | None, max_age_ns: int) -> list[Frame]:
        """Keyframes and the latest frame of a camera that are not older than the age limit."""
        buf = self._topics[topic]
        pool = list(buf.keyframes)
        if not pool or pool[-1] is not buf.latest:
            pool.append(buf.latest)
        if now_ns is not None and max_age_ns > 0:
            pool = [f for f in pool if now_ns - f.stamp_ns <= max_age_ns] or [buf.latest]
        return pool

    # -- status ------------------------------------------------------------------------------
    def stats(self, now_ns: int | None = None) -> dict[str, dict]:
        """Per-topic counters for diagnostics: frames held, received, dropped, newest stamp and age."""
        with self._lock:
            out = {}
            for t, buf in sorted(self._topics.items()):
                latest = buf.latest
                out[t] = {
                    "frames": len(buf.keyframes) + (1 if latest is not None and (not buf.keyframes or buf.keyframes[-1] is not latest) else 0),
                    "received": buf.received,
                    "dropped": buf.dropped,
                    "resets": buf.resets,
                    "latest_stamp_ns": latest.stamp_ns if latest else None,
                    "age_s": ((now_ns - latest.stamp_ns) / NS) if (latest and now_ns is not None) else None,
                }
            return out

