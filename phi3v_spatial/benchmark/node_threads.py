"""How many threads ``spatial_node`` uses while N requests wait on its model (printed, never asserted).

Why: a request that waits on the inference worker used to hold an executor thread, so the executor was sized
for the largest ``queue.max_pending`` (71 threads) and grew one thread per waiting request. This runs the node
in this process with the executor its ``main()`` builds, on a tiny random checkpoint, sends N ``~/ask``
requests at once from a client in another context (each request carries its own image, so no camera is
needed) and prints the executor's pool threads and the process's threads, idle and at their peak.

    python -m phi3v_spatial.benchmark.node_threads [--requests 8] [--max-new-tokens 256]

Run it with ``PYTHONPATH=<another checkout>`` to measure another version of the node. Set ROS_DOMAIN_ID and
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST as for every ROS process here.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

OLD_EXECUTOR_THREADS = 64 + 1 + 6  # what main() built before the node's callbacks stopped holding threads


def measure(requests: int, max_new_tokens: int, workdir: str) -> dict:
    import numpy as np
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from phi3v_spatial import paths
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.ros import node as node_module
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.srv import AskSpatial

    model = save_random_checkpoint(os.path.join(workdir, "model"), paths.default_model_dir(), seed=0)
    ctx, client_ctx = rclpy.Context(), rclpy.Context()
    rclpy.init(context=ctx)
    rclpy.init(context=client_ctx)
    node = node_module.SpatialNode(context=ctx, parameter_overrides=[
        Parameter("model_path", value=model), Parameter("device", value="cpu"), Parameter("active_adapter", value=""),
        Parameter("image_topics", value=["/node_threads/unused"]), Parameter("queue.max_pending", value=requests),
        Parameter("request_timeout_s", value=600.0)])
    threads = getattr(node_module, "EXECUTOR_THREADS", OLD_EXECUTOR_THREADS)
    executor = MultiThreadedExecutor(num_threads=threads, context=ctx)
    executor.add_node(node)
    prefix = executor._executor._thread_name_prefix + "_"  # the pool's thread names

    client = rclpy.create_node("node_threads_probe", context=client_ctx)
    client_executor = MultiThreadedExecutor(num_threads=2, context=client_ctx)
    client_executor.add_node(client)
    for ex in (executor, client_executor):
        threading.Thread(target=ex.spin, daemon=True).start()
    try:
        end = time.monotonic() + 120
        while node.lifecycle_state != "active" and time.monotonic() < end:
            time.sleep(0.1)
        ask = client.create_client(AskSpatial, "/spatial_node/ask")
        if not ask.wait_for_service(timeout_sec=60):
            raise RuntimeError("~/ask did not come up")
        rng = np.random.default_rng(0)

        def request(i: int, tokens: int) -> AskSpatial.Request:
            img = image_msg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb8", stamp_ns=i + 1)
            return AskSpatial.Request(question=f"where is object {i}?", images=[img], max_new_tokens=tokens)

        def counts() -> tuple[int, int]:
            pool = sum(1 for t in threading.enumerate() if t.name.startswith(prefix))
            return pool, len(os.listdir(f"/proc/{os.getpid()}/task"))

        def call_all(reqs: list, timeout_s: float = 300.0) -> list:
            futures = [ask.call_async(r) for r in reqs]
            end = time.monotonic() + timeout_s
            while not all(f.done() for f in futures) and time.monotonic() < end:
                peak[0] = tuple(map(max, peak[0], counts()))
                time.sleep(0.005)
            return [f.result() if f.done() else AskSpatial.Response(error="no reply") for f in futures]

        peak = [(0, 0)]
        call_all([request(0, 4)])  # warm: the model has run once, the executor has served a request
        time.sleep(0.5)
        idle = counts()
        peak = [idle]
        t0 = time.monotonic()
        replies = call_all([request(i, max_new_tokens) for i in range(requests)])
        return {"executor_threads": threads, "idle": idle, "peak": peak[0], "requests": requests,
                "answered": sum(r.success for r in replies), "errors": sorted({r.error for r in replies if r.error}),
                "seconds": round(time.monotonic() - t0, 2), "node_module": node_module.__file__}
    finally:
        for ex in (executor, client_executor):
            ex.shutdown(timeout_sec=5)
        node.release()
        node.destroy_node()
        client.destroy_node()
        rclpy.try_shutdown(context=ctx)
        rclpy.try_shutdown(context=client_ctx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8, help="requests sent at once (queue.max_pending is set to it)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (longer = longer wait)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        r = measure(args.requests, args.max_new_tokens, work)
    print(f"{r['node_module']}: executor of {r['executor_threads']} threads; {r['requests']} requests at once, "
          f"{r['answered']} answered in {r['seconds']} s" + (f" (errors: {'; '.join(r['errors'])})" if r["errors"] else ""))
    print(f"  executor pool threads: {r['idle'][0]} idle, {r['peak'][0]} peak")
    print(f"  process threads:       {r['idle'][1]} idle, {r['peak'][1]} peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
