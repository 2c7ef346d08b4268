"""Writing camera frames into a rosbag2 bag (mcap or sqlite3) with ``rosbags``, no ROS install needed.

Why: bag replay and its tests need bags whose ground truth is known; synthetic scenes provide it. Raw frames
are ``sensor_msgs/msg/Image`` (rgb8), compressed ones ``sensor_msgs/msg/CompressedImage`` (jpeg); every
message's log time equals its ``header.stamp``, so stamp order and recording order agree.

``write_camera_bag(path, frames, storage=None, frame_ids=None) -> str`` writes an iterable of
``(topic, stamp_ns, rgb ndarray, compressed: bool)`` and returns the bag directory. ``CameraBagWriter`` is the
same as a context manager, for streaming. A path ending in ``.db3`` gives sqlite3 storage, ``.mcap`` or no
suffix gives mcap; the suffix is dropped for the bag directory (rosbag2 bags are directories:
``out.mcap`` -> ``out/out.mcap`` + ``out/metadata.yaml``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

RAW_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
NS = 1_000_000_000
STORAGE_SUFFIXES = {".mcap": "mcap", ".db3": "sqlite3"}
JPEG_QUALITY = 90


def bag_location(path: str | os.PathLike, storage: str | None = None) -> tuple[str, str]:
    """``(bag directory, storage)`` for a requested output path (see module docstring)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in STORAGE_SUFFIXES:
        inferred, p = STORAGE_SUFFIXES[suffix], p.with_suffix("")
    else:
        inferred = "mcap"
    storage = storage or inferred
    if storage not in ("mcap", "sqlite3"):
        raise ValueError(f"bag storage must be 'mcap' or 'sqlite3', got {storage!r}")
    return str(p), storage


class CameraBagWriter:
    """Streaming writer: ``with CameraBagWriter(path) as w: w.write(topic, stamp_ns, rgb, compressed)``."""

    def __init__(self, path: str | os.PathLike, storage: str | None = None, frame_ids: dict[str, str] | None = None):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        self.path, self.storage = bag_location(path, storage)
        if os.path.exists(self.path):
            raise FileExistsError(f"bag {self.path} exists already; rosbag2 bags are never overwritten")
        self.frame_ids = dict(frame_ids or {})
        self.ts = get_typestore(Stores.ROS2_KILTED)
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(self.path, version=9, storage_plugin=plugin)
        self.connections: dict[str, tuple[object, bool]] = {}
        self.count = 0

    def __enter__(self) -> "CameraBagWriter":
        self.writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()

    def _frame_id(self, topic: str) -> str:
        return self.frame_ids.get(topic) or topic.strip("/").split("/")[0] or "camera"

    def write(self, topic: str, stamp_ns: int, rgb: np.ndarray, compressed: bool = False) -> None:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"{topic}: frames must be H x W x 3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
        if topic not in self.connections:
            msgtype = COMPRESSED_TYPE if compressed else RAW_TYPE
            self.connections[topic] = (self.writer.add_connection(topic, msgtype, typestore=self.ts), compressed)
        conn, is_compressed = self.connections[topic]
        if is_compressed != bool(compressed):
            raise ValueError(f"{topic}: mixes raw and compressed frames; one topic has one message type")
        t = self.ts.types
        stamp_ns = int(stamp_ns)
        header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=stamp_ns // NS, nanosec=stamp_ns % NS),
                                          frame_id=self._frame_id(topic))
        if compressed:
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise ValueError(f"{topic}: JPEG encoding failed")
            msg = t[COMPRESSED_TYPE](header=header, format="jpeg", data=np.frombuffer(buf.tobytes(), np.uint8))
        else:
            h, w, _ = rgb.shape
            msg = t[RAW_TYPE](header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                              data=np.ascontiguousarray(rgb).reshape(-1))
        self.writer.write(conn, stamp_ns, self.ts.serialize_cdr(msg, msg.__msgtype__))
        self.count += 1


def write_camera_bag(path: str | os.PathLike, frames: Iterable[tuple[str, int, np.ndarray, bool]],
                     storage: str | None = None, frame_ids: dict[str, str] | None = None) -> str:
    """Write ``(topic, stamp_ns, rgb, compressed)`` frames into a new bag; return the bag directory."""
    with CameraBagWriter(path, storage, frame_ids) as w:
        for topic, stamp_ns, rgb, compressed in frames:
            w.write(topic, stamp_ns, rgb, compressed)
    return w.path
