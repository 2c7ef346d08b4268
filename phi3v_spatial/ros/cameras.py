"""The node's camera subscriptions, a lifecycle-managed entity: subscribed on activate, dropped on deactivate.

Every ``image_topics`` entry becomes a ``sensor_msgs/Image`` or ``CompressedImage`` subscription (sensor-data
QoS) whose callback only stores a reference to the message bytes in the FrameWindow, keyed by header stamp.
The message type is forced by a ``:compressed`` / ``:raw`` suffix, else names ending in ``/compressed`` are
compressed, else the graph decides; ``recheck_types`` follows a camera that starts advertising later.

Accounting (``CameraStats``): per camera, what arrived and what the camera must have sent. The publisher's
rate is estimated from the header stamps (the nominal period: the typical gap between consecutive stamps), and a
stamp span of k periods holding fewer than k + 1 frames means frames that never arrived, so ``/diagnostics`` can
say "37% of ~15 Hz arrive" instead of "dropped=0" (the window's own counter only sees frames that did arrive).

Depth streams (16UC1/32FC1/...; compressedDepth) are camera data the model cannot look at: the first such frame
logs one warning, the camera leaves the window, and requests use the other cameras (``RequestWindow``).
"""
from __future__ import annotations

import copy
import threading
import time
from collections import deque
from typing import Callable

from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.expand_topic_name import expand_topic_name
from rclpy.lifecycle import ManagedEntity, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from rclpy.validate_full_topic_name import validate_full_topic_name
from sensor_msgs.msg import CompressedImage, Image

from phi3v_spatial.engine.images import DEPTH_ENCODINGS
from phi3v_spatial.engine.window import WindowError
from phi3v_spatial.settings import split_topic_spec

from .messages import compressed_payload, raw_payload, stamp_to_ns

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
NS = 1_000_000_000
GAP_HISTORY = 64        # stamp gaps kept per camera for the nominal period (their lower quartile)
RATE_WINDOW_S = 10.0    # receive rate and delivered fraction: over the last seconds (monotonic clock)
MIN_GAPS = 4            # gaps needed before a publisher rate (and missed frames) is estimated


def depth_kind(msg) -> str:
    """The encoding / format of a depth image message ("" for a colour one)."""
    encoding = getattr(msg, "encoding", None)
    if encoding is not None:
        return encoding if encoding.strip() in DEPTH_ENCODINGS else ""
    fmt = (getattr(msg, "format", "") or "").lower()
    return msg.format if any(d in fmt for d in ("16uc1", "32fc1", "compresseddepth")) else ""


def _period(gaps) -> int | None:
    """The camera's nominal period from its recent stamp gaps: a rough value first (the lower quartile of the gaps
    not much shorter than the median: a late frame followed by a quick one must not halve it), then the median of
    the gaps within 0.5-1.5 of it (unbiased by jitter, and still right when most gaps span lost frames)."""
    if len(gaps) < MIN_GAPS:
        return None
    med = sorted(gaps)[len(gaps) // 2]
    kept = sorted(g for g in gaps if g >= med / 2)
    rough = kept[len(kept) // 4]
    near = sorted(g for g in gaps if 0.5 * rough <= g <= 1.5 * rough)
    return near[len(near) // 2]


def _expected(first_ns: int, last_ns: int, period: int) -> int:
    """Frames a camera with this period sent from its frame stamped ``first_ns`` to the one at ``last_ns``."""
    return round((last_ns - first_ns) / period) + 1


class _TopicCount:
    __slots__ = ("received", "missed_before", "first_stamp", "count", "last_stamp", "gaps", "arrivals", "bytes",
                 "resets")

    def __init__(self):
        self.received = 0
        self.missed_before = 0   # frames missed in earlier stamp epochs (before a clock reset)
        self.first_stamp = None  # this epoch's first stamp and how many frames arrived since
        self.count = 0
        self.last_stamp = None
        self.gaps: deque[int] = deque(maxlen=GAP_HISTORY)
        self.arrivals: deque[tuple[float, int]] = deque()  # (monotonic arrival time, stamp) of recent frames
        self.bytes = 0           # size of the newest frame's data
        self.resets = 0

    def missed(self, period: int | None) -> int:
        if period is None or self.first_stamp is None:
            return self.missed_before
        return self.missed_before + max(0, _expected(self.first_stamp, self.last_stamp, period) - self.count)


class CameraStats:
    """Per-camera delivery accounting from header stamps (thread-safe; ``note`` is O(1) on the callback).

    The camera's nominal period is learnt from its recent stamp gaps (``_period``); the frames it sent between two
    received frames are the stamp span over that period, so missed = expected - received. Counting over the span
    (not gap by gap) keeps a late frame followed by a quick one from looking like a loss. A stamp that goes back
    (clock reset, bag loop) starts a new epoch. Frames lost after the newest one that arrived cannot be known yet,
    and a camera that skips frames itself is counted as losing them.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._topics: dict[str, _TopicCount] = {}

    def note(self, topic: str, stamp_ns: int, nbytes: int = 0) -> None:
        now = self._clock()
        with self._lock:
            c = self._topics.get(topic)
            if c is None:
                c = self._topics[topic] = _TopicCount()
            c.received += 1
            c.bytes = nbytes
            if c.last_stamp is not None and stamp_ns < c.last_stamp:  # clock reset: a new epoch
                c.missed_before = c.missed(_period(c.gaps))
                c.gaps.clear()
                c.first_stamp = None
                c.resets += 1
            if c.first_stamp is None:
                c.first_stamp, c.count = stamp_ns, 0
            elif stamp_ns > c.last_stamp:
                c.gaps.append(stamp_ns - c.last_stamp)
            c.count += 1
            c.last_stamp = stamp_ns
            c.arrivals.append((now, stamp_ns))
            while c.arrivals and now - c.arrivals[0][0] > RATE_WINDOW_S:
                c.arrivals.popleft()

    def forget(self, topic: str) -> None:
        with self._lock:
            self._topics.pop(topic, None)

    def snapshot(self) -> dict[str, dict]:
        """Per topic: received and missed (totals), received_hz and delivered (the fraction of the frames the
        camera sent that arrived, None until its rate is known) over the last ``RATE_WINDOW_S``, publisher_hz,
        frame_bytes (newest frame), stamp_resets."""
        now = self._clock()
        out = {}
        with self._lock:
            for topic, c in self._topics.items():
                recent = [(t, st) for t, st in c.arrivals if now - t <= RATE_WINDOW_S]
                rate = (len(recent) - 1) / (now - recent[0][0]) if len(recent) > 1 and now > recent[0][0] else 0.0
                stamps = [st for _, st in recent]
                for i in range(len(stamps) - 1, 0, -1):  # only the frames since the last clock reset
                    if stamps[i] < stamps[i - 1]:
                        stamps = stamps[i:]
                        break
                period = _period(c.gaps)
                delivered = None
                if period is not None and stamps:
                    delivered = min(1.0, len(stamps) / _expected(stamps[0], stamps[-1], period))
                out[topic] = {
                    "received": c.received,
                    "missed": c.missed(period),
                    "received_hz": rate,
                    "publisher_hz": (NS / period) if period else None,
                    "delivered": delivered,
                    "frame_bytes": c.bytes,
                    "stamp_resets": c.resets,
                }
        return out


class Cameras(ManagedEntity):
    """Subscriptions of ``node`` to the topics ``specs()`` lists, feeding ``window``."""

    def __init__(self, node, window, specs: Callable[[], list[str]], callback_group, qos_depth: int = 30):
        self._node = node
        # sensor-data QoS (best effort: reliable would make a camera's publish() fail at full rate), with a deeper
        # queue than its 5: frames wait there while the executor serves requests instead of being overwritten
        self._qos = copy.copy(qos_profile_sensor_data)
        self._qos.depth = int(qos_depth)
        self._window = window
        self._specs = specs
        self._group = callback_group
        self._lock = threading.RLock()
        self._subs: dict[str, tuple[object, str]] = {}  # resolved topic -> (subscription, message type)
        self._stamp_warned: set[str] = set()
        self.stats = CameraStats()
        self.depth_topics: dict[str, str] = {}  # topics that sent depth images -> their encoding / format

    # ------------------------------------------------------------------ names
    def parse(self, spec: str) -> tuple[str, str | None]:
        """'name[:compressed|:raw]' -> (fully resolved name, forced type or None)."""
        spec, kind = split_topic_spec(spec)
        forced = {"compressed": COMPRESSED_TYPE, "raw": IMAGE_TYPE}.get(kind)
        try:
            name = expand_topic_name(spec.strip(), self._node.get_name(), self._node.get_namespace())
        except Exception:  # noqa: BLE001 - reported when subscribing
            name = spec.strip()
        return name, forced

    def resolve(self, spec: str) -> str:
        return self.parse(spec)[0]

    def invalid(self, spec: str) -> str:
        """Why an ``image_topics`` entry is not a valid topic name ("" when it is)."""
        base, _ = split_topic_spec(spec)
        try:
            validate_full_topic_name(expand_topic_name(base.strip(), self._node.get_name(), self._node.get_namespace()))
        except Exception as exc:  # noqa: BLE001 - rclpy raises several kinds for bad names
            return f"invalid topic name {spec!r}: {exc}"
        return ""

    @property
    def types(self) -> dict[str, str]:
        with self._lock:
            return {name: mtype for name, (_, mtype) in self._subs.items()}

    def _graph_type(self, name: str, forced: str | None, graph: dict) -> str:
        if forced:
            return forced
        if name.endswith("/compressed"):
            return COMPRESSED_TYPE
        advertised = graph.get(name, [])
        return COMPRESSED_TYPE if COMPRESSED_TYPE in advertised and IMAGE_TYPE not in advertised else IMAGE_TYPE

    # ------------------------------------------------------------------ lifecycle
    def on_activate(self, state) -> TransitionCallbackReturn:
        self.sync()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self.unsubscribe_all()
        return TransitionCallbackReturn.SUCCESS

    on_shutdown = on_error = on_deactivate

    # ------------------------------------------------------------------ subscriptions
    def sync(self) -> None:
        """Subscribe every listed topic and drop the ones no longer listed (or whose type changed)."""
        graph = dict(self._node.get_topic_names_and_types())
        wanted = {}
        for spec in self._specs():
            name, forced = self.parse(spec)
            wanted[name] = self._graph_type(name, forced, graph)
        with self._lock:
            for name in list(self._subs):
                if name not in wanted or self._subs[name][1] != wanted[name]:
                    self._node.destroy_subscription(self._subs.pop(name)[0])
                    if name not in wanted:
                        self._window.remove_topic(name)
                        self.stats.forget(name)
                        self.depth_topics.pop(name, None)
            for name, mtype in wanted.items():
                if name in self._subs:
                    continue
                msg_type, take = (CompressedImage, compressed_payload) if mtype == COMPRESSED_TYPE else (Image, raw_payload)
                try:
                    sub = self._node.create_subscription(
                        msg_type, name, lambda m, t=name, take=take: self._on_frame(t, m, take),
                        self._qos, callback_group=self._group,
                        # no QoS event handlers: rclpy 9.1.2's executor raises InvalidHandle (and its spin thread
                        # dies) when a subscription's event handler is destroyed while it builds its wait set, which
                        # a deactivate or an image_topics change does; best-effort sensor QoS is compatible with
                        # every publisher, so the default "incompatible QoS" warning has nothing to report here
                        event_callbacks=SubscriptionEventCallbacks(use_default_callbacks=False))
                except Exception as exc:  # noqa: BLE001 - a bad name must not take the others down
                    self._node.get_logger().error(f"cannot subscribe to camera topic {name!r}: {exc}")
                    continue
                self._subs[name] = (sub, mtype)
                if name not in self.depth_topics:
                    self._window.add_topic(name)

    def unsubscribe_all(self) -> None:
        with self._lock:
            for sub, _ in self._subs.values():
                self._node.destroy_subscription(sub)
            self._subs.clear()

    def recheck_types(self) -> None:
        """A camera that started after activation may advertise CompressedImage: follow the graph.

        Only cameras that have not delivered a frame yet are re-subscribed (a working one is never disturbed).
        """
        stats = self.stats.snapshot()
        graph = dict(self._node.get_topic_names_and_types())
        with self._lock:
            if not self._subs:
                return
            stale = []
            for spec in self._specs():
                name, forced = self.parse(spec)
                if forced or name not in self._subs or (stats.get(name) or {}).get("received"):
                    continue
                advertised = graph.get(name, [])
                if advertised and self._subs[name][1] not in advertised:
                    stale.append(name)
            for name in stale:
                self._node.destroy_subscription(self._subs.pop(name)[0])
        if stale:
            self.sync()

    def _on_frame(self, topic: str, msg, take) -> None:
        """The subscription callback: count the frame, then store a reference to its bytes (depth: skip it)."""
        stamp = self._stamp(topic, msg.header)
        self.stats.note(topic, stamp, len(msg.data))
        if depth := depth_kind(msg):
            if topic not in self.depth_topics:
                self.depth_topics[topic] = depth
                self._window.remove_topic(topic)
                self._node.get_logger().warning(
                    f"camera {topic} publishes depth images ({depth}): ignored, the model needs colour images; "
                    f"requests use the other cameras (remove it from image_topics)")
            return
        if self.depth_topics.pop(topic, None) is not None:
            self._node.get_logger().info(f"camera {topic} publishes colour images again: used again")
        self._window.add(topic, stamp, take(msg))

    def _stamp(self, topic: str, header) -> int:
        """The frame's header stamp; a camera stamping 0 gets the receive time (warned once)."""
        ns = stamp_to_ns(header.stamp)
        if ns == 0:
            if topic not in self._stamp_warned:
                self._stamp_warned.add(topic)
                self._node.get_logger().warning(
                    f"camera {topic} publishes header.stamp = 0; using the receive time instead")
            ns = self._node.get_clock().now().nanoseconds
        return ns


class RequestWindow:
    """The FrameWindow as requests see it: cameras found to publish depth images are left out, and a request that
    is left with no colour camera gets an error saying so (instead of "not subscribed" / "image_topics is
    empty"). Everything else is the FrameWindow's."""

    def __init__(self, window, cameras: Cameras):
        self._window = window
        self._cameras = cameras

    def __getattr__(self, name):
        return getattr(self._window, name)

    def select(self, topics=None, num_frames=None, now_ns=None):
        depth = dict(self._cameras.depth_topics)
        if depth:
            why = "; ".join(f"{t} publishes depth images ({enc})" for t, enc in sorted(depth.items()))
            if topics:
                kept = [t for t in topics if t not in depth]
                if not kept:
                    raise WindowError(f"no colour camera to use: {why}, which the model cannot look at; ask for a "
                                      f"colour camera topic (or add one to image_topics)")
                topics = kept
            elif not self._window.topics:
                raise WindowError(f"no colour camera to use: every camera in image_topics is a depth stream ({why}), "
                                  f"which the model cannot look at; add a colour camera topic to image_topics")
        return self._window.select(topics, num_frames, now_ns)
