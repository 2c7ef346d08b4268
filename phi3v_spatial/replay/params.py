"""The node's parameters that shape answers, read from its ROS 2 parameter YAML without ROS.

Replay must answer exactly as the live node would, so it takes the same parameter file
(``config/spatial_node.yaml`` or the robot's own) and the same defaults as ``spatial_node``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..engine.images import DEFAULT_MAX_PIXELS
from ..settings import (
    NODE_NAME, ModelSettings, check_value, engine_options, offline_defaults, parse_adapters, request_limits,
    resolve_topic,
)


def node_defaults() -> dict:
    """The node's own defaults (the table in ``phi3v_spatial.settings``) for the parameters replay uses.

    One deliberate difference: without an ``image_topics`` entry in the file, replay plays every image topic
    of the bag instead of the node's ``/camera/image_raw``.
    """
    return {**offline_defaults(), "image_topics": []}


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


@dataclass
class ReplaySettings:
    """Everything that decides which frames are used and what the model answers."""

    image_topics: list[str] = field(default_factory=list)
    num_frames: int = 1
    min_interval_s: float = 0.0
    max_age_s: float = 2.0
    capacity: int = 8
    max_image_pixels: int = DEFAULT_MAX_PIXELS
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
    limits: dict = field(default_factory=dict)  # the request limits (settings.request_limits), as the node's

    @classmethod
    def from_params(cls, params: dict, source: str = "defaults") -> "ReplaySettings":
        """From parameter values (a params file's, or none), checked against the table as the node checks them."""
        p = {**node_defaults(), **params}
        try:
            v = {name: check_value(name, p[name]) for name in node_defaults()}
            adapters = parse_adapters(v["adapters"])
        except ValueError as e:
            raise ParamsError(f"parameters from {source}: {e}") from None
        return cls(
            image_topics=[resolve_topic(t) for t in v["image_topics"] if t.strip()],
            num_frames=v["window.num_frames"], min_interval_s=v["window.min_interval_s"],
            max_age_s=v["window.max_age_s"], capacity=v["window.capacity"], max_image_pixels=v["max_image_pixels"],
            max_new_tokens=v["generation.max_new_tokens"], plan_max_new_tokens=v["plan.max_new_tokens"],
            model_path=v["model_path"], adapters=adapters, active_adapter=v["active_adapter"].strip(),
            device=v["device"] or "auto", dtype=v["dtype"] or "auto",
            attn_implementation=v["attn_implementation"] or "auto", num_crops=v["num_crops"],
            quantization=v["quantization"] or "none", engine_options=engine_options(v), limits=request_limits(v))

    def model(self) -> ModelSettings:
        """What the node's configure would load from the same parameters."""
        return ModelSettings(self.model_path, self.adapters, self.active_adapter, self.device, self.dtype,
                             self.attn_implementation, self.num_crops, self.quantization, self.max_image_pixels,
                             self.engine_options)

    def check(self) -> None:
        """The node's configure-time check: the active adapter must be one of the loaded ones."""
        try:
            self.model().check()
        except ValueError as e:
            raise ParamsError(str(e)) from None

    def serving(self):
        """The request layer's settings; offline there is no deadline (every question is answered)."""
        from ..engine.requests import ServingSettings

        return ServingSettings(max_new_tokens=self.max_new_tokens, plan_max_new_tokens=self.plan_max_new_tokens,
                               request_timeout_s=0.0, max_image_pixels=self.max_image_pixels, **self.limits)

    def window_kwargs(self) -> dict:
        return {"num_frames": self.num_frames, "min_interval_s": self.min_interval_s,
                "max_age_s": self.max_age_s, "capacity": self.capacity}
