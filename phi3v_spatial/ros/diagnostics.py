"""``/diagnostics`` of the node, built by a pure function from a snapshot of its state (easy to test, no I/O)."""
from __future__ import annotations

from dataclasses import dataclass, field

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

CACHE_KEYS = ("entries", "bytes", "hits", "misses", "evictions")


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
    for topic, st in s.cameras.items():
        age = st["age_s"]
        if st["latest_stamp_ns"] is None:
            level, message = DiagnosticStatus.WARN, "no frames received"
        elif s.max_age_s > 0 and age is not None and age > s.max_age_s:
            level, message = DiagnosticStatus.WARN, f"stale: newest frame {age:.2f} s old"
        else:
            level, message = DiagnosticStatus.OK, "receiving"
        kv = {"frames": str(st["frames"]), "received": str(st["received"]), "dropped": str(st["dropped"]),
              "age_s": "" if age is None else f"{age:.3f}",
              "latest_stamp_ns": "" if st["latest_stamp_ns"] is None else str(st["latest_stamp_ns"]),
              "type": s.camera_types.get(topic, "")}
        statuses.append(_status(level, f"{s.node}: camera {topic}", message, s.node, kv))
    arr = DiagnosticArray(status=statuses)
    arr.header.stamp = s.stamp
    return arr


def _status(level, name: str, message: str, hardware_id: str, values: dict) -> DiagnosticStatus:
    return DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])
