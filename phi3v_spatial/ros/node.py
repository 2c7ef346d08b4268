"""``spatial_node``: a lifecycle node answering spatial questions about its camera window.

Wiring only. Parameters are declared from the table in ``settings`` (``parameters.py``); every request goes
through the request layer (``engine/requests.py``), the callbacks being message <-> request conversions
(``messages.py``); the cameras are a lifecycle-managed entity (``cameras.py``); ``/diagnostics`` is built by a
pure function (``diagnostics.py``).

Threading: the model runs only on the InferenceWorker's thread. Service and action callbacks are coroutines
in a reentrant group: they convert, submit and await the reply without holding an executor thread (the worker
completes an rclpy future and wakes the executor), so a small fixed executor serves any ``queue.max_pending``.
Cameras have their own mutually exclusive group (a callback only stores a reference to the message bytes);
lifecycle and parameter services stay in the default group, so all of them answer while the model generates.

Lifecycle (rclpy owns the state): configure loads the engine (a failure is logged and the node stays
unconfigured), activate subscribes the cameras and starts serving, deactivate stops the cameras and answers
"node is not active", cleanup stops the worker and frees the engine.
"""
from __future__ import annotations

import threading
import time
import traceback

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.task import Future

from phi3v_spatial import paths
from phi3v_spatial.engine.engine import EngineError, check_adapter
from phi3v_spatial.engine.requests import (
    NAMES, AdapterReply, AdapterRequest, Reply, RequestHandler, RequestStats, deadline_s, refuse,
)
from phi3v_spatial.engine.window import FrameWindow
from phi3v_spatial.engine.worker import InferenceWorker
from phi3v_spatial.settings import NODE_NAME, ModelSettings, serving_settings, window_settings
from phi3v_spatial_interfaces.msg import PlanStamped, RelationsStamped
from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations, SetAdapter

from .cameras import Cameras, RequestWindow
from .diagnostics import Snapshot, diagnostics
from .messages import (
    adapter_request, adapter_response, ask_request, ask_response, relations_request, relations_response,
    relations_stamped,
)
from .parameters import declare_parameters, parameter_value, parameter_values
from .plan_action import InFlight, PlanAction, await_reply

# Requests never hold a thread while they wait, so this does not depend on queue.max_pending: camera callbacks,
# lifecycle / parameter services (configure loads the model), timers, and request callbacks converting messages.
EXECUTOR_THREADS = 4
TOPIC_RECHECK_PERIOD_S = 1.0  # how often cameras that sent nothing yet are matched against the graph's types
STARTING_TRANSITIONS = ("configuring", "activating")  # requests arriving during these wait for them to end
READY_POLL_S = 0.05  # how often a request waiting for the node to come up looks again


class SpatialNode(LifecycleNode):
    """Serves ~/ask, ~/query_relations, ~/set_adapter and the ~/plan action through a RequestHandler."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        declare_parameters(self)
        p = parameter_values(self)
        self._requests: RequestHandler | None = None  # exists from configure to cleanup (engine + worker)
        self._configure_error = ""
        self._stats = RequestStats()
        self._window = FrameWindow(**window_settings(p))
        self._adapter_param_sync = threading.local()
        self._in_flight = InFlight()  # request callbacks not finished yet (a shutdown waits for their replies)
        self._stopping = False
        self._timer_group = MutuallyExclusiveCallbackGroup()
        requests = ReentrantCallbackGroup()
        self.cameras = Cameras(self, self._window, lambda: self._param("image_topics"), MutuallyExclusiveCallbackGroup(),
                               qos_depth=p["camera_qos_depth"])
        self.add_managed_entity(self.cameras)
        # Services and the action exist in every state, so a caller always gets an answer saying why not.
        self.create_service(AskSpatial, "~/ask", self._on_ask, callback_group=requests)
        self.create_service(QueryRelations, "~/query_relations", self._on_query_relations, callback_group=requests)
        self.create_service(SetAdapter, "~/set_adapter", self._on_set_adapter, callback_group=requests)
        # Lifecycle publishers publish only while the node is active; diagnostics report in every state.
        self._relations_pub = self.create_lifecycle_publisher(RelationsStamped, "~/relations", 10)
        self._plans_pub = self.create_lifecycle_publisher(PlanStamped, "~/plans", 10)
        self._plan = PlanAction(self, self._handler, self._await_ready, requests, self._plans_pub.publish,
                                self._in_flight)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # On a steady clock: under use_sim_time a ROS-time timer stops while /clock is paused or held, and the
        # node would fall silent exactly when someone looks at it (the header stamp is still the node's clock).
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_timer = self._timer(p["diagnostics_period_s"], self._publish_diagnostics)
        self._recheck_timer = self._timer(TOPIC_RECHECK_PERIOD_S, self.cameras.recheck_types)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        # True until autostart has walked the node to active (or failed): requests arriving meanwhile wait for it.
        self._autostarting = bool(p["autostart"])
        self._ready_lock = threading.Lock()
        self._ready_waiters: list[Future] = []  # requests waiting for the node to come up, resumed every tick
        self._ready_timer = self.create_timer(READY_POLL_S, self._tick_ready_waiters,
                                              callback_group=MutuallyExclusiveCallbackGroup(), clock=self._steady)
        self._ready_timer.cancel()  # runs only while requests wait
        if p["autostart"]:
            self._autostart_timer = self.create_timer(0.0, self._autostart, callback_group=self._timer_group)

    def _timer(self, period_s: float, callback):
        return self.create_timer(period_s, callback, callback_group=self._timer_group, clock=self._steady)

    def _param(self, name: str):
        return parameter_value(self, name)

    @property
    def lifecycle_state(self) -> str:
        """rclpy's lifecycle state label (unconfigured, inactive, active, finalized, or a transition's)."""
        return self._state_machine.current_state[1]

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Reject values that would break serving, with a reason the caller sees (rclpy checks types and ranges)."""
        for prm in params:
            if prm.name == "image_topics":
                for spec in prm.value or []:
                    if why := self.cameras.invalid(spec):
                        return SetParametersResult(successful=False, reason=f"image_topics: {why}")
            elif prm.name == "active_adapter" and (handler := self._requests) is not None:
                try:
                    check_adapter(prm.value.strip(), handler.engine.available_adapters)
                except EngineError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        """Apply runtime-safe changes at once (window, limits, queue, caches, timers, cameras, adapter)."""
        changed = {p.name: p.value for p in params}
        window = {k.split(".", 1)[1]: v for k, v in changed.items() if k.startswith("window.")}
        if window:
            self._window.configure(**window)
        handler = self._requests
        if handler is not None:
            handler.settings = serving_settings(parameter_values(self))
            engine = handler.engine
            if "queue.max_pending" in changed:
                handler.worker.set_max_pending(changed["queue.max_pending"])
            if "max_image_pixels" in changed:
                engine.max_image_pixels = int(changed["max_image_pixels"])
            if "cache.vision_mb" in changed:
                engine.vision_cache.resize(int(changed["cache.vision_mb"] * 2**20))
            if "cache.prefix_mb" in changed:
                engine.prefix_cache.resize(int(changed["cache.prefix_mb"] * 2**20))
            if "active_adapter" in changed and not getattr(self._adapter_param_sync, "on", False):
                self._switch_adapter(handler, changed["active_adapter"])
        if "diagnostics_period_s" in changed:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = self._timer(changed["diagnostics_period_s"], self._publish_diagnostics)
        if "image_topics" in changed and self.lifecycle_state == "active":
            self.cameras.sync()

    def _switch_adapter(self, handler: RequestHandler, name: str) -> None:
        """The active_adapter parameter was set: switch on the worker; on failure the parameter is reverted."""
        def done(reply):
            if reply.success:
                self.get_logger().info(f"active adapter is now {name or 'none'}")
                return
            self.get_logger().error(f"could not activate adapter {name!r}: {reply.error}; "
                                    f"active_adapter stays {reply.active or 'none'!r}")
            self._sync_adapter_parameter(reply.active)

        pending = handler.submit(AdapterRequest(name=name))
        if pending.done():  # refused at once, inside this parameter callback: set_parameters here would recurse
            reply = pending.result()
            self.get_logger().error(f"could not activate adapter {name!r}: {reply.error}")
            self._revert_timer = self.create_timer(0.0, lambda: (self.destroy_timer(self._revert_timer),
                                                                 self._sync_adapter_parameter(reply.active)),
                                                   callback_group=self._timer_group)
        else:
            pending.add_done_callback(done)

    def _sync_adapter_parameter(self, active: str) -> None:
        """Make the active_adapter parameter show what the engine runs (without switching anything)."""
        self._adapter_param_sync.on = True
        try:
            self.set_parameters([Parameter("active_adapter", value=active)])
        finally:
            self._adapter_param_sync.on = False

    # ------------------------------------------------------------------ lifecycle
    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        try:
            if self.lifecycle_state != "unconfigured":
                return  # a lifecycle manager got there first
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS and self.lifecycle_state == "inactive":
                self.trigger_activate()
        finally:
            self._autostarting = False

    @property
    def starting(self) -> bool:
        """The node is bringing itself up: autostart not finished, or a configure / activate transition running."""
        return not self._stopping and (self._autostarting or self.lifecycle_state in STARTING_TRANSITIONS)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = parameter_values(self)
        try:
            model = ModelSettings.from_params(p)
            self.get_logger().info(f"loading model from {model.model_path} (device={model.device}, dtype={model.dtype}, "
                                   f"adapters={list(model.adapters) or 'none'}, active={model.active_adapter or 'none'})")
            t0 = time.monotonic()
            engine = model.load()
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the node alive and unconfigured
            self._configure_error = f"configure failed: {exc}"
            self.get_logger().error(f"{self._configure_error}; the node stays unconfigured (fix the parameters, "
                                    f"then call configure again)")
            self.get_logger().debug(traceback.format_exc())
            return TransitionCallbackReturn.FAILURE
        self._requests = RequestHandler(
            engine, InferenceWorker(max_pending=p["queue.max_pending"]), window=RequestWindow(self._window, self.cameras),
            settings=serving_settings(p), resolve_topic=self.cameras.resolve,
            clock=lambda: self.get_clock().now().nanoseconds, stats=self._stats, log=self.get_logger())
        self._configure_error = ""
        d = engine.describe()
        self.get_logger().info(f"model loaded in {time.monotonic() - t0:.1f} s: device={d.get('device')}, "
                               f"dtype={d.get('dtype')}, attn={d.get('attn_implementation')}, "
                               f"adapters={d.get('adapters')}, active={d.get('active_adapter') or 'none'}")
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # cameras subscribe, lifecycle publishers start
        cams = ", ".join(f"{k} ({v.rsplit('/', 1)[-1]})" for k, v in self.cameras.types.items()) or "none"
        self.get_logger().info(f"active: serving ~/ask, ~/query_relations, ~/set_adapter, ~/plan; cameras: {cams}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_deactivate(state)
        self.get_logger().info("inactive: cameras unsubscribed, requests are refused")
        return result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine()
        self.get_logger().info("cleaned up: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error in state {state.label}; releasing the model")
        self._release_engine()
        super().on_error(state)
        return TransitionCallbackReturn.SUCCESS

    def _release_engine(self) -> None:
        """Stop the worker (cancelling queued and running jobs) before the engine goes away."""
        handler, self._requests = self._requests, None
        if handler is not None:
            handler.worker.stop(timeout=60.0)
            try:
                handler.engine.close()
            except Exception as exc:  # noqa: BLE001
                self.get_logger().warning(f"engine.close() failed: {exc}")
        self._window.clear()

    def shut_down(self, executor, why: str, timeout_s: float) -> None:
        """Stop in order (process exit, see ``process.py``): refuse new requests, stop the worker so every request in
        flight ends now, let the executor deliver their replies (bounded), release the model; one log line."""
        self._stopping = True
        self.cameras.unsubscribe_all()
        handler = self._requests
        if handler is not None:
            handler.log = None  # the requests it stops are not "refused": the line below says what happened
        in_flight = self._in_flight.count
        self._release_engine()
        end = time.monotonic() + timeout_s
        while self._in_flight.count and time.monotonic() < end:
            if executor is not None:
                executor.wake()
            time.sleep(0.02)
        left = self._in_flight.count
        self.get_logger().info(f"stopped on {why}: {in_flight - left} request(s) in flight answered"
                               + (f", {left} not within {timeout_s:g} s" if left else "")
                               + ("; model released" if handler is not None else "; no model was loaded"))

    # ------------------------------------------------------------------ requests
    def _startup_deadline(self, request) -> float:
        """Monotonic time until which a request may wait for the node to come up: its own deadline."""
        return time.monotonic() + deadline_s(request, self._param("request_timeout_s"))

    async def _await_ready(self, request) -> float:
        """While the node configures / activates itself, wait (without holding a thread) until it is done or the
        request's deadline passes; ``_handler`` then says what the node's state is. Returns the seconds waited,
        which the request layer takes off the request's deadline (``waited_s``): one deadline in all."""
        if not self.starting:
            return 0.0
        t0 = time.monotonic()
        end = self._startup_deadline(request)
        while self.starting and time.monotonic() < end:
            await self._sleep()
        return time.monotonic() - t0

    async def _sleep(self) -> None:
        """Resume at the next tick of the ready timer (an rclpy timer, so nothing outside the executor touches it:
        it runs only while requests wait)."""
        future = Future(executor=self.executor)
        with self._ready_lock:
            self._ready_waiters.append(future)
            if self._ready_timer.is_canceled():
                self._ready_timer.reset()
                if self.executor is not None:
                    self.executor.wake()  # an executor already waiting must see the timer again
        await future

    def _tick_ready_waiters(self) -> None:
        with self._ready_lock:
            waiters, self._ready_waiters = self._ready_waiters, []
            self._ready_timer.cancel()
        for future in waiters:
            future.set_result(None)

    def _handler(self, request) -> tuple[RequestHandler | None, Reply | None]:
        """The handler while active (read once: a concurrent cleanup cannot pull it away mid-request), else a
        reply saying why not. Callers await ``_await_ready`` first, so a request that found the node bringing
        itself up gets here when that is over (or its deadline passed)."""
        handler, state = self._requests, self.lifecycle_state
        if handler is not None and state == "active" and not self._stopping:
            return handler, None
        if self._stopping:
            error = "node is shutting down (SIGINT/SIGTERM); the request was not run"
        elif self.starting:
            error = (f"node is still starting (state: {state}; the model is loading) and was not ready in time for "
                     f"this request; try again shortly, or raise request_timeout_s")
        elif handler is None:
            reason = f" ({self._configure_error})" if self._configure_error else ""
            error = (f"node is not configured: the model is not loaded{reason}; configure and activate it "
                     f"(lifecycle services {self.get_fully_qualified_name()}/change_state)")
        else:
            error = (f"node is not active (state: {state}); activate it through "
                     f"{self.get_fully_qualified_name()}/change_state")
        reply = refuse(request, error)
        if isinstance(reply, AdapterReply) and handler is not None:  # what the loaded model runs, as when active
            reply.active, reply.available = handler.engine.active_adapter, list(handler.engine.available_adapters)
        self._stats.record(reply)
        self.get_logger().warning(f"{NAMES[type(request)]} refused: {error}")
        return None, reply

    async def _serve(self, request, **callbacks) -> Reply:
        with self._in_flight:
            waited_s = await self._await_ready(request)
            handler, refused = self._handler(request)
            if handler is None:
                return refused
            return await await_reply(self.executor, handler.submit(request, waited_s=waited_s, **callbacks))

    async def _on_ask(self, req: AskSpatial.Request, res: AskSpatial.Response) -> AskSpatial.Response:
        reply = await self._serve(ask_request(req))
        if reply.success:
            self._relations_pub.publish(relations_stamped(req.question, reply))
        return ask_response(reply, res)

    async def _on_query_relations(self, req: QueryRelations.Request, res: QueryRelations.Response):
        reply = await self._serve(relations_request(req))
        if reply.success:
            self._relations_pub.publish(relations_stamped("", reply))
        return relations_response(reply, res)

    async def _on_set_adapter(self, req: SetAdapter.Request, res: SetAdapter.Response) -> SetAdapter.Response:
        reply = await self._serve(adapter_request(req))
        if reply.success:
            self._sync_adapter_parameter(reply.active)
        return adapter_response(reply, res)

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        try:
            handler = self._requests
            worker = handler.worker if handler is not None else None
            now = self.get_clock().now()
            self._diag_pub.publish(diagnostics(Snapshot(
                node=self.get_fully_qualified_name(), stamp=now.to_msg(), lifecycle_state=self.lifecycle_state,
                configure_error=self._configure_error, engine=handler.engine.describe() if handler else None,
                model_path=self._param("model_path") or paths.default_model_dir(),
                queue_depth=worker.depth if worker else 0, queue_max_pending=self._param("queue.max_pending"),
                busy=bool(worker and worker.busy), rejected=worker.rejected if worker else 0,
                requests_ok=self._stats.ok, requests_failed=self._stats.failed,
                last_latency_s=self._stats.last_latency_s, max_age_s=float(self._param("window.max_age_s")),
                cameras=self._window.stats(now.nanoseconds), camera_types=self.cameras.types,
                delivery=self.cameras.stats.snapshot(), depth_topics=dict(self.cameras.depth_topics))))
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().warning(f"diagnostics failed: {exc}")


def main(args=None) -> int:
    """Console script ``spatial_node``: serve until SIGINT/SIGTERM, then stop cleanly (``process.py``); exit 0."""
    from .process import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
