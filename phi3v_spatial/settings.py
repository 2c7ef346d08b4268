"""The node's parameter defaults, in one ROS-free place.

``spatial_node`` declares its parameters with these values and bag replay reads the same ones, so an
answer computed offline uses exactly the settings the live node would have used.
"""
from __future__ import annotations

import os

from . import paths
from .engine.images import DEFAULT_MAX_PIXELS

NODE_NAME = "spatial_node"
# Per-topic suffixes in ``image_topics`` that force the message type.
COMPRESSED_SUFFIX = ":compressed"
RAW_SUFFIX = ":raw"


def split_topic_spec(spec: str) -> tuple[str, str | None]:
    """An ``image_topics`` entry -> (topic name, "compressed" | "raw" | None when the type is not forced)."""
    spec = str(spec).strip()
    for suffix, kind in ((COMPRESSED_SUFFIX, "compressed"), (RAW_SUFFIX, "raw")):
        if spec.endswith(suffix):
            return spec[: -len(suffix)].strip(), kind
    return spec, None


def default_adapters() -> list[str]:
    """The embedded spatial adapter as a 'name=path' entry, when its folder exists."""
    d = paths.default_adapter_dir()
    return [f"{paths.EMBEDDED_ADAPTER_NAME}={d}"] if os.path.isdir(d) else []


def node_defaults() -> dict:
    """Every parameter of ``spatial_node`` with its default value."""
    adapters = default_adapters()
    return {
        "model_path": "",
        "adapters": adapters,
        "active_adapter": paths.EMBEDDED_ADAPTER_NAME if adapters else "",
        "device": "auto",
        "dtype": "auto",
        "attn_implementation": "auto",
        "num_crops": 0,
        "quantization": "none",
        "cache.vision_mb": 256.0,
        "cache.prefix_mb": 1024.0,
        "relation_batch_size": 8,
        "image_topics": ["/camera/image_raw"],
        "window.num_frames": 1,
        "window.min_interval_s": 0.5,
        "window.max_age_s": 2.0,
        "window.capacity": 8,
        "queue.max_pending": 4,
        "request_timeout_s": 60.0,
        "generation.max_new_tokens": 128,
        "plan.max_new_tokens": 256,
        "max_image_pixels": DEFAULT_MAX_PIXELS,
        "diagnostics_period_s": 1.0,
        "autostart": True,
    }


def engine_options(params: dict):
    """The engine's reuse options from node parameters (cache sizes; the other optimisations are always on)."""
    from .engine.engine import EngineOptions

    return EngineOptions(vision_cache_mb=float(params["cache.vision_mb"]), prefix_cache_mb=float(params["cache.prefix_mb"]),
                         relation_batch_size=int(params["relation_batch_size"]))


def resolve_model_and_adapters(model_path: str, adapters: dict[str, str], active_adapter: str
                               ) -> tuple[str, dict[str, str], str]:
    """The model folder/hub id, adapters and active adapter actually to load.

    ``model_path`` "" means the embedded model. The embedded adapter is only a *default* of the embedded
    model: when another model is configured and the adapters were left at their default, no adapter is
    loaded (the embedded one would not fit the other model's shapes).
    """
    embedded_dir = paths.default_model_dir()
    is_embedded = not model_path or os.path.abspath(os.path.expanduser(model_path)) == os.path.abspath(embedded_dir)
    default = {paths.EMBEDDED_ADAPTER_NAME: paths.default_adapter_dir()} if default_adapters() else {}
    if not is_embedded and default and adapters == default:
        adapters = {}
        if active_adapter == paths.EMBEDDED_ADAPTER_NAME:
            active_adapter = ""
    return (model_path or embedded_dir), adapters, active_adapter
