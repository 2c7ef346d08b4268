"""A small rosbag2 player for rclpy: publishes a bag's messages (raw CDR bytes) and ``/clock`` on a ROS graph.

Why: ``ros2 bag play`` is not on PyPI, and checking that the live node answers like ``phi3v-spatial replay``
needs the node to see the bag's frames under the bag's clock (``use_sim_time: true``). The bytes read by
``rosbags`` are published as they are (rclpy ``publish(bytes)``), so the node deserialises exactly what a
recorder stored. Unlike ``ros2 bag play`` it is stepped, not real-time: ``play_until(t)`` publishes what was
recorded up to ``t`` and then holds ``/clock`` at ``t`` until the next step, so a test can ask its question at
a precise bag time. It lives in ``phi3v_spatial.ros`` because it imports rclpy; the bag reading it shares with
replay (``phi3v_spatial.replay.bag_reader``) is ROS-free.
"""
from __future__ import annotations

import importlib
import threading
import time

from phi3v_spatial.replay.bag_reader import open_reader


def message_class(msgtype: str):
    """``sensor_msgs/msg/Image`` -> the rclpy message class."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


class BagPlayer:
    """Publishes ``topics`` of a bag (default: all) in recording order from an rclpy ``node``, with ``/clock``."""

    def __init__(self, node, bag_path: str, topics: list[str] | None = None, *, clock: bool = True,
                 pace_s: float = 0.02, clock_period_s: float = 0.02):
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock

        self.node = node
        self.pace_s = pace_s
        self.clock_period_s = clock_period_s
        reader = open_reader(bag_path)
        try:
            conns = [c for c in reader.connections if not topics or c.topic in topics]
            self.start_ns = reader.start_time
            # the messages are small test bags or slices; keep them (topic, log time, bytes) in recording order
            self.messages = [(c.topic, log_ns, bytes(raw)) for c, log_ns, raw in reader.messages(connections=conns)] if conns else []
        finally:
            reader.close()
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)  # matches reliable and best-effort subscribers
        self.publishers = {}
        for c in conns:
            if c.topic not in self.publishers:
                self.publishers[c.topic] = node.create_publisher(message_class(c.msgtype), c.topic, qos)
        self._clock_msg = Clock
        self.clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None
        self._next = 0
        self._now_ns: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clock_thread = None
        if clock:
            self._clock_thread = threading.Thread(target=self._hold_clock, daemon=True)
            self._clock_thread.start()

    def wait_for_subscribers(self, topics: list[str] | None = None, timeout_s: float = 20.0) -> list[str]:
        """Wait until every topic (and /clock) has a subscriber; returns the topics that still have none."""
        pubs = {t: p for t, p in self.publishers.items() if not topics or t in topics}
        if self.clock_pub is not None:
            pubs["/clock"] = self.clock_pub
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            missing = [t for t, p in pubs.items() if p.get_subscription_count() == 0]
            if not missing:
                return []
            time.sleep(0.05)
        return missing

    def _publish_clock(self, ns: int) -> None:
        from builtin_interfaces.msg import Time

        if self.clock_pub is not None:
            self.clock_pub.publish(self._clock_msg(clock=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)))

    def _hold_clock(self) -> None:
        """Republish the current bag time: /clock subscribers use depth 1 best effort, so one message may be lost."""
        while not self._stop.wait(self.clock_period_s):
            with self._lock:  # under the lock: a stale time must never overtake a newer one
                if self._now_ns is None:
                    continue
                try:
                    self._publish_clock(self._now_ns)
                except Exception:  # noqa: BLE001 - the context is shutting down
                    return

    def play_until(self, t_ns: int) -> int:
        """Publish every message recorded at or before ``t_ns`` (not yet played), then hold /clock at ``t_ns``.

        Returns the number of messages published in this step.
        """
        n = 0
        while self._next < len(self.messages) and self.messages[self._next][1] <= t_ns:
            topic, log_ns, raw = self.messages[self._next]
            with self._lock:
                self._now_ns = max(log_ns, self._now_ns or log_ns)
                self._publish_clock(self._now_ns)
            self.publishers[topic].publish(raw)
            self._next += 1
            n += 1
            time.sleep(self.pace_s)
        with self._lock:
            self._now_ns = t_ns
            self._publish_clock(t_ns)
        return n

    @property
    def done(self) -> bool:
        return self._next >= len(self.messages)

    def close(self) -> None:
        self._stop.set()
        if self._clock_thread is not None:
            self._clock_thread.join(2)
        for p in list(self.publishers.values()) + ([self.clock_pub] if self.clock_pub else []):
            self.node.destroy_publisher(p)
