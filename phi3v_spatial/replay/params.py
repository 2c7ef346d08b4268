"""The node's parameters that shape answers, read from its ROS 2 parameter YAML without ROS.

Replay must answer exactly as the live node would, so it takes the same parameter file
(``config/spatial_node.yaml`` or the robot's own) and the same defaults as ``spatial_node``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import settings
from ..settings import NODE_NAME, engine_options, split_topic_spec


def node_defaults() -> dict:
    """The node's own defaults (``phi3v_spatial.settings``) for the parameters replay uses.

    One deliberate difference: without an ``image_topics`` entry in the file, replay plays every image topic
    of the bag instead of the node's ``/camera/image_raw``.
    """
    defaults = settings.node_defaults()
    keep = ("window.num_frames", "window.min_interval_s", "window.max_age_s", "window.capacity", "max_image_pixels",
            "generation.max_new_tokens", "plan.max_new_tokens", "model_path", "adapters", "active_adapter", "device",
            "dtype", "attn_implementation", "num_crops", "quantization", "cache.vision_mb", "cache.prefix_mb",
            "relation_batch_size")
    return {"image_topics": [], **{k: defaults[k] for k in keep}}


def resolve_topic(spec: str, node_name: str = NODE_NAME, namespace: str = "/") -> str:
    """A topic as the node resolves an ``image_topics`` entry: ':compressed'/':raw' dropped, made absolute."""
    spec, _ = split_topic_spec(spec)
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if spec.startswith("~"):
        spec = f"{ns}/{node_name}" + spec[1:]
    elif not spec.startswith("/"):
        spec = f"{ns}/{spec}"
    return "/" + "/".join(x for x in spec.split("/") if x)


class ParamsError(Exception):
    """The parameter file cannot be used; the message names the file and the parameter."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_node_params(path: str | os.PathLike | None, node_name: str = NODE_NAME) -> dict:
    """Flat ``{'window.num_frames': 2, ...}`` from a ROS 2 params file: ``/**:`` first, then the node's own section."""
    if not path:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ParamsError(f"cannot read parameter file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"parameter file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"parameter file {str(path)!r} must map node names to 'ros__parameters'")
    wildcard, own = {}, {}
    for key, section in data.items():
        if not isinstance(section, dict) or "ros__parameters" not in section:
            continue
        params = section["ros__parameters"] or {}
        if not isinstance(params, dict):
            raise ParamsError(f"parameter file {str(path)!r}: {key}.ros__parameters must be a mapping")
        name = str(key).strip("/")
        if name in ("**", "*"):
            wildcard.update(_flatten(params))
        elif name.split("/")[-1] == node_name:
            own.update(_flatten(params))
    if not wildcard and not own:
        raise ParamsError(f"parameter file {str(path)!r} has no '{node_name}: ros__parameters:' or '/**: ros__parameters:' section")
    return {**wildcard, **own}


def parse_adapters(value) -> dict[str, str]:
    """The ``adapters`` parameter: a list of ``name=path`` (replay also takes bare paths, named after their folder)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        value = [value]
    out: dict[str, str] = {}
    for item in value:
        item = str(item).strip()
        if not item:
            continue
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            path = item
            name = os.path.basename(os.path.normpath(path))
        out[name.strip()] = os.path.expanduser(path.strip())
    return out


@dataclass
class ReplaySettings:
    """Everything that decides which frames are used and what the model answers."""

    image_topics: list[str] = field(default_factory=list)
    num_frames: int = 1
    min_interval_s: float = 0.0
    max_age_s: float = 2.0
    capacity: int = 8
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 128
    plan_max_new_tokens: int = 256
    model_path: str = ""
    adapters: dict[str, str] = field(default_factory=dict)
    active_adapter: str = ""
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    num_crops: int = 0
    quantization: str = "none"
    engine_options: object = None  # EngineOptions from the same parameters as the node (settings.engine_options)

    @classmethod
    def from_params(cls, params: dict, source: str = "defaults") -> "ReplaySettings":
        p = {**node_defaults(), **params}
        try:
            settings = cls(
                image_topics=[resolve_topic(t) for t in (p["image_topics"] or []) if str(t).strip()],
                num_frames=int(p["window.num_frames"]),
                min_interval_s=float(p["window.min_interval_s"]),
                max_age_s=float(p["window.max_age_s"]),
                capacity=int(p["window.capacity"]),
                max_image_pixels=int(p["max_image_pixels"]),
                max_new_tokens=int(p["generation.max_new_tokens"]),
                plan_max_new_tokens=int(p["plan.max_new_tokens"]),
                model_path=str(p["model_path"] or ""),
                adapters=parse_adapters(p["adapters"]),
                active_adapter=str(p["active_adapter"] or ""),
                device=str(p["device"] or "auto"),
                dtype=str(p["dtype"] or "auto"),
                attn_implementation=str(p["attn_implementation"] or "auto"),
                num_crops=int(p["num_crops"] or 0),
                quantization=str(p["quantization"] or "none"),
                engine_options=engine_options(p),
            )
        except (TypeError, ValueError) as e:
            raise ParamsError(f"parameters from {source}: {e}") from None
        return settings

    def check(self) -> None:
        """The node's configure-time check: the active adapter must be one of the loaded ones."""
        active = self.active_adapter.strip()
        if active and active.lower() != "none" and active not in self.adapters:
            raise ParamsError(f"active_adapter {active!r} is not among the adapters ({list(self.adapters) or 'none'})")

    def window_kwargs(self) -> dict:
        return {"num_frames": self.num_frames, "min_interval_s": self.min_interval_s,
                "max_age_s": self.max_age_s, "capacity": self.capacity}
