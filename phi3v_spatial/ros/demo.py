"""``make demo``: start spatial_node as its own process, feed it two cameras, and ask it things.

What it shows, end to end on a real ROS graph: the node started through its console script with a params
file, a raw camera and a compressed camera publishing a synthetic 3D scene, ``~/ask``, ``~/query_relations``,
a count, a question about two frames of a moving scene (through the node's frame window), and ``~/plan`` goals
with streamed feedback whose steps are executed on the scene's 3D ground truth (``data.executor``); each answer is
printed next to the ground truth.
DDS discovery stays on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) on a random ROS_DOMAIN_ID.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

FRONT = "/demo/front/image_raw"              # sensor_msgs/Image (rgb8)
SIDE = "/demo/side/image_raw/compressed"     # sensor_msgs/CompressedImage (jpeg)
NODE = "/spatial_node"
DEMO_SCENES = 4


def _banner(text: str) -> None:
    line = "=" * 78
    print(f"\n{line}\n{text}\n{line}", flush=True)


def _pick_model(workdir: str) -> tuple[dict, bool]:
    """The embedded model if present, else a freshly built tiny *random* checkpoint (returns params, is_random)."""
    from phi3v_spatial import paths

    model_dir = paths.default_model_dir()
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        params = {"model_path": model_dir}
        if os.path.isdir(paths.default_adapter_dir()):
            params.update(adapters=[f"{paths.EMBEDDED_ADAPTER_NAME}={paths.default_adapter_dir()}"],
                          active_adapter=paths.EMBEDDED_ADAPTER_NAME)
        return params, False
    from phi3v_spatial.model.tiny import save_random_checkpoint

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = os.path.join(os.path.dirname(repo), "shared", "phi3v-tokenizer")
    tok = tok if os.path.isfile(os.path.join(tok, "tokenizer.json")) else None
    out = save_random_checkpoint(os.path.join(workdir, "tiny-random"), tok, seed=0)
    return {"model_path": out or os.path.join(workdir, "tiny-random"), "adapters": [], "active_adapter": ""}, True


def _start_node(params: dict, workdir: str) -> tuple[subprocess.Popen, str]:
    import yaml

    pfile = os.path.join(workdir, "spatial_node_params.yaml")
    with open(pfile, "w") as f:
        yaml.safe_dump({"spatial_node": {"ros__parameters": params}}, f)
    log = os.path.join(workdir, "spatial_node.log")
    exe = os.path.join(os.path.dirname(sys.executable), "spatial_node")
    cmd = [exe, "--ros-args", "--params-file", pfile]
    print(f"starting: {' '.join(cmd)}\n  (node log: {log})", flush=True)
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))
    return proc, log


def _tail(path: str, n: int = 40) -> str:
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return ""


def main() -> int:
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = os.environ.get("PHI3V_DEMO_DOMAIN_ID") or str(random.SystemRandom().randint(10, 99))
    print(f"ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}", flush=True)

    import rclpy
    from lifecycle_msgs.srv import GetState
    from rclpy.action import ActionClient
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image

    import numpy as np

    from phi3v_spatial.data.executor import judge_plan
    from phi3v_spatial.data.plans import PlanMaker, instruction_of
    from phi3v_spatial.data.questions import COUNT_QUESTION, multiframe_records
    from phi3v_spatial.data.synth import make_scene, relation_holds
    from phi3v_spatial.engine import prompts
    from phi3v_spatial.ros.messages import compressed_msg, image_msg
    from phi3v_spatial_interfaces.action import Plan
    from phi3v_spatial_interfaces.msg import ObjectRelation
    from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations

    workdir = tempfile.mkdtemp(prefix="phi3v_demo_")
    model_params, is_random = _pick_model(workdir)
    if is_random:
        _banner("NOTE: the embedded model (models/phi3v-spatial-tiny) is not built, so this demo runs a RANDOM\n"
                "tiny checkpoint built just now. Its answers are MEANINGLESS; only the plumbing is real.\n"
                "Build the embedded model with `make embedded` for meaningful answers.")
    else:
        print(f"model: {model_params['model_path']} (adapter: {model_params.get('active_adapter') or 'none'})")

    params = {**model_params, "image_topics": [FRONT, SIDE], "window.num_frames": 1, "window.max_age_s": 5.0,
              "generation.max_new_tokens": 32, "plan.max_new_tokens": 192, "request_timeout_s": 300.0}
    proc, log = _start_node(params, workdir)

    seed0 = int(os.environ.get("PHI3V_DEMO_SEED") or random.SystemRandom().randint(0, 10**6))
    scenes = [make_scene(seed=seed0 + k, num_objects=(2, 3), cameras=2, size=(160, 120)) for k in range(DEMO_SCENES)]
    print(f"{DEMO_SCENES} fresh synthetic scenes (seeds {seed0}..{seed0 + DEMO_SCENES - 1}; PHI3V_DEMO_SEED repeats them); "
          f"camera 0 -> {FRONT} (raw rgb8), camera 1 -> {SIDE} (jpeg)")
    shown = {"scene": scenes[0], "frame": 0, "since_ns": 0, "paused": False}

    rclpy.init()
    node = rclpy.create_node("spatial_demo")
    # Before the executor spins: rclpy 9.1.2's ActionClient registers with the node before it creates its lock,
    # and an executor spinning on another thread that looks at it in between dies (AttributeError: '_lock').
    plan_client = ActionClient(node, Plan, f"{NODE}/plan")
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    stop = threading.Event()
    rc = 1
    try:
        pub_front = node.create_publisher(Image, FRONT, qos_profile_sensor_data)
        pub_side = node.create_publisher(CompressedImage, SIDE, qos_profile_sensor_data)

        def cameras():
            while not stop.is_set():
                if not shown["paused"]:
                    now = node.get_clock().now().nanoseconds
                    sc, f = shown["scene"], shown["frame"]
                    pub_front.publish(image_msg(sc.images[0][f], "rgb8", now, "front"))
                    if sc.num_cameras > 1:
                        pub_side.publish(compressed_msg(sc.images[1][f], "jpeg", now, "side"))
                stop.wait(0.1)

        threading.Thread(target=cameras, daemon=True).start()

        def call(srv_type, name, req, timeout=300.0):
            cli = node.create_client(srv_type, name)
            if not cli.wait_for_service(timeout_sec=30.0):
                raise RuntimeError(f"service {name} did not appear")
            fut = cli.call_async(req)
            done = threading.Event()
            fut.add_done_callback(lambda f: done.set())
            if not done.wait(timeout):
                raise RuntimeError(f"{name}: no answer in {timeout} s")
            return fut.result()

        print("waiting for the node to load the model and become active ...", flush=True)
        end = time.monotonic() + 300
        state = ""
        while state != "active":
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"spatial_node did not become active (state {state!r}); log tail:\n{_tail(log)}")
            try:
                state = call(GetState, f"{NODE}/get_state", GetState.Request(), 10).current_state.label
            except RuntimeError:
                state = ""
            time.sleep(0.3)
        print("spatial_node is active", flush=True)

        def show(sc, frame=0):
            """Switch the cameras to a scene; requests then wait for a frame stamped after the switch."""
            shown.update(scene=sc, frame=frame, since_ns=node.get_clock().now().nanoseconds, paused=False)

        def fresh(res):
            return res.success and res.frame_stamps and \
                max(t.sec * 10**9 + t.nanosec for t in res.frame_stamps) >= shown["since_ns"]

        def ask_fresh(srv, name, req):
            for _ in range(100):  # frames of the new scene may still be on their way
                res = call(srv, f"{NODE}/{name}", req)
                if fresh(res) or (not res.success and "no frames" not in res.error and "stale" not in res.error):
                    return res
                time.sleep(0.1)
            return res

        tally = {"ask": [0, 0], "query_relations": [0, 0]}
        relations = ("left of", "right of", "closer to the camera than", "bigger than", "in front of")
        for k, scene in enumerate(scenes):
            show(scene)
            names = scene.names
            _banner(f"scene {k + 1}/{len(scenes)}: {', '.join(names)}")
            pairs = [(a, rel, b) for a in names for b in names if a != b for rel in relations
                     if relation_holds(scene, a, rel, b, camera=0) is not None]
            random.Random(seed0 + k).shuffle(pairs)
            print("~/ask (front camera)")
            for a, rel, b in pairs[:2]:
                q = prompts.relation_question(a, rel, b)
                res = ask_fresh(AskSpatial, "ask", AskSpatial.Request(question=q, image_topics=[FRONT]))
                truth = "yes" if relation_holds(scene, a, rel, b, camera=0) else "no"
                if res.success:
                    tally["ask"][0] += res.answer.strip().lower().rstrip(".") == truth
                    tally["ask"][1] += 1
                out = repr(res.answer) if res.success else f"ERROR: {res.error}"
                print(f"  Q: {q}\n     model: {out}   ground truth: {truth}   ({res.latency_s:.2f} s)")
            print("~/query_relations (front camera; P(yes) from the yes/no token probabilities)")
            cands = pairs[2:6]
            res = ask_fresh(QueryRelations, "query_relations", QueryRelations.Request(
                candidates=[ObjectRelation(subject=a, relation=r, object=b) for a, r, b in cands], image_topics=[FRONT]))
            if not res.success:
                print(f"  ERROR: {res.error}")
            for r in res.relations:
                truth = bool(relation_holds(scene, r.subject, r.relation, r.object, camera=0))
                tally["query_relations"][0] += r.holds == truth
                tally["query_relations"][1] += 1
                print(f"  {r.subject} {r.relation} {r.object}: P={r.probability:.3f} holds={str(r.holds).lower():5}  "
                      f"ground truth: {str(truth).lower()}")
        _banner("score against the ground truth")
        for name, (ok, n) in tally.items():
            print(f"  ~/{name}: {ok}/{n} correct")

        scene = scenes[0]
        show(scene)
        _banner("~/ask: a count (front camera)")
        res = ask_fresh(AskSpatial, "ask", AskSpatial.Request(question=COUNT_QUESTION, image_topics=[FRONT]))
        out = repr(res.answer) if res.success else f"ERROR: {res.error}"
        print(f"  Q: {COUNT_QUESTION}\n     model: {out}   ground truth: {len(scene.objects)}")

        _banner("~/ask about two frames of a moving scene (num_frames 2: the node's window sends both)")
        moving = make_scene(seed=seed0 + DEMO_SCENES, num_objects=3, frames=2, motion="object", size=(160, 120))
        questions = [r for r in multiframe_records(moving, ["f0", "f1"], np.random.default_rng(seed0), 4)
                     if r.label is not None][:2]
        # Frame 0 for a second (keyframes are window.min_interval_s apart), then one message of frame 1: the
        # window's newest frame is frame 1 and its keyframe before that frame 0.
        show(moving, 0)
        time.sleep(1.2)
        shown["paused"] = True
        now = node.get_clock().now().nanoseconds
        pub_front.publish(image_msg(moving.images[0][1], "rgb8", now, "front"))
        time.sleep(0.3)
        print(f"  scene: {', '.join(moving.names)}; the {moving.moving} moves {moving.direction} between the frames")
        for r in questions:
            res = call(AskSpatial, f"{NODE}/ask",
                       AskSpatial.Request(question=r.question, image_topics=[FRONT], num_frames=2))
            out = repr(res.answer) if res.success else f"ERROR: {res.error}"
            print(f"  Q: {r.question}\n     model: {out}   ground truth: {r.answer}   "
                  f"(frames used: {len(res.frame_stamps)})")
        show(scene)
        time.sleep(0.5)   # plans take the window's newest frame: let the cameras show this scene again first

        _banner("~/plan action (front camera; feedback streamed; steps executed on the scene's 3D ground truth)")
        if not plan_client.wait_for_server(timeout_sec=30):
            raise RuntimeError("the ~/plan action server did not appear")
        maker = PlanMaker(scene, "", np.random.default_rng(seed0))
        plans = [rec for rec in (maker.draw(k, fam) for k, fam in enumerate(("refer", "multistep", "move"))) if rec]
        last = [0]

        def on_feedback(msg):
            fb = msg.feedback
            if fb.stage == "generating":
                if fb.tokens_generated - last[0] >= 16:
                    last[0] = fb.tokens_generated
                    print(f"  [{fb.tokens_generated:3d} tokens] {fb.partial_text[-70:]!r}", flush=True)
            else:
                print(f"  [{fb.stage}]" + (f" queue position {fb.queue_position}" if fb.queue_position else ""), flush=True)

        def steps_text(steps):
            return "; ".join(f"{s['action']} {s['target']}" + (f" {s['relation']} {s['reference']}" if s.get("reference")
                                                               else "") for s in steps) or "(no steps)"

        plan_ok = 0
        for rec in plans:
            instruction = instruction_of(rec)
            print(f"\ninstruction ({rec.family}): {instruction}")
            last[0] = 0
            done = threading.Event()
            holder = {}

            def on_goal(fut):
                holder["handle"] = fut.result()
                holder["handle"].get_result_async().add_done_callback(
                    lambda f: (holder.update(result=f.result()), done.set()))

            plan_client.send_goal_async(Plan.Goal(instruction=instruction, image_topics=[FRONT]),
                                        feedback_callback=on_feedback).add_done_callback(on_goal)
            if not done.wait(600):
                raise RuntimeError("plan: no result")
            result = holder["result"].result
            truth = steps_text(rec.plan)
            if not result.success:
                print(f"  {result.error}\n  raw text: {result.raw_text[:200]!r}\n  ground truth: {truth}")
                continue
            steps = [{"action": s.action, "target": s.target, "reference": s.reference, "relation": s.relation,
                      "detail": s.detail} for s in result.steps]
            verdict = judge_plan(scene, steps, rec.goal, rec.movable)
            plan_ok += verdict.success
            print(f"  model's plan ({result.latency_s:.2f} s): {steps_text(steps)}\n"
                  f"  executed on the scene: goal holds after execution: {'yes' if verdict.goal_holds else 'no'}; "
                  f"{'SUCCESS' if verdict.success else 'FAILED'} ({verdict.reason})\n  ground truth: {truth}")
        print(f"\nplans that succeeded when executed: {plan_ok}/{len(plans)}")
        if is_random:
            print("\n(REMINDER: random model - the answers above are meaningless; the ground truth is real.)")
        rc = 0
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - a demo reports and exits
        print(f"demo failed: {exc}", file=sys.stderr)
    finally:
        stop.set()
        executor.shutdown(timeout_sec=5)
        node.destroy_node()
        rclpy.try_shutdown()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"spatial_node exited with {proc.returncode}; log: {log}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
