"""The node's camera subscriptions, a lifecycle-managed entity: subscribed on activate, dropped on deactivate.

Every ``image_topics`` entry becomes a ``sensor_msgs/Image`` or ``CompressedImage`` subscription (sensor-data
QoS) whose callback only stores a reference to the message bytes in the FrameWindow, keyed by header stamp.
The message type is forced by a ``:compressed`` / ``:raw`` suffix, else names ending in ``/compressed`` are
compressed, else the graph decides; ``recheck_types`` follows a camera that starts advertising later.
"""
from __future__ import annotations

import threading
from typing import Callable

from rclpy.expand_topic_name import expand_topic_name
from rclpy.lifecycle import ManagedEntity, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from rclpy.validate_full_topic_name import validate_full_topic_name
from sensor_msgs.msg import CompressedImage, Image

from phi3v_spatial.settings import split_topic_spec

from .messages import compressed_payload, raw_payload, stamp_to_ns

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"


class Cameras(ManagedEntity):
    """Subscriptions of ``node`` to the topics ``specs()`` lists, feeding ``window``."""

    def __init__(self, node, window, specs: Callable[[], list[str]], callback_group):
        self._node = node
        self._window = window
        self._specs = specs
        self._group = callback_group
        self._lock = threading.RLock()
        self._subs: dict[str, tuple[object, str]] = {}  # resolved topic -> (subscription, message type)
        self._stamp_warned: set[str] = set()

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
            for name, mtype in wanted.items():
                if name in self._subs:
                    continue
                msg_type, take = (CompressedImage, compressed_payload) if mtype == COMPRESSED_TYPE else (Image, raw_payload)
                try:
                    sub = self._node.create_subscription(
                        msg_type, name, lambda m, t=name, take=take: self._window.add(t, self._stamp(t, m.header), take(m)),
                        qos_profile_sensor_data, callback_group=self._group)
                except Exception as exc:  # noqa: BLE001 - a bad name must not take the others down
                    self._node.get_logger().error(f"cannot subscribe to camera topic {name!r}: {exc}")
                    continue
                self._subs[name] = (sub, mtype)
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
        stats = self._window.stats()
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
