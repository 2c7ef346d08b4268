"""How many threads ``spatial_node`` runs while N requests wait on its model (printed, never asserted).

Why: a request that waits on the inference worker used to hold an executor thread, so the thread count grew
with ``queue.max_pending``. This starts a real node process on a tiny random checkpoint, sends N ``~/ask``
requests at once (each with its own image, so no camera is needed), samples ``/proc/<pid>/task`` every few
milliseconds while they are served, and prints the idle and peak thread counts.

    python -m phi3v_spatial.benchmark.node_threads [--requests 8] [--max-new-tokens 96]

``--node-python`` / ``--node-pythonpath`` run the node from another checkout (to compare with an older version).
Set ROS_DOMAIN_ID and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST as for every ROS process here.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def measure(requests: int, max_new_tokens: int, node_python: str, node_pythonpath: str, workdir: str) -> dict:
    import numpy as np
    import rclpy
    import yaml
    from lifecycle_msgs.srv import GetState
    from rclpy.executors import MultiThreadedExecutor

    from phi3v_spatial import paths
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.ros.messages import image_msg
    from phi3v_spatial_interfaces.srv import AskSpatial

    model = save_random_checkpoint(os.path.join(workdir, "model"), paths.default_model_dir(), seed=0)
    params = os.path.join(workdir, "params.yaml")
    with open(params, "w") as f:
        yaml.safe_dump({"spatial_node": {"ros__parameters": {
            "model_path": model, "device": "cpu", "adapters": [], "active_adapter": "", "image_topics": [],
            "queue.max_pending": requests, "request_timeout_s": 600.0}}}, f)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if node_pythonpath:
        env["PYTHONPATH"] = node_pythonpath
    log = open(os.path.join(workdir, "node.log"), "wb")
    proc = subprocess.Popen([node_python, "-c", "from phi3v_spatial.ros.node import main; raise SystemExit(main())",
                             "--ros-args", "--params-file", params], stdout=log, stderr=subprocess.STDOUT, env=env)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("node_threads_probe", context=ctx)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        state = node.create_client(GetState, "/spatial_node/get_state")
        ask = node.create_client(AskSpatial, "/spatial_node/ask")
        if not (state.wait_for_service(timeout_sec=60) and ask.wait_for_service(timeout_sec=60)):
            raise RuntimeError("spatial_node did not come up")
        end = time.monotonic() + 120
        while time.monotonic() < end:
            f = state.call_async(GetState.Request())
            while not f.done():
                time.sleep(0.05)
            if f.result().current_state.label == "active":
                break
            time.sleep(0.2)
        rng = np.random.default_rng(0)

        def request(i: int, tokens: int) -> AskSpatial.Request:
            img = image_msg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "rgb8", stamp_ns=i + 1)
            return AskSpatial.Request(question=f"where is object {i}?", images=[img], max_new_tokens=tokens)

        def call_all(reqs: list, timeout_s: float = 120.0) -> list:
            futures = [ask.call_async(r) for r in reqs]
            end = time.monotonic() + timeout_s
            while not all(f.done() for f in futures) and time.monotonic() < end:
                time.sleep(0.01)
            return [f.result() if f.done() else AskSpatial.Response(error="no reply") for f in futures]

        call_all([request(0, 4)])  # warm: the model has run once, the executor has served a request
        time.sleep(0.5)
        idle = _threads(proc.pid)
        peak = [idle]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _threads(proc.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        replies = call_all([request(i, max_new_tokens) for i in range(requests)])
        stop.set()
        sampler.join()
        return {"idle_threads": idle, "peak_threads": peak[0], "requests": requests,
                "answered": sum(r.success for r in replies), "errors": sorted({r.error for r in replies if r.error}),
                "seconds": round(time.monotonic() - t0, 2)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        executor.shutdown(timeout_sec=5)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8, help="requests sent at once (queue.max_pending is set to it)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (longer = longer wait)")
    p.add_argument("--node-python", default=sys.executable, help="interpreter that runs the node")
    p.add_argument("--node-pythonpath", default="", help="PYTHONPATH for the node (another checkout)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        r = measure(args.requests, args.max_new_tokens, args.node_python, args.node_pythonpath, work)
    print(f"spatial_node threads: {r['idle_threads']} idle, {r['peak_threads']} peak while {r['requests']} requests "
          f"were served ({r['answered']} answered in {r['seconds']} s{'; errors: ' + '; '.join(r['errors']) if r['errors'] else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
