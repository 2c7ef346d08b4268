"""Every parameter of ``spatial_node``, declared once, and the settings built from them (no ROS in here).

``PARAMETERS`` is the single table (name, default, type, range, read-only, description). The node declares
its ROS parameters from it (``ros/parameters.py``), bag replay and ``phi3v-spatial ask`` build the same
settings from it, and tests check ``config/spatial_node.yaml`` and the README's parameter table against it.
So an answer computed offline uses exactly the settings the live node would have used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import paths
from .engine.images import DEFAULT_MAX_PIXELS

NODE_NAME = "spatial_node"
# Per-topic suffixes in ``image_topics`` that force the message type.
COMPRESSED_SUFFIX = ":compressed"
RAW_SUFFIX = ":raw"


@dataclass(frozen=True)
class Param:
    """One node parameter. ``default`` may be a function (a default that depends on the installed files).

    ``offline``: replay and the CLI read it too (it shapes the answers); ``doc_default``: the README's default
    cell when the default is computed.
    """

    name: str
    default: Any
    type: type  # str, int, float, bool, or list (of strings)
    description: str
    range: tuple[float, float] | None = None
    read_only: bool = False
    offline: bool = False
    doc_default: str = ""

    def default_value(self):
        return self.default() if callable(self.default) else self.default


def default_adapters() -> list[str]:
    """The embedded spatial adapter as a 'name=path' entry, when its folder exists."""
    d = paths.default_adapter_dir()
    return [f"{paths.EMBEDDED_ADAPTER_NAME}={d}"] if os.path.isdir(d) else []


def _default_active_adapter() -> str:
    return paths.EMBEDDED_ADAPTER_NAME if default_adapters() else ""


MAX_PENDING_LIMIT = 64

PARAMETERS: tuple[Param, ...] = (
    Param("model_path", "", str, "checkpoint folder (official Phi-3-vision layout) or hub id; empty = the embedded "
          "model", read_only=True, offline=True, doc_default='`""` (embedded model)'),
    Param("adapters", default_adapters, list, "LoRA adapters loaded on configure, as `name=path` strings (a bare "
          "path is named after its folder)", read_only=True, offline=True,
          doc_default="embedded `spatial=...` if present"),
    Param("active_adapter", _default_active_adapter, str, "adapter active after configure (`\"\"`/`none` = base "
          "model); settable at runtime", offline=True, doc_default="`spatial` if present"),
    Param("device", "auto", str, "auto / cpu / cuda / cuda:N / mps", read_only=True, offline=True),
    Param("dtype", "auto", str, "auto / float32 / float16 / bfloat16", read_only=True, offline=True),
    Param("attn_implementation", "auto", str, "auto / eager / sdpa / flash_attention_2", read_only=True, offline=True),
    Param("num_crops", 0, int, "HD crops per image (upper bound); 0 = the checkpoint's", (0, 64), read_only=True,
          offline=True),
    Param("quantization", "none", str, "none / 8bit / 4bit decoder weights via bitsandbytes (CUDA only, optional)",
          read_only=True, offline=True),
    Param("cache.vision_mb", 256.0, float, "image-embedding cache per frame (topic + stamp + content digest), MB; 0 = off", (0, 1e6),
          offline=True),
    Param("cache.prefix_mb", 1024.0, float, "KV cache of image prompt prefixes per window, MB; 0 = off", (0, 1e6),
          offline=True),
    Param("relation_batch_size", 8, int, "`~/query_relations` candidates per batched forward pass", (1, 256),
          read_only=True, offline=True),
    Param("image_topics", ["/camera/image_raw"], list, "camera topics (`topic:compressed` / `topic:raw` force the "
          "type, names ending in /compressed are compressed, else the graph decides); re-subscribes when set"),
    Param("camera_qos_depth", 30, int, "frames each camera subscription (sensor-data QoS, best effort) holds while "
          "the node is busy; too few lose frames under load", (1, 1000), read_only=True),
    Param("window.num_frames", 1, int, "frames per camera when a request says 0", (1, 16), offline=True),
    Param("window.min_interval_s", 0.5, float, "keyframe spacing in stamp time", (0, 60), offline=True),
    Param("window.max_age_s", 2.0, float, "stale-camera limit on the node clock, 0 = none", (0, 86400), offline=True),
    Param("window.capacity", 8, int, "keyframes kept per camera", (1, 256), offline=True),
    Param("max_image_pixels", DEFAULT_MAX_PIXELS, int, "largest frame accepted (width x height)", (1, 1 << 30),
          offline=True),
    Param("max_question_tokens", 1024, int, "longest `~/ask` question, `~/plan` instruction or relation candidate, "
          "in tokens; longer ones are refused", (1, 131072), offline=True),
    Param("max_images", 8, int, "most images per request: carried by it, or frames its window selection gives",
          (1, 256), offline=True),
    Param("max_candidates", 256, int, "most candidates per `~/query_relations` request", (1, 100000), offline=True),
    Param("queue.max_pending", 4, int, "requests waiting behind the running one before rejection",
          (0, MAX_PENDING_LIMIT)),
    Param("request_timeout_s", 60.0, float, "deadline per request, queue time included", (0.1, 3600)),
    Param("generation.max_new_tokens", 128, int, "`~/ask` token limit when the request says 0", (1, 4096),
          offline=True),
    Param("plan.max_new_tokens", 256, int, "`~/plan` token limit when the goal says 0", (1, 8192), offline=True),
    Param("diagnostics_period_s", 1.0, float, "`/diagnostics` period", (0.05, 3600)),
    Param("autostart", True, bool, "configure + activate at start", read_only=True),
)
PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def node_defaults() -> dict:
    """Every parameter of ``spatial_node`` with its default value."""
    return {p.name: p.default_value() for p in PARAMETERS}


def offline_defaults() -> dict:
    """The defaults of the parameters replay and the CLI use (``image_topics`` too: replay reads it from a file)."""
    return {p.name: p.default_value() for p in PARAMETERS if p.offline or p.name == "image_topics"}


def check_value(name: str, value) -> Any:
    """``value`` converted to the parameter's type and checked against its range; ValueError says why not."""
    p = PARAMETERS_BY_NAME[name]
    if p.type is list:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list of strings, got {value!r}")
        return [str(v) for v in value]
    if p.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if p.type is str:
        return "" if value is None else str(value)
    try:
        converted = p.type(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    if p.range is not None and not p.range[0] <= converted <= p.range[1]:
        raise ValueError(f"{name} = {converted} is outside {_num(p.range[0])}..{_num(p.range[1])}")
    return converted


def split_topic_spec(spec: str) -> tuple[str, str | None]:
    """An ``image_topics`` entry -> (topic name, "compressed" | "raw" | None when the type is not forced)."""
    spec = str(spec).strip()
    for suffix, kind in ((COMPRESSED_SUFFIX, "compressed"), (RAW_SUFFIX, "raw")):
        if spec.endswith(suffix):
            return spec[: -len(suffix)].strip(), kind
    return spec, None


def resolve_topic(spec: str, node_name: str = NODE_NAME, namespace: str = "/") -> str:
    """A topic as the node resolves an ``image_topics`` entry: ':compressed'/':raw' dropped, made absolute."""
    spec, _ = split_topic_spec(spec)
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if spec.startswith("~"):
        spec = f"{ns}/{node_name}" + spec[1:]
    elif not spec.startswith("/"):
        spec = f"{ns}/{spec}"
    return "/" + "/".join(x for x in spec.split("/") if x)


def parse_adapters(value) -> dict[str, str]:
    """The ``adapters`` parameter (and ``--adapter DIR`` lists): ``name=path`` entries, or bare paths named after
    their folder (made unique: two folders may share a basename). Raises ValueError on ``=path`` or ``name=``."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        value = [value]
    out: dict[str, str] = {}
    for i, item in enumerate(value):
        item = str(item).strip()
        if not item:
            continue
        if "=" in item:
            name, path = (x.strip() for x in item.split("=", 1))
            if not name or not path:
                raise ValueError(f"adapters entry {item!r} is not 'name=path'")
        else:
            path = item
            base = os.path.basename(os.path.normpath(path)) or f"adapter{i}"
            name, n = base, 2
            while name in out:
                name, n = f"{base}-{n}", n + 1
        out[name] = os.path.expanduser(path)
    return out


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


def cli_overrides(model: str = "", adapter_dirs=(), no_adapter: bool = False) -> dict:
    """Parameter values for the commands' ``--model``, ``--adapter DIR`` (repeatable, the last one active) and
    ``--no-adapter``; what they leave out keeps the node's default (the embedded model and its adapter)."""
    out: dict = {}
    if model:
        out["model_path"] = model
    if adapter_dirs:
        named = parse_adapters(list(adapter_dirs))
        out["adapters"], out["active_adapter"] = [f"{k}={v}" for k, v in named.items()], list(named)[-1]
    if no_adapter:
        out["adapters"], out["active_adapter"] = [], ""
    return out


def engine_options(params: dict):
    """The engine's reuse options from node parameters (cache sizes; the other optimisations are always on)."""
    from .engine.engine import EngineOptions

    return EngineOptions(vision_cache_mb=float(params["cache.vision_mb"]), prefix_cache_mb=float(params["cache.prefix_mb"]),
                         relation_batch_size=int(params["relation_batch_size"]))


def request_limits(params: dict) -> dict:
    """The request layer's per-request limits (``ServingSettings`` fields) from node parameters (defaults filled)."""
    p = {**node_defaults(), **params}
    return {name: int(p[name]) for name in ("max_question_tokens", "max_images", "max_candidates")}


def serving_settings(params: dict, *, deadline: bool = True):
    """The request layer's defaults and limits from node parameters (``deadline=False``: offline, no deadline)."""
    from .engine.requests import ServingSettings

    return ServingSettings(max_new_tokens=int(params["generation.max_new_tokens"]),
                           plan_max_new_tokens=int(params["plan.max_new_tokens"]),
                           request_timeout_s=float(params["request_timeout_s"]) if deadline else 0.0,
                           max_image_pixels=int(params["max_image_pixels"]), **request_limits(params))


def window_settings(params: dict) -> dict:
    """``FrameWindow`` keyword arguments from the ``window.*`` parameters."""
    return {k.split(".", 1)[1]: params[k] for k in ("window.num_frames", "window.min_interval_s", "window.max_age_s",
                                                       "window.capacity")}


@dataclass
class ModelSettings:
    """What configure loads: the model, its adapters and how to run it (node, replay and CLI alike)."""

    model_path: str
    adapters: dict[str, str]
    active_adapter: str
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    num_crops: int = 0
    quantization: str = "none"
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    options: Any = None  # EngineOptions

    @classmethod
    def from_params(cls, params: dict, *, resolve: bool = True) -> "ModelSettings":
        """From parameter values (defaults filled in). ``resolve``: apply the embedded-model defaults
        (:func:`resolve_model_and_adapters`) and check that the active adapter is one of the adapters."""
        p = {**offline_defaults(), **params}
        adapters = parse_adapters(p["adapters"])
        model_path, active = str(p["model_path"] or ""), str(p["active_adapter"] or "").strip()
        if resolve:
            model_path, adapters, active = resolve_model_and_adapters(model_path, adapters, active)
        s = cls(model_path, adapters, active, str(p["device"] or "auto"), str(p["dtype"] or "auto"),
                str(p["attn_implementation"] or "auto"), int(p["num_crops"] or 0), str(p["quantization"] or "none"),
                int(p["max_image_pixels"]), engine_options(p))
        if resolve:
            s.check()
        return s

    def check(self) -> None:
        """The active adapter must be one of the adapters to load (ValueError otherwise)."""
        from .engine.engine import base_model_requested

        if not base_model_requested(self.active_adapter) and self.active_adapter not in self.adapters:
            raise ValueError(f"active_adapter {self.active_adapter!r} is not among the adapters "
                             f"({list(self.adapters) or 'none'})")

    def load(self):
        """The SpatialEngine these settings describe (``EngineError`` when it cannot be loaded)."""
        from .engine.engine import SpatialEngine

        return SpatialEngine.from_pretrained(
            self.model_path, adapters=self.adapters, active_adapter=self.active_adapter or None, device=self.device,
            dtype=self.dtype, attn_implementation=self.attn_implementation, num_crops=self.num_crops or None,
            max_image_pixels=self.max_image_pixels, options=self.options, quantization=self.quantization)


def markdown_rows() -> list[str]:
    """The README's parameter table rows, rendered from ``PARAMETERS`` (a test keeps the README equal to them)."""
    rows = []
    for p in PARAMETERS:
        if p.doc_default:
            default = p.doc_default
        else:
            v = p.default_value()
            text = ("true" if v else "false") if isinstance(v, bool) else (
                f"[{', '.join(v)}]" if isinstance(v, list) else (f'"{v}"' if v == "" else str(v)))
            default = f"`{text}`"
        runtime = "read-only" if p.read_only else "yes"
        rng = f" ({_num(p.range[0])}..{_num(p.range[1])})" if p.range else ""
        rows.append(f"| `{p.name}` | {default} | {runtime} | {p.description}{rng} |")
    return rows


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
