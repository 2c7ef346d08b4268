"""``spatial_node``: a lifecycle node answering spatial questions about its camera window.

Threading (why it looks like this): the model runs only on the :class:`InferenceWorker` thread. Service
and action callbacks live in a reentrant callback group and merely wait on worker jobs, cameras have
their own mutually exclusive group (a callback only stores a reference to the message buffer), and the
lifecycle/parameter services stay in the default group, so all of them keep answering while the model
generates. A ``MultiThreadedExecutor`` with enough threads for every waiting request runs it all.

Lifecycle: configure loads the engine (a failure is logged and the node stays unconfigured),
activate subscribes the cameras and starts serving, deactivate stops the cameras and answers
"node is not active", cleanup stops the worker and frees the engine.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.expand_topic_name import expand_topic_name
from rclpy.validate_full_topic_name import validate_full_topic_name
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from phi3v_spatial import paths
from phi3v_spatial.settings import (NODE_NAME, engine_options, node_defaults, resolve_model_and_adapters,
                                    split_topic_spec)
from phi3v_spatial.engine.images import ImageDecodeError, decode_raw
from phi3v_spatial.engine.window import Frame, FrameWindow, WindowError
from phi3v_spatial.engine.worker import InferenceWorker, JobCancelled, JobError, JobRejected, JobTimeout
from phi3v_spatial_interfaces.action import Plan
from phi3v_spatial_interfaces.msg import PlanStamped, RelationsStamped
from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations, SetAdapter

from . import params_file
from .messages import (
    compressed_payload, ns_to_stamp, plan_step_to_msg, raw_payload, relation_to_msg, stamp_to_ns,
)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
MAX_PENDING_LIMIT = 64  # upper bound of queue.max_pending; the executor is sized for it
FEEDBACK_MIN_PERIOD_S = 0.02  # stream at most ~50 partial-text feedbacks per second


class RequestError(Exception):
    """A request the node refuses; the message goes back to the caller as ``error``."""


def _float_desc(description, lo, hi, read_only=False):
    return ParameterDescriptor(description=description, read_only=read_only, type=ParameterType.PARAMETER_DOUBLE,
                               floating_point_range=[FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)])


def _int_desc(description, lo, hi, read_only=False):
    return ParameterDescriptor(description=description, read_only=read_only, type=ParameterType.PARAMETER_INTEGER,
                               integer_range=[IntegerRange(from_value=int(lo), to_value=int(hi), step=1)])


def _desc(description, ptype, read_only=False, constraints=""):
    return ParameterDescriptor(description=description, type=ptype, read_only=read_only,
                               additional_constraints=constraints)


class SpatialNode(LifecycleNode):
    """Serves ~/ask, ~/query_relations, ~/set_adapter and the ~/plan action from a SpatialEngine."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._declare_parameters()
        self._state = "unconfigured"
        self._engine = None
        self._worker: InferenceWorker | None = None
        self._configure_error = ""
        self._lock = threading.RLock()
        self._subs: dict[str, tuple[object, str]] = {}  # window key -> (subscription, message type)
        self._stamp_warned: set[str] = set()
        self._adapter_param_sync = threading.local()
        self._stats = {"ok": 0, "failed": 0}
        self._last_latency_s: float | None = None
        p = self._params()
        self._window = FrameWindow(num_frames=p["window.num_frames"], min_interval_s=p["window.min_interval_s"],
                                   max_age_s=p["window.max_age_s"], capacity=p["window.capacity"])

        self._requests_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        # Services and the action exist in every state, so a caller always gets an answer saying why not.
        self.create_service(AskSpatial, "~/ask", self._on_ask, callback_group=self._requests_group)
        self.create_service(QueryRelations, "~/query_relations", self._on_query_relations,
                            callback_group=self._requests_group)
        self.create_service(SetAdapter, "~/set_adapter", self._on_set_adapter, callback_group=self._requests_group)
        self._plan_server = ActionServer(
            self, Plan, "~/plan", execute_callback=self._execute_plan, callback_group=self._requests_group,
            goal_callback=lambda goal: GoalResponse.ACCEPT, cancel_callback=self._on_plan_cancel)
        self._plan_jobs: dict[bytes, object] = {}  # goal id -> worker job, so a cancel reaches the job at once
        # Lifecycle publishers: they only publish while the node is active.
        self._relations_pub = self.create_lifecycle_publisher(RelationsStamped, "~/relations", 10)
        self._plans_pub = self.create_lifecycle_publisher(PlanStamped, "~/plans", 10)
        # Diagnostics report in every state (including "model not loaded" and configure failures).
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # On a steady clock: under use_sim_time a ROS-time timer stops while /clock is paused or held, and the
        # node would fall silent exactly when someone looks at it (the header stamp is still the node's clock).
        self._diag_clock = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_timer = self.create_timer(p["diagnostics_period_s"], self._publish_diagnostics,
                                             callback_group=self._timer_group, clock=self._diag_clock)

        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        if p["autostart"]:
            self._autostart_timer = self.create_timer(0.0, self._autostart, callback_group=self._timer_group)

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        T = ParameterType
        self._param_names: list[str] = []
        defaults = node_defaults()

        def declare(name, descriptor):
            self._param_names.append(name)
            value = defaults[name]
            if isinstance(value, list) and not value:  # an empty default cannot carry its type
                value = Parameter.Type.STRING_ARRAY
            self.declare_parameter(name, value, descriptor)

        declare("model_path", _desc(
            "Checkpoint folder (official Phi-3-vision layout) or hub id; empty = the embedded model", T.PARAMETER_STRING,
            read_only=True))
        declare("adapters", _desc(
            "LoRA adapters to load at configure, as 'name=path' strings", T.PARAMETER_STRING_ARRAY, read_only=True,
            constraints="each entry name=path; path is a PEFT adapter folder"))
        declare("active_adapter", _desc(
            "Adapter active after configure ('' or 'none' = base model); settable at runtime", T.PARAMETER_STRING))
        declare("device", _desc(
            "auto | cpu | cuda | cuda:N | mps", T.PARAMETER_STRING, read_only=True))
        declare("dtype", _desc(
            "auto | float32 | float16 | bfloat16", T.PARAMETER_STRING, read_only=True))
        declare("attn_implementation", _desc(
            "auto | eager | sdpa | flash_attention_2", T.PARAMETER_STRING, read_only=True))
        declare("num_crops", _int_desc(
            "HD transform crops per image; 0 = the checkpoint's preprocessor_config.json", 0, 64, read_only=True))
        declare("quantization", _desc(
            "none | 8bit | 4bit: decoder weights through bitsandbytes (CUDA only, optional package)", T.PARAMETER_STRING,
            read_only=True))
        declare("cache.vision_mb", _float_desc(
            "Image-embedding cache per frame (topic + stamp), MB; 0 disables; settable at runtime", 0.0, 1e6))
        declare("cache.prefix_mb", _float_desc(
            "Key/value cache of image prompt prefixes per window, MB; 0 disables; settable at runtime", 0.0, 1e6))
        declare("relation_batch_size", _int_desc(
            "QueryRelations candidates scored per batched forward pass (each holds a copy of the window's KV cache)",
            1, 256, read_only=True))
        declare("image_topics", _desc(
            "Camera topics; 'topic:compressed' forces CompressedImage, names ending in /compressed are compressed, "
            "otherwise the type is taken from the graph (Image if unknown)", T.PARAMETER_STRING_ARRAY))
        declare("window.num_frames", _int_desc(
            "Frames per camera given to the model when a request says 0", 1, 16))
        declare("window.min_interval_s", _float_desc(
            "Keyframe spacing in stamp time; closer frames only replace the latest slot", 0.0, 60.0))
        declare("window.max_age_s", _float_desc(
            "A camera whose newest frame is older than this (node clock, sim time aware) is stale; 0 = no limit",
            0.0, 86400.0))
        declare("window.capacity", _int_desc("Keyframes kept per camera", 1, 256))
        declare("queue.max_pending", _int_desc(
            "Requests allowed to wait behind the running one; more are rejected at once", 0, MAX_PENDING_LIMIT))
        declare("request_timeout_s", _float_desc(
            "Deadline per request, queue time included", 0.1, 3600.0))
        declare("generation.max_new_tokens", _int_desc(
            "Token limit for ~/ask when the request says 0", 1, 4096))
        declare("plan.max_new_tokens", _int_desc(
            "Token limit for ~/plan when the goal says 0", 1, 8192))
        declare("max_image_pixels", _int_desc(
            "Largest image (width x height) accepted; bigger ones are rejected with a reason", 1, 1 << 30))
        declare("diagnostics_period_s", _float_desc(
            "Period of the /diagnostics status", 0.05, 3600.0))
        declare("autostart", _desc(
            "Configure and activate right after start", T.PARAMETER_BOOL, read_only=True))

    def _params(self) -> dict:
        return {name: self._p(name) for name in self._param_names}

    def _p(self, name: str):
        """A parameter's value; an array left unset (YAML ``[]`` carries no type) reads as empty."""
        try:
            value = self.get_parameter(name).value
        except ParameterUninitializedException:
            return []
        return [] if value is None else value

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Reject values that would break serving, with a reason the caller sees."""
        for prm in params:
            name, value = prm.name, prm.value
            if name == "image_topics":
                for t in value or []:
                    base, _ = split_topic_spec(t)
                    try:
                        validate_full_topic_name(expand_topic_name(base.strip(), self.get_name(), self.get_namespace()))
                    except Exception as exc:  # noqa: BLE001 - rclpy raises several kinds for bad names
                        return SetParametersResult(successful=False,
                                                   reason=f"image_topics: invalid topic name {t!r}: {exc}")
            elif name == "active_adapter":
                engine = self._engine
                if engine is not None and value.strip().lower() not in ("", "none") \
                        and value not in engine.available_adapters:
                    return SetParametersResult(successful=False, reason=(
                        f"unknown adapter {value!r}; loaded adapters: {engine.available_adapters or 'none'}"))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        """Apply runtime-safe changes at once (window, queue, limits, topics, adapter)."""
        names = {p.name: p.value for p in params}
        win = {k.split(".", 1)[1]: v for k, v in names.items() if k.startswith("window.")}
        if win:
            self._window.configure(**win)
        if "queue.max_pending" in names and self._worker is not None:
            self._worker.set_max_pending(names["queue.max_pending"])
        if "max_image_pixels" in names and self._engine is not None:
            self._engine.max_image_pixels = int(names["max_image_pixels"])
        if self._engine is not None:
            if "cache.vision_mb" in names:
                self._engine.vision_cache.resize(int(names["cache.vision_mb"] * 2**20))
            if "cache.prefix_mb" in names:
                self._engine.prefix_cache.resize(int(names["cache.prefix_mb"] * 2**20))
        if "diagnostics_period_s" in names:
            self._diag_timer.cancel()
            self.destroy_timer(self._diag_timer)
            self._diag_timer = self.create_timer(names["diagnostics_period_s"], self._publish_diagnostics,
                                                 callback_group=self._timer_group, clock=self._diag_clock)
        if "image_topics" in names and self._state == "active":
            self._sync_subscriptions()
        if "active_adapter" in names and self._worker is not None and not getattr(self._adapter_param_sync, "on", False):
            name = names["active_adapter"]
            engine = self._engine

            def done(j):
                if j.state == "done":
                    self.get_logger().info(f"active adapter is now {name or 'none'}")
                else:  # the parameter must not claim an adapter the model is not running
                    self.get_logger().error(f"could not activate adapter {name!r}: {j.exception()}; "
                                            f"active_adapter stays {engine.active_adapter or 'none'!r}")
                    self._sync_adapter_parameter(engine)

            try:
                job = self._worker.submit(lambda job: engine.set_adapter(name), timeout_s=self._p("request_timeout_s"),
                                          name=f"set_adapter({name})")
                job.add_done_callback(done)
            except JobRejected as exc:
                self.get_logger().error(f"could not activate adapter {name!r}: {exc}")
                # set_parameters from inside the parameter callback would recurse: revert from a one-shot timer
                self._revert_timer = self.create_timer(0.0, lambda: (self._revert_timer.cancel(),
                                                                     self._sync_adapter_parameter(engine)),
                                                       callback_group=self._timer_group)

    def _sync_adapter_parameter(self, engine) -> None:
        """Make the active_adapter parameter show what the engine runs (without switching anything)."""
        self._adapter_param_sync.on = True
        try:
            self.set_parameters([Parameter("active_adapter", value=engine.active_adapter)])
        finally:
            self._adapter_param_sync.on = False

    # ------------------------------------------------------------------ lifecycle
    def _autostart(self) -> None:
        self._autostart_timer.cancel()
        self.destroy_timer(self._autostart_timer)
        if self._state != "unconfigured":
            return  # a lifecycle manager got there first
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS and self._state == "inactive":
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._params()
        try:
            adapters = {}
            for entry in p["adapters"]:
                name, sep, path = entry.partition("=")
                if not sep or not name.strip() or not path.strip():
                    raise RequestError(f"adapters entry {entry!r} is not 'name=path'")
                adapters[name.strip()] = os.path.expanduser(path.strip())
            model_path, adapters, active = resolve_model_and_adapters(p["model_path"], adapters, p["active_adapter"].strip())
            if active and active.lower() != "none" and active not in adapters:
                raise RequestError(f"active_adapter {active!r} is not among the adapters parameter ({list(adapters) or 'none'})")
            self.get_logger().info(f"loading model from {model_path} (device={p['device']}, dtype={p['dtype']}, "
                                   f"adapters={list(adapters) or 'none'}, active={active or 'none'})")
            from phi3v_spatial.engine.engine import SpatialEngine

            t0 = time.monotonic()
            engine = SpatialEngine.from_pretrained(
                model_path, adapters=adapters, active_adapter=active or None, device=p["device"], dtype=p["dtype"],
                attn_implementation=p["attn_implementation"], num_crops=p["num_crops"] or None,
                max_image_pixels=p["max_image_pixels"], options=engine_options(p), quantization=p["quantization"])
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the node alive and unconfigured
            self._configure_error = f"configure failed: {exc}"
            self.get_logger().error(f"{self._configure_error}; the node stays unconfigured (fix the parameters, "
                                    f"then call configure again)")
            self.get_logger().debug(traceback.format_exc())
            return TransitionCallbackReturn.FAILURE
        with self._lock:
            self._engine = engine
            self._worker = InferenceWorker(max_pending=p["queue.max_pending"])
            self._configure_error = ""
            self._state = "inactive"
        d = engine.describe()
        self.get_logger().info(f"model loaded in {time.monotonic() - t0:.1f} s: device={d.get('device')}, "
                               f"dtype={d.get('dtype')}, attn={d.get('attn_implementation')}, "
                               f"adapters={d.get('adapters')}, active={d.get('active_adapter') or 'none'}")
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._sync_subscriptions()
        self._state = "active"
        cams = ", ".join(f"{k} ({v[1].rsplit('/', 1)[-1]})" for k, v in self._subs.items()) or "none"
        self.get_logger().info(f"active: serving ~/ask, ~/query_relations, ~/set_adapter, ~/plan; cameras: {cams}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state = "inactive"
        self._unsubscribe_all()
        self.get_logger().info("inactive: cameras unsubscribed, requests are refused")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state = "unconfigured"
        self._release_engine()
        self.get_logger().info("cleaned up: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._state = "finalized"
        self._unsubscribe_all()
        self._release_engine()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error in state {state.label}; releasing the model")
        self._state = "unconfigured"
        self._unsubscribe_all()
        self._release_engine()
        return TransitionCallbackReturn.SUCCESS

    def _release_engine(self) -> None:
        """Stop the worker (cancelling queued and running jobs) before the engine goes away."""
        with self._lock:
            worker, engine = self._worker, self._engine
            self._worker = None
            self._engine = None
        if worker is not None:
            worker.stop(timeout=60.0)
        if engine is not None:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001
                self.get_logger().warning(f"engine.close() failed: {exc}")
        self._window.clear()

    def release(self) -> None:
        """Free everything on process exit, whatever the lifecycle state."""
        self._state = "finalized"
        self._unsubscribe_all()
        self._release_engine()

    @property
    def lifecycle_state(self) -> str:
        return self._state

    # ------------------------------------------------------------------ cameras
    def _parse_topic(self, spec: str) -> tuple[str, str | None]:
        """'name[:compressed|:raw]' -> (fully resolved name, forced type or None)."""
        spec, kind = split_topic_spec(spec)
        forced = {"compressed": COMPRESSED_TYPE, "raw": IMAGE_TYPE}.get(kind)
        try:
            name = expand_topic_name(spec.strip(), self.get_name(), self.get_namespace())
        except Exception:  # noqa: BLE001 - reported when subscribing
            name = spec.strip()
        return name, forced

    def _topic_type(self, name: str, forced: str | None) -> str:
        if forced:
            return forced
        if name.endswith("/compressed"):
            return COMPRESSED_TYPE
        advertised = dict(self.get_topic_names_and_types()).get(name, [])
        if COMPRESSED_TYPE in advertised and IMAGE_TYPE not in advertised:
            return COMPRESSED_TYPE
        return IMAGE_TYPE

    def _sync_subscriptions(self) -> None:
        """Subscribe every image_topics entry (sensor-data QoS) and drop the ones no longer listed."""
        wanted = {}
        for spec in self._p("image_topics"):
            name, forced = self._parse_topic(spec)
            wanted[name] = self._topic_type(name, forced)
        with self._lock:
            for name in list(self._subs):
                if name not in wanted or self._subs[name][1] != wanted[name]:
                    sub, _ = self._subs.pop(name)
                    self.destroy_subscription(sub)
                    if name not in wanted:
                        self._window.remove_topic(name)
            for name, mtype in wanted.items():
                if name in self._subs:
                    continue
                try:
                    if mtype == COMPRESSED_TYPE:
                        sub = self.create_subscription(CompressedImage, name, lambda m, t=name: self._on_compressed(t, m),
                                                       qos_profile_sensor_data, callback_group=self._camera_group)
                    else:
                        sub = self.create_subscription(Image, name, lambda m, t=name: self._on_image(t, m),
                                                       qos_profile_sensor_data, callback_group=self._camera_group)
                except Exception as exc:  # noqa: BLE001 - a bad name must not take the others down
                    self.get_logger().error(f"cannot subscribe to camera topic {name!r}: {exc}")
                    continue
                self._subs[name] = (sub, mtype)
                self._window.add_topic(name)

    def _unsubscribe_all(self) -> None:
        with self._lock:
            for name, (sub, _) in list(self._subs.items()):
                self.destroy_subscription(sub)
            self._subs.clear()

    def _recheck_topic_types(self) -> None:
        """A camera that started after activation may advertise CompressedImage: follow the graph."""
        if self._state != "active":
            return
        stats = self._window.stats()
        graph = dict(self.get_topic_names_and_types())
        changed = False
        for spec in self._p("image_topics"):
            name, forced = self._parse_topic(spec)
            if forced or name not in self._subs or (stats.get(name) or {}).get("received"):
                continue
            advertised = graph.get(name, [])
            if self._subs[name][1] not in advertised and advertised:
                changed = True
        if changed:
            with self._lock:
                for spec in self._p("image_topics"):
                    name, _ = self._parse_topic(spec)
                    if name in self._subs and not (stats.get(name) or {}).get("received"):
                        sub, _ = self._subs.pop(name)
                        self.destroy_subscription(sub)
            self._sync_subscriptions()

    def _stamp(self, topic: str, header) -> int:
        ns = stamp_to_ns(header.stamp)
        if ns == 0:
            if topic not in self._stamp_warned:
                self._stamp_warned.add(topic)
                self.get_logger().warning(f"camera {topic} publishes header.stamp = 0; using the receive time instead")
            ns = self.get_clock().now().nanoseconds
        return ns

    def _on_image(self, topic: str, msg: Image) -> None:
        self._window.add(topic, self._stamp(topic, msg.header), raw_payload(msg))

    def _on_compressed(self, topic: str, msg: CompressedImage) -> None:
        self._window.add(topic, self._stamp(topic, msg.header), compressed_payload(msg))

    # ------------------------------------------------------------------ request plumbing
    def _require_active(self):
        state = self._state
        if state == "unconfigured":
            reason = f" ({self._configure_error})" if self._configure_error else ""
            raise RequestError(f"node is not configured: the model is not loaded{reason}; configure and activate it "
                               f"(lifecycle services {self.get_fully_qualified_name()}/change_state)")
        if state != "active":
            raise RequestError(f"node is not active (state: {state}); activate it through "
                               f"{self.get_fully_qualified_name()}/change_state")
        engine, worker = self._engine, self._worker
        if engine is None or worker is None:
            raise RequestError("node is not configured: the model is not loaded")
        return engine, worker

    def _frames_for(self, images, image_topics, num_frames) -> tuple[list, list[int], list[str], list | None]:
        """Decoded RGB frames for a request: its own images, else the window (raises RequestError).

        Also returns the frames' identities for the engine's caches: (topic, header stamp) for window frames,
        None for images sent in the request (the engine then keys them by their pixels).
        """
        max_pixels = int(self._p("max_image_pixels"))
        if len(images):
            arrays, stamps = [], []
            for i, m in enumerate(images):
                try:
                    arrays.append(decode_raw(m.encoding, m.height, m.width, m.step, m.data,
                                             is_bigendian=bool(m.is_bigendian), max_pixels=max_pixels))
                except ImageDecodeError as exc:
                    raise RequestError(f"images[{i}]: {exc}") from None
                stamps.append(stamp_to_ns(m.header.stamp))
            return arrays, stamps, [], None
        topics = [self._parse_topic(t)[0] for t in image_topics if t.strip()]
        try:
            sel = self._window.select(topics, int(num_frames) or None, self.get_clock().now().nanoseconds)
            arrays = sel.images(max_pixels)
        except (WindowError, ImageDecodeError) as exc:
            raise RequestError(str(exc)) from None
        return arrays, sel.stamps_ns, sel.topics, sel.keys

    def _run(self, fn, timeout_s: float, name: str):
        """Submit to the worker and wait (this thread is a reentrant-group thread, never the model's)."""
        _, worker = self._require_active()
        job = worker.submit(fn, timeout_s=timeout_s, name=name)
        return job.result()

    def _fail(self, what: str, exc: BaseException) -> str:
        self._stats["failed"] += 1
        known = (RequestError, JobError, ImageDecodeError, WindowError)
        try:
            from phi3v_spatial.engine.engine import EngineError
            known = known + (EngineError,)
        except ImportError:
            pass
        if isinstance(exc, known):
            msg = str(exc)
            self.get_logger().warning(f"{what} refused: {msg}")
        else:
            msg = f"internal error in {what}: {type(exc).__name__}: {exc}"
            self.get_logger().error(f"{msg}\n{traceback.format_exc()}")
        return msg

    def _done(self, t0: float) -> float:
        latency = time.monotonic() - t0
        self._last_latency_s = latency
        self._stats["ok"] += 1
        return latency

    # ------------------------------------------------------------------ services
    def _on_ask(self, req: AskSpatial.Request, res: AskSpatial.Response) -> AskSpatial.Response:
        t0 = time.monotonic()
        try:
            self._require_active()
            if not req.question.strip():
                raise RequestError("the question is empty")
            images, stamps, topics, keys = self._frames_for(req.images, req.image_topics, req.num_frames)
            max_new = int(req.max_new_tokens) or int(self._p("generation.max_new_tokens"))
            engine = self._engine
            out = self._run(lambda job: engine.ask(req.question, images, max_new_tokens=max_new,
                                                   should_stop=job.should_stop, frame_keys=keys),
                            self._p("request_timeout_s"), "ask")
            res.success = True
            res.answer = out.answer
            res.relations = [relation_to_msg(r) for r in out.relations]
            res.frame_stamps = [ns_to_stamp(s) for s in stamps]
            res.latency_s = self._done(t0)
            self._publish_relations(req.question, res.answer, res.relations, stamps, topics, res.latency_s)
        except Exception as exc:  # noqa: BLE001 - every failure becomes success=false with a reason
            res.success = False
            res.error = self._fail("ask", exc)
            res.latency_s = time.monotonic() - t0
        return res

    def _on_query_relations(self, req: QueryRelations.Request, res: QueryRelations.Response) -> QueryRelations.Response:
        t0 = time.monotonic()
        try:
            self._require_active()
            from phi3v_spatial.engine.engine import check_candidates
            from phi3v_spatial.engine.parsing import Relation

            check_candidates(req.candidates)  # before queueing: a malformed request never takes a queue slot
            cands = [Relation(c.subject, c.relation, c.object) for c in req.candidates]
            images, stamps, topics, keys = self._frames_for(req.images, req.image_topics, req.num_frames)
            engine = self._engine
            rels = self._run(lambda job: engine.query_relations(cands, images, should_stop=job.should_stop,
                                                                frame_keys=keys),
                             self._p("request_timeout_s"),
                             "query_relations")
            res.success = True
            res.relations = [relation_to_msg(r) for r in rels]
            res.frame_stamps = [ns_to_stamp(s) for s in stamps]
            res.latency_s = self._done(t0)
            self._publish_relations("", "", res.relations, stamps, topics, res.latency_s)
        except Exception as exc:  # noqa: BLE001
            res.success = False
            res.error = self._fail("query_relations", exc)
            res.latency_s = time.monotonic() - t0
        return res

    def _on_set_adapter(self, req: SetAdapter.Request, res: SetAdapter.Response) -> SetAdapter.Response:
        try:
            engine, _ = self._require_active()
            name = req.name.strip()
            scale = float(req.scale) or 1.0
            if name and name.lower() != "none" and name not in engine.available_adapters:
                raise RequestError(f"unknown adapter {name!r}; loaded adapters: {engine.available_adapters or 'none'} "
                                   f"(parameter adapters)")
            self._run(lambda job: engine.set_adapter(name or None, scale), self._p("request_timeout_s"), "set_adapter")
            self._sync_adapter_parameter(engine)
            res.success = True
            self._stats["ok"] += 1
        except Exception as exc:  # noqa: BLE001
            res.success = False
            res.error = self._fail("set_adapter", exc)
        engine = self._engine
        res.active = engine.active_adapter if engine is not None else ""
        res.available = list(engine.available_adapters) if engine is not None else []
        return res

    # ------------------------------------------------------------------ plan action
    def _on_plan_cancel(self, goal_handle) -> CancelResponse:
        """Cancel the job right here (not at the execute loop's next poll) so a queued goal never starts."""
        job = self._plan_jobs.get(bytes(goal_handle.goal_id.uuid))
        if job is not None:
            job.cancel()
        return CancelResponse.ACCEPT

    def _execute_plan(self, goal_handle) -> Plan.Result:
        goal = goal_handle.request
        t0 = time.monotonic()
        result = Plan.Result()
        stamps: list[int] = []
        topics: list[str] = []
        last_fb = [0.0]

        def feedback(stage, text="", tokens=0, position=0):
            fb = Plan.Feedback(stage=stage, partial_text=text, tokens_generated=int(tokens),
                               queue_position=int(position))
            goal_handle.publish_feedback(fb)

        def on_text(text, n):
            now = time.monotonic()
            if now - last_fb[0] >= FEEDBACK_MIN_PERIOD_S:
                last_fb[0] = now
                feedback("generating", text, n)

        try:
            engine, worker = self._require_active()
            if not goal.instruction.strip():
                raise RequestError("the instruction is empty")
            images, stamps, topics, keys = self._frames_for(goal.images, goal.image_topics, goal.num_frames)
            max_new = int(goal.max_new_tokens) or int(self._p("plan.max_new_tokens"))
            timeout = float(goal.timeout_s) if goal.timeout_s > 0 else float(self._p("request_timeout_s"))

            def run(job):
                feedback("encoding")
                return engine.plan(goal.instruction, images, max_new_tokens=max_new, on_text=on_text,
                                   should_stop=job.should_stop, frame_keys=keys)

            job = worker.submit(run, timeout_s=timeout, name="plan")
            goal_key = bytes(goal_handle.goal_id.uuid)
            self._plan_jobs[goal_key] = job
            job.add_done_callback(lambda j: self._plan_jobs.pop(goal_key, None))
            last_pos = None
            while not job.wait(0.05):
                if goal_handle.is_cancel_requested:
                    job.cancel()
                pos = job.queue_position
                if pos and pos != last_pos:
                    feedback("queued", position=pos)
                last_pos = pos
            try:
                pr = job.result()
            except JobCancelled as exc:
                pr = exc.partial
                if pr is None or not goal_handle.is_cancel_requested:
                    raise
            result.raw_text = pr.raw_text
            result.latency_s = time.monotonic() - t0
            if pr.cancelled or goal_handle.is_cancel_requested:
                result.success = False
                result.error = f"cancelled by the client after {pr.tokens_generated} token(s)"
                self._stats["failed"] += 1
                goal_handle.canceled()
                self.get_logger().info(f"plan goal cancelled after {pr.tokens_generated} token(s)")
            else:
                feedback("parsing", pr.raw_text, pr.tokens_generated)
                result.steps = [plan_step_to_msg(s) for s in pr.steps]
                result.success = not pr.error
                result.error = pr.error and f"could not parse a plan from the model output: {pr.error}"
                if result.success:
                    self._done(t0)
                    goal_handle.succeed()
                else:
                    self._stats["failed"] += 1
                    goal_handle.abort()
        except Exception as exc:  # noqa: BLE001
            result.success = False
            result.error = self._fail("plan", exc)
            result.latency_s = time.monotonic() - t0
            if isinstance(exc, JobCancelled) and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
        self._publish_plan(goal.instruction, result, stamps, topics)
        return result

    # ------------------------------------------------------------------ publishing
    def _publish_relations(self, question, answer, relations, stamps, topics, latency) -> None:
        if self._state != "active":
            return
        msg = RelationsStamped(question=question, answer=answer, relations=list(relations),
                               frame_stamps=[ns_to_stamp(s) for s in stamps], image_topics=list(topics),
                               latency_s=float(latency))
        msg.header.stamp = ns_to_stamp(max(stamps, default=0))
        self._relations_pub.publish(msg)

    def _publish_plan(self, instruction, result: Plan.Result, stamps, topics) -> None:
        if self._state != "active":
            return
        msg = PlanStamped(instruction=instruction, steps=list(result.steps), raw_text=result.raw_text,
                          success=result.success, error=result.error, frame_stamps=[ns_to_stamp(s) for s in stamps],
                          image_topics=list(topics), latency_s=float(result.latency_s))
        msg.header.stamp = ns_to_stamp(max(stamps, default=0))
        self._plans_pub.publish(msg)

    def _publish_diagnostics(self) -> None:
        try:
            self._recheck_topic_types()
            now = self.get_clock().now()
            engine, worker = self._engine, self._worker
            desc = engine.describe() if engine is not None else {}
            values = {
                "lifecycle_state": self._state,
                "model_loaded": str(engine is not None).lower(),
                "model_path": desc.get("model_path", self._p("model_path") or paths.default_model_dir()),
                "device": str(desc.get("device", "")),
                "dtype": str(desc.get("dtype", "")),
                "attn_implementation": str(desc.get("attn_implementation", "")),
                "quantization": str(desc.get("quantization", "")),
                "num_crops": str(desc.get("num_crops", "")),
                "skip_padding_crops": str(desc.get("skip_padding_crops", "")).lower(),
                "batched_relations": str(desc.get("batched_relations", "")).lower(),
                "pinned_upload": str(desc.get("pinned_upload", "")).lower(),
                **{f"cache.{name}.{k}": str(v) for name, st in desc.get("cache", {}).items()
                   for k, v in st.items() if k in ("entries", "bytes", "hits", "misses", "evictions")},
                "active_adapter": str(desc.get("active_adapter", "")),
                "adapters": ",".join(desc.get("adapters", []) or []),
                "queue_depth": str(worker.depth if worker else 0),
                "queue_max_pending": str(self._p("queue.max_pending")),
                "busy": str(bool(worker and worker.busy)).lower(),
                "last_latency_s": "" if self._last_latency_s is None else f"{self._last_latency_s:.3f}",
                "requests_ok": str(self._stats["ok"]),
                "requests_failed": str(self._stats["failed"]),
                "requests_rejected": str(worker.rejected if worker else 0),
                "configure_error": self._configure_error,
            }
            if self._configure_error:
                level, message = DiagnosticStatus.ERROR, self._configure_error
            elif engine is None:
                level, message = DiagnosticStatus.WARN, "model not loaded (node not configured)"
            elif self._state != "active":
                level, message = DiagnosticStatus.WARN, f"model loaded, node {self._state}"
            else:
                level, message = DiagnosticStatus.OK, "serving"
            hw = f"{self.get_fully_qualified_name()}"
            statuses = [DiagnosticStatus(level=level, name=f"{hw}: inference", message=message, hardware_id=hw,
                                         values=[KeyValue(key=k, value=v) for k, v in values.items()])]
            max_age = float(self._p("window.max_age_s"))
            for topic, st in self._window.stats(now.nanoseconds).items():
                age = st["age_s"]
                if st["latest_stamp_ns"] is None:
                    lvl, msg = DiagnosticStatus.WARN, "no frames received"
                elif max_age > 0 and age is not None and age > max_age:
                    lvl, msg = DiagnosticStatus.WARN, f"stale: newest frame {age:.2f} s old"
                else:
                    lvl, msg = DiagnosticStatus.OK, "receiving"
                kv = {"frames": str(st["frames"]), "received": str(st["received"]), "dropped": str(st["dropped"]),
                      "age_s": "" if age is None else f"{age:.3f}",
                      "latest_stamp_ns": "" if st["latest_stamp_ns"] is None else str(st["latest_stamp_ns"]),
                      "type": self._subs.get(topic, (None, ""))[1]}
                statuses.append(DiagnosticStatus(level=lvl, name=f"{hw}: camera {topic}", message=msg, hardware_id=hw,
                                                 values=[KeyValue(key=k, value=v) for k, v in kv.items()]))
            arr = DiagnosticArray(status=statuses)
            arr.header.stamp = now.to_msg()
            self._diag_pub.publish(arr)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().warning(f"diagnostics failed: {exc}")


def main(args=None) -> int:
    """Console script ``spatial_node``: spin a MultiThreadedExecutor until SIGINT/SIGTERM."""
    rclpy.init(args=args)
    node = None
    executor = None
    try:
        node = SpatialNode()
        params_file.warn_unmatched(node, sys.argv if args is None else args)  # a file keyed for another name
        # Every waiting request holds an executor thread; size the pool for the largest queue.max_pending the
        # parameter allows (it can be raised at runtime), plus the running job, cameras, lifecycle and parameters.
        threads = MAX_PENDING_LIMIT + 1 + 6
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.release()  # stops the worker: callbacks waiting on jobs return
        drained = executor.shutdown(timeout_sec=30.0) if executor is not None else True
        if node is not None and drained:
            node.destroy_node()  # never under a callback that is still running (that can crash rcl)
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
