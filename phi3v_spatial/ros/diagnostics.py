"""``/diagnostics`` of the node, built by a pure function from a snapshot of its state (easy to test, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass, field

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

CACHE_KEYS = ("entries", "bytes", "hits", "misses", "evictions")
DELIVERY_WARN_FRACTION = 0.95  # a camera delivering fewer of the frames it sends (last 10 s) is a WARN
# Fast DDS's default shared-memory segment: a publisher whose frames are larger loses many of them on one host.
FASTDDS_DEFAULT_SHM_SEGMENT = 512 * 1024


@dataclass
class Snapshot:
    """What the node reports: its state, the engine's ``describe()``, the queue, the counters, the cameras."""

    node: str                    # fully qualified node name (the hardware id)
    stamp: object                # builtin_interfaces/Time of the node's clock
    lifecycle_state: str
    configure_error: str = ""
    engine: dict | None = None   # SpatialEngine.describe(), None when no model is loaded
    model_path: str = ""         # what configure loads (shown before the model is loaded)
    queue_depth: int = 0
    queue_max_pending: int = 0
    busy: bool = False
    rejected: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    last_latency_s: float | None = None
    max_age_s: float = 0.0
    cameras: dict = field(default_factory=dict)       # FrameWindow.stats(now)
    camera_types: dict = field(default_factory=dict)  # topic -> message type subscribed
    delivery: dict = field(default_factory=dict)      # cameras.CameraStats.snapshot()
    depth_topics: dict = field(default_factory=dict)  # cameras that publish depth images -> encoding


def diagnostics(s: Snapshot) -> DiagnosticArray:
    """One ``<node>: inference`` status (model, device, adapters, caches, queue, counters) and one status per camera."""
    desc = s.engine or {}
    flag = lambda key: str(desc.get(key, "")).lower()  # noqa: E731
    values = {
        "lifecycle_state": s.lifecycle_state,
        "model_loaded": str(s.engine is not None).lower(),
        "model_path": desc.get("model_path", s.model_path),
        **{key: str(desc.get(key, "")) for key in ("device", "dtype", "attn_implementation", "quantization",
                                                    "num_crops")},
        **{key: flag(key) for key in ("skip_padding_crops", "batched_relations", "pinned_upload")},
        **{f"cache.{name}.{k}": str(v) for name, st in desc.get("cache", {}).items() for k, v in st.items()
           if k in CACHE_KEYS},
        "active_adapter": str(desc.get("active_adapter", "")),
        "adapters": ",".join(desc.get("adapters", []) or []),
        "queue_depth": str(s.queue_depth),
        "queue_max_pending": str(s.queue_max_pending),
        "busy": str(s.busy).lower(),
        "last_latency_s": "" if s.last_latency_s is None else f"{s.last_latency_s:.3f}",
        "requests_ok": str(s.requests_ok),
        "requests_failed": str(s.requests_failed),
        "requests_rejected": str(s.rejected),
        "configure_error": s.configure_error,
    }
    if s.configure_error:
        level, message = DiagnosticStatus.ERROR, s.configure_error
    elif s.engine is None:
        level, message = DiagnosticStatus.WARN, "model not loaded (node not configured)"
    elif s.lifecycle_state != "active":
        level, message = DiagnosticStatus.WARN, f"model loaded, node {s.lifecycle_state}"
    else:
        level, message = DiagnosticStatus.OK, "serving"
    statuses = [_status(level, f"{s.node}: inference", message, s.node, values)]
    for topic in sorted(set(s.cameras) | set(s.depth_topics)):
        level, message, kv = _camera(s, topic)
        statuses.append(_status(level, f"{s.node}: camera {topic}", message, s.node, kv))
    arr = DiagnosticArray(status=statuses)
    arr.header.stamp = s.stamp
    return arr


def _camera(s: Snapshot, topic: str) -> tuple[bytes, str, dict]:
    """One camera: what the window holds, what arrived, and what the camera sent (estimated from its stamps)."""
    st = s.cameras.get(topic) or {}
    d = s.delivery.get(topic) or {}
    age, latest = st.get("age_s"), st.get("latest_stamp_ns")
    delivered, pub_hz, rx_hz = d.get("delivered"), d.get("publisher_hz"), d.get("received_hz", 0.0)
    kv = {"frames": str(st.get("frames", 0)), "received": str(d.get("received", st.get("received", 0))),
          "received_hz": f"{rx_hz:.2f}", "publisher_hz": "" if pub_hz is None else f"{pub_hz:.2f}",
          "missed": str(d.get("missed", 0)), "delivered_pct": "" if delivered is None else f"{100 * delivered:.1f}",
          "dropped": str(st.get("dropped", 0)), "resets": str(st.get("resets", 0)), "frame_bytes": str(d.get("frame_bytes", 0)),
          "age_s": "" if age is None else f"{age:.3f}", "latest_stamp_ns": "" if latest is None else str(latest),
          "type": s.camera_types.get(topic, "")}
    if topic in s.depth_topics:
        kv["ignored"] = f"depth images ({s.depth_topics[topic]})"
        return (DiagnosticStatus.WARN, f"ignored: publishes depth images ({s.depth_topics[topic]}); the model needs "
                f"colour images", kv)
    if latest is None:
        return DiagnosticStatus.WARN, "no frames received", kv
    if s.max_age_s > 0 and age is not None and age > s.max_age_s:
        return DiagnosticStatus.WARN, f"stale: newest frame {age:.2f} s old", kv
    if delivered is not None and delivered < DELIVERY_WARN_FRACTION:
        message = (f"losing frames: {100 * delivered:.0f}% of the camera's frames arrive ({rx_hz:.1f} of "
                   f"~{pub_hz:.1f} Hz over the last 10 s; {d.get('missed', 0)} missed in all)")
        if d.get("frame_bytes", 0) > FASTDDS_DEFAULT_SHM_SEGMENT:
            message += (f"; frames of {d['frame_bytes'] // 1024} KiB exceed Fast DDS's default 512 KiB shared-memory "
                        f"segment: give the camera's process a larger one (README, Cameras) or publish compressed")
        return DiagnosticStatus.WARN, message, kv
    return DiagnosticStatus.OK, f"receiving {rx_hz:.1f} Hz", kv


def _status(level, name: str, message: str, hardware_id: str, values: dict) -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])
