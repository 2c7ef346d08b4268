"""The ``~/plan`` action on the request layer: streamed feedback, queue positions, and a cancel that reaches the
queued or running request at once (not at some later poll), so a queued goal never starts.

Also :func:`await_reply`, how every callback of the node waits for a reply without holding an executor thread, and
:class:`InFlight`, which counts those callbacks.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from rclpy.action import ActionServer, CancelResponse
from rclpy.task import Future

from phi3v_spatial.engine import memory
from phi3v_spatial.engine.requests import OUTPUT, REFUSED, PendingReply, Reply
from phi3v_spatial_interfaces.action import Plan

from .messages import plan_request, plan_result, plan_stamped

FEEDBACK_MIN_PERIOD_S = 0.02  # stream at most ~50 partial-text feedbacks per second


async def await_reply(executor, pending: PendingReply) -> Reply:
    """Await a reply in a coroutine callback: the worker's done callback completes an rclpy future and wakes the
    executor, which resumes the coroutine. No thread waits in between."""
    future = Future(executor=executor)

    def done(reply):
        future.set_result(reply)
        if executor is not None:
            executor.wake()
        memory.after_request()  # on the thread that finished the reply (the worker's for a request that ran)

    pending.add_done_callback(done)
    return await future


class InFlight:
    """How many request callbacks have not finished yet (``with in_flight:``), so a shutdown can wait for them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def __enter__(self):
        with self._lock:
            self.count += 1

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1


class _NextSpin:
    """Awaitable that gives the executor one turn (the coroutine resumes at the executor's next wake)."""

    def __await__(self):
        yield


class PlanAction:
    """``~/plan`` of ``node``; ``handler(request)`` gives (RequestHandler, None) or (None, refusal reply), after
    ``await_ready(request)`` has waited (without a thread) for a node that is bringing itself up."""

    def __init__(self, node, handler: Callable, await_ready: Callable, callback_group, publish: Callable,
                 in_flight: InFlight):
        self._node = node
        self._await_ready = await_ready
        self._in_flight = in_flight
        self._handler = handler
        self._publish = publish
        self._lock = threading.Lock()
        self._pending: dict[bytes, PendingReply] = {}  # goal id -> its request
        self._early_cancels: set[bytes] = set()       # goals cancelled before their request was queued
        self.server = ActionServer(node, Plan, "~/plan", execute_callback=self._execute, callback_group=callback_group,
                                   cancel_callback=self._cancel)

    def _cancel(self, goal_handle) -> CancelResponse:
        key = bytes(goal_handle.goal_id.uuid)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                self._early_cancels.add(key)
        if pending is not None:
            pending.cancel()
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle) -> Plan.Result:
        with self._in_flight:
            return await self._execute_goal(goal_handle)

    async def _execute_goal(self, goal_handle) -> Plan.Result:
        goal = goal_handle.request
        request = plan_request(goal)
        waited_s = await self._await_ready(request)
        handler, reply = self._handler(request)
        if handler is not None:
            reply = await self._run(handler, request, goal_handle, waited_s)
        if reply.cancelled and goal_handle.is_cancel_requested:
            goal_handle.canceled()
            self._node.get_logger().info(f"plan goal cancelled after {reply.tokens_generated} token(s)")
        elif reply.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        self._publish(plan_stamped(goal.instruction, reply))
        return plan_result(reply)

    async def _run(self, handler, request, goal_handle, waited_s: float = 0.0) -> Reply:
        last = [0.0]

        def feedback(stage, text="", tokens=0, position=0):
            goal_handle.publish_feedback(Plan.Feedback(stage=stage, partial_text=text, tokens_generated=int(tokens),
                                                       queue_position=int(position)))

        def on_text(text, tokens):
            if time.monotonic() - last[0] >= FEEDBACK_MIN_PERIOD_S:
                last[0] = time.monotonic()
                feedback("generating", text, tokens)

        key = bytes(goal_handle.goal_id.uuid)
        pending = handler.submit(request, on_text=on_text, on_start=lambda: feedback("encoding"),
                                 on_position=lambda n: feedback("queued", position=n), waited_s=waited_s)
        with self._lock:
            self._pending[key] = pending
            cancelled_early = key in self._early_cancels
        if cancelled_early:
            pending.cancel()
        try:
            reply = await await_reply(self._node.executor, pending)
        finally:
            with self._lock:
                self._pending.pop(key, None)
                self._early_cancels.discard(key)
        if reply.success or reply.error_kind in (OUTPUT, REFUSED):
            feedback("parsing", reply.raw_text, reply.tokens_generated)
        if reply.cancelled and pending.cancel_requested:
            # rclpy marks the goal as cancelling right after our cancel callback returns, maybe after this point
            end = time.monotonic() + 1.0
            while not goal_handle.is_cancel_requested and time.monotonic() < end:
                self._node.executor.wake()
                await _NextSpin()
        return reply
