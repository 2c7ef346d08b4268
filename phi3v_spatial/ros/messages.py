"""Conversions between ROS messages and the engine's plain Python types (numpy, Relation, dicts).

Kept apart from the node so the demo and the tests build messages the same way the node reads them.
Images: plain numpy (no cv_bridge), assigning ``bytes`` to ``data`` (assigning an ndarray is ~1000x slower).
"""
from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

from phi3v_spatial.engine.window import CompressedPayload, RawPayload
from phi3v_spatial_interfaces.msg import ObjectRelation, PlanStep

NS = 1_000_000_000


def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * NS + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    ns = max(0, int(ns))
    return Time(sec=ns // NS, nanosec=ns % NS)


def image_msg(arr: np.ndarray, encoding: str = "rgb8", stamp_ns: int = 0, frame_id: str = "") -> Image:
    """An Image from an HxWx3 (or HxW mono) uint8 array already in ``encoding``'s channel order."""
    a = np.ascontiguousarray(arr)
    m = Image()
    m.header.stamp = ns_to_stamp(stamp_ns)
    m.header.frame_id = frame_id
    m.height, m.width = int(a.shape[0]), int(a.shape[1])
    m.encoding = encoding
    m.is_bigendian = 0
    m.step = int(a.strides[0])
    m.data = a.tobytes()
    return m


def compressed_msg(rgb: np.ndarray, fmt: str = "jpeg", stamp_ns: int = 0, frame_id: str = "", quality: int = 90) -> CompressedImage:
    """A CompressedImage (jpeg/png) from an RGB array, encoded with OpenCV like image_transport does."""
    import cv2

    ext = ".png" if fmt.lower().startswith("png") else ".jpg"
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise ValueError("OpenCV could not encode the image")
    m = CompressedImage()
    m.header.stamp = ns_to_stamp(stamp_ns)
    m.header.frame_id = frame_id
    m.format = "png" if ext == ".png" else "jpeg"
    m.data = buf.tobytes()
    return m


def raw_payload(msg: Image) -> RawPayload:
    """Keeps a reference to the message's byte buffer: no copy on the subscription callback."""
    return RawPayload(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))


def compressed_payload(msg: CompressedImage) -> CompressedPayload:
    return CompressedPayload(msg.format, msg.data)


def relation_to_msg(r) -> ObjectRelation:
    return ObjectRelation(subject=str(r.subject), relation=str(r.relation), object=str(r.object),
                          holds=bool(r.holds), probability=float(r.probability))


def plan_step_to_msg(step: dict) -> PlanStep:
    return PlanStep(**{k: str(step.get(k, "") or "") for k in ("action", "target", "reference", "relation", "detail")})
