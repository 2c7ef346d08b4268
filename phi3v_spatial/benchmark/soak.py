"""The soak test (``phi3v-spatial soak``, ``make soak``): a bounded load test against a running ``spatial_node``.

What runs, all on this host (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST):

* a camera process (``python -m phi3v_spatial.benchmark.soak``, a process of its own so that publishing never
  competes with the clients for the GIL): two cameras showing synthetic scenes (``data/synth.py`` rendered by
  ``data/render.py``), one raw ``sensor_msgs/Image`` (rgb8, 640x480 by default) and one ``CompressedImage`` (JPEG),
  each at ``--hz``; the scene changes every few seconds. It reports how many frames it has published.
* three clients (one request in flight each) mixing ``~/ask``, ``~/query_relations``, ``~/set_adapter`` and the
  ``~/plan`` action; a reply that does not come by the request deadline plus a grace is *lost*.
* a lifecycle cycle (``~/change_state``: deactivate, then activate) every ``--cycle-s`` seconds.
* a monitor: the node's RSS and thread count from ``/proc/<pid>/status`` every second, and its ``/diagnostics``
  (camera frames received by the node).

At the end :func:`format_table` prints per request type sent / ok / failed / lost / p50 / p95 / max latency, the RSS
at start, after warm-up and at the end with the trend after warm-up (MiB/min, least squares), the threads, the
camera delivery (frames the node received against frames published while it was subscribed), whether the node's log
has a Traceback and whether a success reply carried NaN. :func:`run_soak` returns a :class:`SoakResult`;
``SoakResult.passed`` is false on a lost request, a traceback, a NaN success or a node that died.

The node is either started here (``start_node``: the embedded model in models/ unless a model path is given, as
``make demo`` does) or an existing one is named (``--node /ns/name``; give ``--pid`` and ``--node-log`` to get its
RSS and the traceback check, and point its ``image_topics`` at the soak cameras).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

KINDS = ("ask", "query_relations", "set_adapter", "plan")
FRONT = "/soak/front/image_raw"               # sensor_msgs/Image (rgb8)
SIDE = "/soak/side/image_raw/compressed"      # sensor_msgs/CompressedImage (jpeg)
MIB = 2**20


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class SoakConfig:
    duration_s: float = 1800.0         # measured time after the warm-up
    warmup_s: float = 300.0            # load runs, RSS not yet in the trend
    node: str = "/spatial_node"        # fully qualified name of the node under test
    start_node: bool = True            # start spatial_node here (else: attach to ``node``)
    model_path: str = ""               # "" = the embedded model in models/ (with its adapter)
    pid: int = 0                       # the node's process id (attach mode; 0 = no RSS)
    node_log: str = ""                 # the node's log (attach mode; "" = no traceback check)
    front: str = FRONT
    side: str = SIDE
    hz: float = 15.0
    width: int = 640
    height: int = 480
    clients: int = 3
    cycle_s: float = 30.0              # lifecycle deactivate/activate period; 0 = none
    request_timeout_s: float = 60.0    # the node's deadline (set on a node started here)
    grace_s: float = 15.0              # no reply by deadline + grace = lost
    max_requests: int = 1_000_000      # all clients together
    max_new_tokens: int = 16           # per ~/ask
    plan_tokens: int = 48              # per ~/plan goal
    weights: tuple = (0.4, 0.3, 0.1, 0.2)  # ask, query_relations, set_adapter, plan
    large_every_s: float = 0.0         # a large transient request every N s (1 MB question / 4 images of 1280x960)
    seed: int = 0
    workdir: str = ""
    node_env: dict = field(default_factory=dict)  # extra environment of a node started here
    camera_profile: str = ""           # FASTDDS_DEFAULT_PROFILES_FILE of the camera process; "" = Fast DDS defaults
    node_params: dict = field(default_factory=dict)  # extra parameters of a node started here
    verbose: bool = False


@dataclass
class Stat:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    lost: int = 0
    nan: int = 0
    latencies: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)   # error text (first 100 chars) -> count

    def add(self, outcome: str, latency: float | None = None, error: str = "", nan: bool = False) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        if latency is not None:
            self.latencies.append(latency)
        if error:
            key = error[:100]
            self.errors[key] = self.errors.get(key, 0) + 1
        self.nan += nan


@dataclass
class SoakResult:
    config: SoakConfig
    stats: dict                      # kind (and "lifecycle") -> Stat
    rss: list                        # (t_s, MiB) samples, t from the start of the load
    threads: list                    # (t_s, count)
    cameras: dict                    # topic -> {"published": n, "received": n or None}
    traceback: bool | None           # None: no log to check
    node_died: bool
    elapsed_s: float
    log_path: str = ""
    inference: dict = field(default_factory=dict)   # the node's last "inference" /diagnostics values
    exit_code: int | None = None     # of a node started here, after the soak stopped it with SIGINT (0 expected)

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.stats.values())

    @property
    def nan_success(self) -> int:
        return sum(s.nan for s in self.stats.values())

    @property
    def passed(self) -> bool:
        return (self.lost == 0 and not self.traceback and self.nan_success == 0 and not self.node_died
                and self.exit_code in (None, 0))

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{self.lost} request(s) lost (no reply by deadline + {self.config.grace_s:g} s)")
        if self.traceback:
            out.append(f"the node's log has a Traceback ({self.log_path})")
        if self.nan_success:
            out.append(f"{self.nan_success} success reply(ies) carried NaN")
        if self.node_died:
            out.append("the node process died")
        if self.exit_code not in (None, 0):
            out.append(f"the node exited with {self.exit_code} when stopped with SIGINT")
        return out


# ---------------------------------------------------------------------------------------------------- numbers
def percentile(values: list, q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def slope_per_min(samples: list, after_s: float) -> float | None:
    """Least-squares slope of (t_s, value) samples with t >= after_s, per minute."""
    pts = [(t, v) for t, v in samples if t >= after_s]
    if len(pts) < 3:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in pts) / den


def proc_status(pid: int) -> tuple[float, int] | None:
    """(VmRSS in MiB, Threads) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    rss = threads = None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024.0
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return (rss, threads) if rss is not None and threads is not None else None


def has_nan(*values) -> bool:
    return any(isinstance(v, float) and math.isnan(v) for v in values)


def log_has_traceback(path: str) -> bool | None:
    if not path:
        return None
    try:
        with open(path, errors="replace") as f:
            return "Traceback (most recent call last)" in f.read()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- table
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _at(samples: list, t: float) -> float | None:
    """The first sample at or after t (else the last)."""
    for s_t, v in samples:
        if s_t >= t:
            return v
    return samples[-1][1] if samples else None


def table_rows(r: SoakResult) -> tuple[list, list]:
    """(request rows, summary rows): the request rows have a header row first."""
    rows = [["request", "sent", "ok", "failed", "lost", "p50 ms", "p95 ms", "max ms"]]
    for kind in (*KINDS, "large", "lifecycle"):
        s = r.stats.get(kind)
        if s is None:
            continue
        lat = s.latencies
        rows.append([kind, str(s.sent), str(s.ok), str(s.failed), str(s.lost), _ms(percentile(lat, 0.5)),
                     _ms(percentile(lat, 0.95)), _ms(max(lat) if lat else None)])
    w = r.config.warmup_s
    summary = []
    if r.rss:
        start, warm, end = r.rss[0][1], _at(r.rss, w), r.rss[-1][1]
        slope = slope_per_min(r.rss, w)
        change = f" ({(end - warm) / warm * 100:+.1f}% after warm-up)" if warm else ""
        summary.append(["node RSS MiB (start / after warm-up / end)", f"{start:.0f} / {warm:.0f} / {end:.0f}{change}"])
        summary.append(["RSS trend after warm-up", "-" if slope is None else f"{slope:+.2f} MiB/min"])
        summary.append(["RSS max after warm-up", f"{max(v for t, v in r.rss if t >= w) if any(t >= w for t, _ in r.rss) else end:.0f} MiB"])
    else:
        summary.append(["node RSS", "not measured (no pid)"])
    if r.threads:
        ts = slope_per_min(r.threads, w)
        summary.append(["node threads (start / after warm-up / end, max)",
                        f"{r.threads[0][1]} / {_at(r.threads, w)} / {r.threads[-1][1]}, max {max(v for _, v in r.threads)}"])
        summary.append(["thread trend after warm-up", "-" if ts is None else f"{ts:+.2f} /min"])
    caches = [f"{name} {int(r.inference[f'cache.{name}.bytes']) / MIB:.1f} MiB in {r.inference.get(f'cache.{name}.entries', '?')}"
              f" entries, {r.inference.get(f'cache.{name}.evictions', '?')} evictions"
              for name in ("vision", "prefix") if r.inference.get(f"cache.{name}.bytes", "").isdigit()]
    if caches:
        summary.append(["node caches at the end", "; ".join(caches)])
    summary.append(["camera process's Fast DDS profile", r.config.camera_profile or "Fast DDS defaults"])
    for topic, c in r.cameras.items():
        pub, rec = c.get("published", 0), c.get("received")
        if rec is None:
            text = f"{pub} published, received unknown (no /diagnostics from the node)"
        else:
            text = f"{rec} received / {pub} published while subscribed" + (f" = {100 * rec / pub:.1f}%" if pub else "")
            if c.get("node_says"):
                text += f" (the node's /diagnostics: delivered_pct {c['node_says']})"
        summary.append([f"camera {topic}", text])
    summary.append(["Traceback in node log", "not checked (no log)" if r.traceback is None else ("YES" if r.traceback else "no")])
    summary.append(["success replies carrying NaN", str(r.nan_success)])
    summary.append(["node died", "YES" if r.node_died else "no"])
    if r.exit_code is not None:
        summary.append(["node exit status after SIGINT", str(r.exit_code)])
    summary.append(["elapsed", f"{r.elapsed_s:.0f} s (warm-up {w:g} s + {r.config.duration_s:g} s)"])
    summary.append(["verdict", "PASS" if r.passed else "FAIL: " + "; ".join(r.problems())])
    return rows, summary


def format_table(r: SoakResult) -> str:
    rows, summary = table_rows(r)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    kw = max(len(k) for k, _ in summary)
    lines += [""] + [f"{k.ljust(kw)}  {v}" for k, v in summary]
    errs = [(k, e, n) for k, s in r.stats.items() for e, n in s.errors.items()]
    if errs:
        lines += ["", "failure reasons (count):"]
        lines += [f"  {k}: {n} x {e}" for k, e, n in sorted(errs, key=lambda x: -x[2])[:12]]
    return "\n".join(lines)


def format_markdown(r: SoakResult) -> str:
    rows, summary = table_rows(r)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    md += ["", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary]
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------------- cameras
def camera_main(argv: list[str]) -> int:
    """The camera process: publish the two cameras until SIGINT/SIGTERM; prints one JSON line with the scenes'
    object names at start, then ``published <front> <side>`` lines (cumulative counts) every 0.2 s."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--front", default=FRONT)
    p.add_argument("--side", default=SIDE)
    p.add_argument("--hz", type=float, default=15.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--scene-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import CompressedImage, Image

    from phi3v_spatial.data.synth import make_scene
    from phi3v_spatial.ros.messages import compressed_msg, image_msg

    scenes = [make_scene(seed=a.seed + k, num_objects=(2, 4), cameras=2, size=(a.width, a.height))
              for k in range(a.scenes)]
    raw = [image_msg(sc.images[0][0], "rgb8", 0, "soak_front") for sc in scenes]
    jpg = [compressed_msg(sc.images[1][0], "jpeg", 0, "soak_side") for sc in scenes]
    print(json.dumps({"names": [sc.names for sc in scenes]}), flush=True)

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("soak_cameras")
    pub_raw = node.create_publisher(Image, a.front, qos_profile_sensor_data)
    pub_jpg = node.create_publisher(CompressedImage, a.side, qos_profile_sensor_data)
    counts = [0, 0]
    period = 1.0 / a.hz
    t0 = time.monotonic()
    nxt, report = t0, t0
    try:
        while not stop.is_set():
            k = int((time.monotonic() - t0) / a.scene_s) % len(scenes)
            stamp = node.get_clock().now().to_msg()
            for msg, pub, i in ((raw[k], pub_raw, 0), (jpg[k], pub_jpg, 1)):
                msg.header.stamp = stamp
                pub.publish(msg)
                counts[i] += 1
            now = time.monotonic()
            if now >= report:
                print(f"published {counts[0]} {counts[1]}", flush=True)
                report = now + 0.2
            nxt += period
            if nxt < now - 1.0:  # fell far behind (a loaded machine): do not burst
                nxt = now
            stop.wait(max(0.0, nxt - time.monotonic()))
        print(f"published {counts[0]} {counts[1]}", flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


class CameraProcess:
    """The camera process and its published counts (read from its stdout)."""

    def __init__(self, cfg: SoakConfig, env: dict):
        cmd = [sys.executable, "-m", "phi3v_spatial.benchmark.soak", "--front", cfg.front, "--side", cfg.side,
               "--hz", str(cfg.hz), "--width", str(cfg.width), "--height", str(cfg.height), "--seed", str(cfg.seed)]
        if cfg.camera_profile:  # the publisher's shared-memory segment decides whether raw frames arrive
            env = dict(env, FASTDDS_DEFAULT_PROFILES_FILE=cfg.camera_profile)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.names: list[list[str]] = []
        self.counts = (0, 0)
        self.ready = threading.Event()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("published "):
                _, f, s = line.split()
                self.counts = (int(f), int(s))
            elif line.startswith("{"):
                self.names = json.loads(line)["names"]
                self.ready.set()
            else:
                self.output.append(line)
                self.output = self.output[-50:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---------------------------------------------------------------------------------------------------- the node
def start_node(cfg: SoakConfig, env: dict) -> tuple[subprocess.Popen, str]:
    """``spatial_node --ros-args --params-file`` (as ``make demo``), its log in the workdir."""
    import yaml

    from phi3v_spatial import paths

    params = {"image_topics": [cfg.front, cfg.side], "window.num_frames": 1, "window.max_age_s": 5.0,
              "generation.max_new_tokens": cfg.max_new_tokens, "plan.max_new_tokens": cfg.plan_tokens,
              "request_timeout_s": cfg.request_timeout_s, "queue.max_pending": max(4, cfg.clients + 1)}
    if cfg.model_path:
        params.update(model_path=cfg.model_path, adapters=[], active_adapter="")
    else:
        params["model_path"] = paths.default_model_dir()
        if os.path.isdir(paths.default_adapter_dir()):
            params.update(adapters=[f"{paths.EMBEDDED_ADAPTER_NAME}={paths.default_adapter_dir()}"],
                          active_adapter=paths.EMBEDDED_ADAPTER_NAME)
    params.update(cfg.node_params)
    pfile = os.path.join(cfg.workdir, "spatial_node_params.yaml")
    with open(pfile, "w") as f:
        yaml.safe_dump({"spatial_node": {"ros__parameters": params}}, f)
    log = os.path.join(cfg.workdir, "spatial_node.log")
    exe = os.path.join(os.path.dirname(sys.executable), "spatial_node")
    node_env = dict(env, PYTHONUNBUFFERED="1", RCUTILS_LOGGING_BUFFERED_STREAM="0", **cfg.node_env)
    name = cfg.node.rstrip("/").rsplit("/", 1)
    ros_args = ["-r", f"__node:={name[-1]}"] + (["-r", f"__ns:={name[0]}"] if len(name) == 2 and name[0] else [])
    proc = subprocess.Popen([exe, "--ros-args", "--params-file", pfile, *ros_args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=node_env)
    return proc, log


# ---------------------------------------------------------------------------------------------------- the load
class Load:
    """Three (``clients``) request loops, the lifecycle cycle and the monitor, on one rclpy context."""

    def __init__(self, cfg: SoakConfig, names: list[list[str]], pid: int, cam_counts=lambda: (0, 0)):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from rcl_interfaces.srv import GetParameters
        from rclpy.action import ActionClient
        from rclpy.executors import MultiThreadedExecutor

        from phi3v_spatial_interfaces.action import Plan
        from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations, SetAdapter

        self.cfg, self.names, self.pid = cfg, names or [["red cube", "blue sphere"]], pid
        self.types = {"ask": AskSpatial, "query_relations": QueryRelations, "set_adapter": SetAdapter,
                      "change_state": ChangeState, "get_state": GetState, "get_parameters": GetParameters}
        self.Plan = Plan
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.nodes, self.clients, self.plan_clients = [], [], []
        base = cfg.node.rstrip("/")
        for i in range(cfg.clients):
            n = rclpy.create_node(f"soak_client_{i}", context=self.context)
            self.nodes.append(n)
            # ActionClient before the executor spins (rclpy 9.1.2 registers it before creating its lock)
            self.plan_clients.append(ActionClient(n, Plan, f"{base}/plan"))
            self.clients.append({k: n.create_client(self.types[k], f"{base}/{k}")
                                 for k in ("ask", "query_relations", "set_adapter")})
        self.ctl = rclpy.create_node("soak_control", context=self.context)
        self.change_state = self.ctl.create_client(ChangeState, f"{base}/change_state")
        self.get_state = self.ctl.create_client(GetState, f"{base}/get_state")
        self.get_params = self.ctl.create_client(GetParameters, f"{base}/get_parameters")
        self.diag: dict[str, dict] = {}
        self.inference: dict[str, str] = {}   # the node's "inference" diagnostics (caches, counters)
        self.ctl.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        for n in (*self.nodes, self.ctl):
            self.executor.add_node(n)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        self.stats = {k: Stat() for k in (*KINDS, "lifecycle")}
        if cfg.large_every_s > 0:
            self.stats["large"] = Stat()
            self.large_client = self.ctl.create_client(AskSpatial, f"{base}/ask")
        self.lock = threading.Lock()
        self.rss: list = []
        self.threads: list = []
        self.sent_total = 0
        self.stop_sending = threading.Event()
        self.adapters = ["", "none"]
        self.node_topics: list | None = None   # the node's image_topics parameter
        self.cam_counts = cam_counts
        self.inactive_pub = [0, 0]     # frames published while the node was deactivated (not subscribed)
        self.measuring = False
        self.diag_marks: list = []     # (received per camera, published per camera, inactive_pub) at each /diagnostics

    def _on_diag(self, msg) -> None:
        prefix = self.cfg.node.rstrip("/") + ": camera "
        got = {}
        for st in msg.status:
            if st.name == self.cfg.node.rstrip("/") + ": inference":
                self.inference = {kv.key: kv.value for kv in st.values}
            if st.name.startswith(prefix):
                got[st.name[len(prefix):]] = {kv.key: kv.value for kv in st.values}
        self.diag.update(got)
        rec = [got.get(t, {}).get("received", "") for t in (self.cfg.front, self.cfg.side)]
        if self.measuring and all(r.isdigit() for r in rec):
            with self.lock:
                self.diag_marks.append(([int(r) for r in rec], list(self.cam_counts()), list(self.inactive_pub)))

    def delivery(self) -> dict:
        """topic -> {"published", "received"} between the first and the last /diagnostics of the measurement, not
        counting frames published while the node was deactivated."""
        with self.lock:
            marks = list(self.diag_marks)
        out = {}
        for k, topic in enumerate((self.cfg.front, self.cfg.side)):
            if len(marks) < 2:
                out[topic] = {"published": self.cam_counts()[k], "received": None}
                continue
            (r0, p0, i0), (r1, p1, i1) = marks[0], marks[-1]
            out[topic] = {"published": (p1[k] - p0[k]) - (i1[k] - i0[k]), "received": r1[k] - r0[k],
                          "node_says": self.diag.get(topic, {}).get("delivered_pct", "")}
        return out

    # -- waiting on rclpy futures without spinning here
    @staticmethod
    def _wait(fut, timeout: float) -> bool:
        done = threading.Event()
        fut.add_done_callback(lambda _f: done.set())
        return done.wait(timeout)

    def call(self, client, req, timeout: float):
        fut = client.call_async(req)
        if self._wait(fut, timeout):
            return fut.result()
        client.remove_pending_request(fut)
        return None

    def wait_active(self, timeout: float, proc=None) -> str:
        from lifecycle_msgs.srv import GetState

        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                return "died"
            if self.get_state.wait_for_service(timeout_sec=1.0):
                res = self.call(self.get_state, GetState.Request(), 5.0)
                state = res.current_state.label if res else state
                if state == "active":
                    return state
            time.sleep(0.3)
        return state

    def read_adapter(self) -> None:
        from rcl_interfaces.srv import GetParameters

        res = self.call(self.get_params, GetParameters.Request(names=["active_adapter", "image_topics"]), 10.0) \
            if self.get_params.wait_for_service(timeout_sec=5.0) else None
        active = res.values[0].string_value if res and res.values else ""
        self.adapters = [active, "none"] if active else ["", "none"]
        self.node_topics = list(res.values[1].string_array_value) if res and len(res.values) > 1 else None

    # -- requests
    def _deadline(self) -> float:
        return self.cfg.request_timeout_s + self.cfg.grace_s

    def _record(self, kind: str, outcome: str, latency=None, error="", nan=False) -> None:
        with self.lock:
            self.stats[kind].add(outcome, latency, error, nan)

    def _one(self, i: int, rng: random.Random, count: int) -> str:
        from phi3v_spatial_interfaces.msg import ObjectRelation

        kind = rng.choices(KINDS, weights=self.cfg.weights)[0]
        names = rng.choice(self.names)
        a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], names[0])
        topics = rng.choice([[self.cfg.front], [self.cfg.side], [self.cfg.front, self.cfg.side]])
        with self.lock:
            self.stats[kind].sent += 1
        t0 = time.monotonic()
        if kind == "plan":
            return self._plan(i, a, b, topics, t0)
        T = self.types[kind]
        if kind == "ask":
            req = T.Request(question=rng.choice([f"Is the {a} left of the {b}?", f"Where is the {a}?",
                                                 "How many objects are there?", f"Is the {a} bigger than the {b}?"]),
                            image_topics=topics, max_new_tokens=self.cfg.max_new_tokens)
        elif kind == "query_relations":
            rels = ("left of", "right of", "closer to the camera than", "bigger than", "in front of")
            req = T.Request(candidates=[ObjectRelation(subject=x, relation=r, object=y)
                                        for x, y in ((a, b), (b, a)) for r in rng.sample(rels, 2)], image_topics=topics)
        else:
            req = T.Request(name=self.adapters[count % len(self.adapters)], scale=rng.choice([0.0, 1.0, 0.5]))
        res = self.call(self.clients[i][kind], req, self._deadline())
        dt = time.monotonic() - t0
        if res is None:
            self._record(kind, "lost", error=f"no reply in {self._deadline():g} s")
            return "lost"
        if not res.success:
            self._record(kind, "failed", dt, res.error)
            return "failed"
        floats = [getattr(res, "latency_s", 0.0)] + [r.probability for r in getattr(res, "relations", [])]
        self._record(kind, "ok", dt, nan=has_nan(*floats))
        return "ok"

    def _plan(self, i: int, a: str, b: str, topics: list, t0: float) -> str:
        Plan = self.Plan
        goal = Plan.Goal(instruction=f"Put the {a} to the left of the {b}.", image_topics=topics,
                         max_new_tokens=self.cfg.plan_tokens)
        done = threading.Event()
        holder: dict = {}

        def on_result(f):
            holder["result"] = f.result()
            done.set()

        def on_goal(f):
            handle = holder["handle"] = f.result()
            if not handle.accepted:
                done.set()
                return
            handle.get_result_async().add_done_callback(on_result)

        self.plan_clients[i].send_goal_async(goal).add_done_callback(on_goal)
        if not done.wait(self._deadline()):
            self._record("plan", "lost", error=f"no result in {self._deadline():g} s")
            return "lost"
        dt = time.monotonic() - t0
        if "result" not in holder:
            self._record("plan", "failed", dt, "goal rejected")
            return "failed"
        res = holder["result"].result
        if not res.success:
            self._record("plan", "failed", dt, res.error)
            return "failed"
        self._record("plan", "ok", dt, nan=has_nan(res.latency_s))
        return "ok"

    def client_loop(self, i: int, end: float) -> None:
        rng = random.Random(self.cfg.seed * 1000 + i)
        count = 0
        if not (all(c.wait_for_service(timeout_sec=30.0) for c in self.clients[i].values())
                and self.plan_clients[i].wait_for_server(timeout_sec=30.0)):
            return
        while time.monotonic() < end and not self.stop_sending.is_set():
            with self.lock:
                if self.sent_total >= self.cfg.max_requests:
                    return
                self.sent_total += 1
            try:
                if self._one(i, rng, count) == "failed":
                    time.sleep(0.1)  # a refused request (node inactive) comes back at once: do not spin on it
            except Exception as exc:  # noqa: BLE001 - a client-side bug must show, not stop the soak silently
                print(f"soak client {i}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.5)
            count += 1

    def lifecycle_loop(self, end: float) -> None:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        if self.cfg.cycle_s <= 0:
            return
        nxt = time.monotonic() + self.cfg.cycle_s
        mark = None
        while not self.stop_sending.wait(max(0.0, nxt - time.monotonic())) and time.monotonic() < end:
            nxt += self.cfg.cycle_s
            for tid, pause in ((Transition.TRANSITION_DEACTIVATE, 1.0), (Transition.TRANSITION_ACTIVATE, 0.0)):
                with self.lock:
                    self.stats["lifecycle"].sent += 1
                t0 = time.monotonic()
                res = self.call(self.change_state, ChangeState.Request(transition=Transition(id=tid)), 30.0)
                dt = time.monotonic() - t0
                if res is None:
                    self._record("lifecycle", "lost", error="change_state: no reply in 30 s")
                elif res.success:
                    self._record("lifecycle", "ok", dt)
                    if tid == Transition.TRANSITION_DEACTIVATE:
                        mark = self.cam_counts()
                    elif mark is not None:
                        now = self.cam_counts()
                        with self.lock:
                            self.inactive_pub = [self.inactive_pub[k] + now[k] - mark[k] for k in range(2)]
                else:
                    self._record("lifecycle", "failed", dt, f"transition {tid} refused")
                time.sleep(pause)

    def large_loop(self, end: float) -> None:
        """Every ``large_every_s``: an ~/ask with a 1 MB question, then one carrying four 1280x960 images, in turn
        (transient memory the node must give back; a refusal is fine, a lost reply is not)."""
        import numpy as np

        from phi3v_spatial.ros.messages import image_msg

        if self.cfg.large_every_s <= 0 or not self.large_client.wait_for_service(timeout_sec=30.0):
            return
        T = self.types["ask"]
        rng = np.random.default_rng(self.cfg.seed)
        images = [image_msg(rng.integers(0, 256, (960, 1280, 3), dtype=np.uint8), "rgb8", k + 1) for k in range(4)]
        requests = [T.Request(question="Where is the cube? " * 55000, image_topics=[self.cfg.front], max_new_tokens=4),
                    T.Request(question="Is the red cube left of the blue sphere?", images=images, max_new_tokens=4)]
        k = 0
        while not self.stop_sending.wait(self.cfg.large_every_s) and time.monotonic() < end:
            with self.lock:
                self.stats["large"].sent += 1
            t0 = time.monotonic()
            res = self.call(self.large_client, requests[k % 2], self._deadline())
            k += 1
            if res is None:
                self._record("large", "lost", error=f"no reply in {self._deadline():g} s")
            elif res.success:
                self._record("large", "ok", time.monotonic() - t0, nan=has_nan(res.latency_s))
            else:
                self._record("large", "failed", time.monotonic() - t0, res.error)

    def monitor_loop(self, t0: float, stop: threading.Event) -> None:
        while True:
            if self.pid:
                st = proc_status(self.pid)
                if st is not None:
                    t = time.monotonic() - t0
                    self.rss.append((t, st[0]))
                    self.threads.append((t, st[1]))
            if stop.wait(1.0):
                return

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=5)
        for n in (*self.nodes, self.ctl):
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)


def run_soak(cfg: SoakConfig, out=sys.stdout) -> SoakResult:
    """Run the soak (start the node unless attaching), return the result; the caller prints / writes the table."""
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(10, 99)))
    env = dict(os.environ)
    cfg.workdir = cfg.workdir or tempfile.mkdtemp(prefix="phi3v_soak_")
    os.makedirs(cfg.workdir, exist_ok=True)
    say(f"soak: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}; node {cfg.node}; "
        f"warm-up {cfg.warmup_s:g} s + {cfg.duration_s:g} s; {cfg.clients} clients; cameras {cfg.width}x{cfg.height} "
        f"rgb8 + jpeg at {cfg.hz:g} Hz; lifecycle cycle every {cfg.cycle_s:g} s; workdir {cfg.workdir}")
    proc, log, pid = None, cfg.node_log, cfg.pid
    cams = load = result = None
    died = False
    t_start = time.monotonic()
    try:
        if cfg.start_node:
            proc, log = start_node(cfg, env)
            pid = proc.pid
            say(f"started spatial_node (pid {pid}, log {log})")
        cams = CameraProcess(cfg, env)
        if not cams.ready.wait(120):
            raise RuntimeError("the camera process did not start:\n" + "".join(cams.output))
        load = Load(cfg, cams.names, pid, lambda: cams.counts)
        state = load.wait_active(600.0, proc)
        if state != "active":
            tail = "".join(open(log, errors="replace").readlines()[-15:]) if log and os.path.isfile(log) else ""
            raise RuntimeError(f"{cfg.node} did not become active (state {state!r})" + (f"; log tail:\n{tail}" if tail else ""))
        load.read_adapter()
        say(f"{cfg.node} is active; set_adapter alternates {load.adapters}; load starts")
        missing = [t for t in (cfg.front, cfg.side) if load.node_topics is not None
                   and not any(t == n.strip().split(":")[0] for n in load.node_topics)]
        if missing:
            say(f"WARNING: {cfg.node}'s image_topics {load.node_topics} lack {missing}: requests on them will fail")
        t0 = time.monotonic()
        end = t0 + cfg.warmup_s + cfg.duration_s
        mon_stop = threading.Event()
        mon = threading.Thread(target=load.monitor_loop, args=(t0, mon_stop), daemon=True)
        mon.start()
        load.measuring = True
        workers = [threading.Thread(target=load.client_loop, args=(i, end), daemon=True) for i in range(cfg.clients)]
        workers.append(threading.Thread(target=load.lifecycle_loop, args=(end,), daemon=True))
        workers.append(threading.Thread(target=load.large_loop, args=(end,), daemon=True))
        for w in workers:
            w.start()
        last_report = t0
        while any(w.is_alive() for w in workers):
            time.sleep(0.25)
            if (proc is not None and proc.poll() is not None) or (proc is None and pid and proc_status(pid) is None):
                died = True
                load.stop_sending.set()
                say(f"spatial_node exited" + (f" with {proc.returncode}" if proc is not None else ""))
                break
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                with load.lock:
                    sent = sum(s.sent for s in load.stats.values())
                rss = f"RSS {load.rss[-1][1]:.0f} MiB, {load.threads[-1][1]} threads, " if load.rss else ""
                say(f"  t={last_report - t0:5.0f} s: {sent} requests sent, {rss}"
                    f"published {cams.counts[0]}/{cams.counts[1]}")
        for w in workers:
            w.join(load._deadline() + 5)
        mon_stop.set()
        mon.join(5)
        time.sleep(1.5)  # one more /diagnostics
        elapsed = time.monotonic() - t0
        result = SoakResult(cfg, load.stats, load.rss, load.threads, load.delivery(), log_has_traceback(log), died,
                            elapsed, log, dict(load.inference))
        return result
    finally:
        if load is not None:
            load.stop_sending.set()
            load.close()
        if cams is not None:
            cams.stop()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if result is not None and proc is not None:
            result.traceback = log_has_traceback(log)   # the node's stop counts too
            result.exit_code = proc.returncode
        say(f"soak finished after {time.monotonic() - t_start:.0f} s" + (f"; node log: {log}" if log else ""))


if __name__ == "__main__":
    raise SystemExit(camera_main(sys.argv[1:]))
