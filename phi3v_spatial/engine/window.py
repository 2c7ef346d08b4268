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
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .images import ImageDecodeError, ImageTooLarge, decode_compressed, decode_raw, validate_image

NS = 1_000_000_000
# A stamp this far behind the topic's latest frame means the clock jumped back (sim restart, looped
# bag): start the topic afresh instead of silently ignoring every new frame.
BACKJUMP_RESET_NS = 1 * NS


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


class Frame:
    """One camera frame; decodes its payload at most once, on first use, off the subscription thread."""

    __slots__ = ("topic", "stamp_ns", "payload", "_rgb", "_error", "_lock")

    def __init__(self, topic: str, stamp_ns: int, payload):
        self.topic = topic
        self.stamp_ns = int(stamp_ns)
        self.payload = payload
        self._rgb: np.ndarray | None = None
        self._error: ImageDecodeError | None = None
        self._lock = threading.Lock()

    def rgb(self, max_pixels: int | None = None) -> np.ndarray:
        """RGB uint8 HxWx3; raises ImageDecodeError naming the topic when the payload is unusable."""
        with self._lock:
            if self._rgb is None and self._error is None:
                try:
                    self._rgb = decode_payload(self.payload, max_pixels)
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
    def keys(self) -> list[tuple[str, int]]:
        """(topic, header stamp) per frame: the frame identity the engine's caches use."""
        return [(f.topic, f.stamp_ns) for f in self.frames]

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

    # -- ingest (hot path: O(1), no decoding, no copying) ----------------------------------------
    def add(self, topic: str, stamp_ns: int, payload) -> str:
        """Store a frame; returns what happened: 'keyframe', 'latest', 'duplicate', 'out_of_order' or 'reset'."""
        frame = Frame(topic, stamp_ns, payload)
        min_ns = int(self.min_interval_s * NS)
        with self._lock:
            buf = self._topics.get(topic)
            if buf is None:
                buf = self._topics[topic] = _TopicBuffer(self.capacity)
            buf.received += 1
            status = "keyframe"
            if buf.latest is not None:
                if frame.stamp_ns == buf.latest.stamp_ns:
                    buf.dropped += 1
                    return "duplicate"
                if frame.stamp_ns < buf.latest.stamp_ns:
                    if buf.latest.stamp_ns - frame.stamp_ns < BACKJUMP_RESET_NS:
                        buf.dropped += 1
                        return "out_of_order"
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

