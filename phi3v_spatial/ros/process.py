"""The ``spatial_node`` process: serve until SIGINT/SIGTERM, then stop in order and exit 0, whatever signals follow.

Why not rclpy's own signal handlers: they shut the ROS context down at the first signal, so the replies of
requests still in flight (a plan goal that is generating) could no longer be sent; and a second signal (a
terminal's Ctrl-C reaches the whole process group, and ``ros2 launch`` forwards it again) raised
KeyboardInterrupt inside the cleanup, which launch reported as "process has died". So rclpy is initialised with
``SignalHandlerOptions.NO`` and these handlers only note a signal: the first one starts the stop, later ones are
counted and change nothing. The stop (``SpatialNode.shut_down``): new requests are refused, the worker is
stopped (a running generation ends within a token, queued requests at once) and the executor keeps spinning
until their callers have their replies (a goal is aborted with a reason), the model is released, one log line
says so; then the executor and the context shut down and the process exits 0.

The executor spins on its own thread, so the main thread waits on an Event, where a signal handler runs at once.
"""
from __future__ import annotations

import signal
import sys
import threading

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.signals import SignalHandlerOptions

SPIN_ERRORS_TOLERATED = 20  # unexpected executor errors logged and survived before the node stops
STOP_TIMEOUT_S = 10.0  # for the replies of requests in flight; ros2 launch escalates to SIGTERM after 5 s, kill after 10


def run(args=None) -> int:
    from phi3v_spatial.engine import memory

    from . import params_file
    from .node import EXECUTOR_THREADS, SpatialNode

    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    memory.configure_allocator()  # before the threads (DDS, executor, worker) get their own malloc arenas
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = executor = spinner = None
    try:
        node = SpatialNode()
        params_file.warn_unmatched(node, sys.argv if args is None else args)  # a file keyed for another name
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        spinner = threading.Thread(target=_spin, args=(executor, stop, node.get_logger()), name="executor", daemon=True)
        spinner.start()
        stop.wait()
    finally:
        drained = True
        if node is not None:
            why = signal.Signals(received[0]).name if received else "ROS shutdown"
            node.shut_down(executor, why, STOP_TIMEOUT_S)
        if executor is not None:
            drained = executor.shutdown(timeout_sec=STOP_TIMEOUT_S)
        if spinner is not None:
            # the spin thread must be out of rcl before the node and the context go (a thread still inside rcl_wait
            # at exit aborted the process with "terminate called without an active exception")
            spinner.join(STOP_TIMEOUT_S)
        if node is not None and drained:
            node.destroy_node()  # never under a callback that is still running (that can crash rcl)
        rclpy.try_shutdown()
    return 0


def _spin(executor, stop: threading.Event, log) -> None:
    """Spin until the stop; an unexpected error inside rclpy's executor is logged and spinning goes on (a robot's
    node must not go down for one bad wait set), up to SPIN_ERRORS_TOLERATED of them, then the node stops."""
    errors = 0
    try:
        while not stop.is_set():
            try:
                executor.spin()
                return
            except ExternalShutdownException:
                return
            except Exception as exc:  # noqa: BLE001 - logged; the executor builds a fresh wait set on the next turn
                errors += 1
                if errors > SPIN_ERRORS_TOLERATED:
                    log.error(f"executor failed {errors} times, stopping the node; last: {type(exc).__name__}: {exc}")
                    return
                log.error(f"executor error ({errors} of {SPIN_ERRORS_TOLERATED} tolerated), spinning on: "
                          f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()  # the context was shut down from elsewhere (or the executor kept failing): stop too
