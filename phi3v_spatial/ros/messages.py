"""Conversions between ROS messages and the engine's plain Python types (numpy, Relation, requests, replies).

The node's callbacks are these conversions around the request layer (``engine/requests.py``); kept apart from
the node so the demo and the tests build messages the same way the node reads them.
Images: plain numpy (no cv_bridge), assigning ``bytes`` to ``data`` (assigning an ndarray is ~1000x slower).
"""
from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image

from phi3v_spatial.engine.parsing import Relation
from phi3v_spatial.engine.requests import (
    AdapterReply, AdapterRequest, AskReply, AskRequest, PlanReply, PlanRequest, RelationsReply, RelationsRequest,
    RequestImage,
)
from phi3v_spatial.engine.window import CompressedPayload, RawPayload
from phi3v_spatial_interfaces.action import Plan
from phi3v_spatial_interfaces.msg import ObjectRelation, PlanStamped, PlanStep, RelationsStamped
from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations, SetAdapter

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


# ---------------------------------------------------------------------- requests and replies (engine/requests.py)
def request_images(msgs) -> list[RequestImage]:
    """Images carried by a request: references to their bytes, decoded by the request layer."""
    return [RequestImage(raw_payload(m), stamp_to_ns(m.header.stamp)) for m in msgs]


def ask_request(req: AskSpatial.Request) -> AskRequest:
    return AskRequest(question=req.question, images=request_images(req.images), topics=list(req.image_topics),
                      num_frames=int(req.num_frames), max_new_tokens=int(req.max_new_tokens))


def relations_request(req: QueryRelations.Request) -> RelationsRequest:
    return RelationsRequest(candidates=[Relation(c.subject, c.relation, c.object) for c in req.candidates],
                            images=request_images(req.images), topics=list(req.image_topics),
                            num_frames=int(req.num_frames))


def plan_request(goal: Plan.Goal) -> PlanRequest:
    return PlanRequest(instruction=goal.instruction, images=request_images(goal.images), topics=list(goal.image_topics),
                       num_frames=int(goal.num_frames), max_new_tokens=int(goal.max_new_tokens),
                       timeout_s=float(goal.timeout_s))


def adapter_request(req: SetAdapter.Request) -> AdapterRequest:
    return AdapterRequest(name=req.name, scale=float(req.scale))


def ask_response(reply: AskReply, res: AskSpatial.Response) -> AskSpatial.Response:
    res.success, res.error, res.answer = reply.success, reply.error, reply.answer
    res.relations = [relation_to_msg(r) for r in reply.relations]
    res.frame_stamps = [ns_to_stamp(f.stamp_ns) for f in reply.frames] if reply.success else []
    res.latency_s = float(reply.latency_s)
    res.note = reply.note
    return res


def relations_response(reply: RelationsReply, res: QueryRelations.Response) -> QueryRelations.Response:
    res.success, res.error = reply.success, reply.error
    res.relations = [relation_to_msg(r) for r in reply.relations]
    res.frame_stamps = [ns_to_stamp(f.stamp_ns) for f in reply.frames] if reply.success else []
    res.latency_s = float(reply.latency_s)
    res.note = reply.note
    return res


def plan_result(reply: PlanReply) -> Plan.Result:
    return Plan.Result(success=reply.success, error=reply.error, steps=[plan_step_to_msg(s) for s in reply.steps],
                       reason=reply.reason, raw_text=reply.raw_text, latency_s=float(reply.latency_s),
                       note=reply.note)


def adapter_response(reply: AdapterReply, res: SetAdapter.Response) -> SetAdapter.Response:
    res.success, res.error, res.active, res.available = reply.success, reply.error, reply.active, list(reply.available)
    return res


def relations_stamped(question: str, reply: AskReply | RelationsReply) -> RelationsStamped:
    """What ``~/relations`` records for an answered ask / query_relations."""
    msg = RelationsStamped(question=question, answer=getattr(reply, "answer", ""),
                           relations=[relation_to_msg(r) for r in reply.relations],
                           frame_stamps=[ns_to_stamp(f.stamp_ns) for f in reply.frames], image_topics=list(reply.topics),
                           latency_s=float(reply.latency_s))
    msg.header.stamp = ns_to_stamp(max((f.stamp_ns for f in reply.frames), default=0))
    return msg


def plan_stamped(instruction: str, reply: PlanReply) -> PlanStamped:
    """What ``~/plans`` records for every plan goal."""
    result = plan_result(reply)
    msg = PlanStamped(instruction=instruction, steps=list(result.steps), raw_text=result.raw_text,
                      reason=result.reason, success=result.success, error=result.error,
                      frame_stamps=[ns_to_stamp(f.stamp_ns) for f in reply.frames], image_topics=list(reply.topics),
                      latency_s=float(result.latency_s))
    msg.header.stamp = ns_to_stamp(max((f.stamp_ns for f in reply.frames), default=0))
    return msg
