"""The engine's work reuse against the naive path, side by side in one process, on the same inputs and weights.

The naive path is ``EngineOptions.naive()``: every request re-encodes its frames, CLIP runs on every crop slot
(zero padding included, as the reference and vLLM do), nothing of the prompt is reused, and a relation is checked
by generating an answer. The engine path is the default options. Both engines share one model object, so the
numbers differ only by the code path. Timings are medians over ``repeat`` runs, naive and engine interleaved.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

RELATIONS = ("left of", "right of", "above", "below", "in front of", "behind", "closer to the camera than",
             "bigger than")


@dataclass
class BenchConfig:
    model: str
    adapters: dict = field(default_factory=dict)
    active_adapter: str = ""
    device: str = "auto"
    dtype: str = "auto"
    num_crops: int | None = None      # crops per frame for the queries (default: the checkpoint's)
    vision_crops: int = 16            # crops for the vision-tower row (the 640x480 at 16 crops)
    frames: int = 1                   # frames per window
    size: tuple = (640, 480)
    candidates: int = 8
    repeat: int = 3
    max_new_tokens: int = 16          # answer length cap for follow-up ask and the naive per-relation generations
    seed: int = 7


@dataclass
class Row:
    name: str
    naive_s: float | None
    engine_s: float
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return self.naive_s / self.engine_s if self.naive_s and self.engine_s > 0 else None


@dataclass
class Target:
    name: str
    value: float
    limit: float
    unit: str = "x"
    op: str = "<="

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit


@dataclass
class BenchResult:
    machine: dict
    setup: dict
    rows: list[Row]
    targets: list[Target]
    memory: dict
    equal_outputs: bool

    def to_json(self) -> dict:
        return {"machine": self.machine, "setup": self.setup, "rows": [asdict(r) | {"speedup": r.speedup} for r in self.rows],
                "targets": [asdict(t) | {"met": t.met} for t in self.targets], "memory": self.memory,
                "equal_outputs": self.equal_outputs}


# ---------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_pair(naive_fn, engine_fn, repeat: int, device: str, before_engine=None, before_naive=None):
    """Median seconds of both paths, interleaved so that machine load drifts hit both alike."""
    a, b = [], []
    for _ in range(repeat):
        if before_naive:
            before_naive()
        a.append(timed(naive_fn, device))
        if before_engine:
            before_engine()
        b.append(timed(engine_fn, device))
    return statistics.median(a), statistics.median(b)


class PeakMemory:
    """Peak resident memory (CPU: sampled RSS) or peak allocated CUDA memory above the level at entry."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._rss()
        self._stop = threading.Event()
        self._max = self._base

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


# ---------------------------------------------------------------------- inputs
def make_window(cfg: BenchConfig):
    """A window of rendered synthetic scenes (camera moving between frames) and candidate relations about it."""
    from ..data.synth import make_scene

    scene = make_scene(cfg.seed, num_objects=4, frames=cfg.frames, size=tuple(cfg.size),
                       motion="camera" if cfg.frames > 1 else "none")
    images = [scene.images[0][f] for f in range(cfg.frames)]
    keys = [("/camera/image_raw", int(s)) for s in scene.stamps_ns]
    names = scene.names
    pairs = [(a, b) for a in names for b in names if a != b]
    from ..engine.parsing import Relation

    cands = [Relation(pairs[i % len(pairs)][0], RELATIONS[i % len(RELATIONS)], pairs[i % len(pairs)][1])
             for i in range(max(cfg.candidates, 4))]
    return images, keys, cands


def node_overhead_s(image_rgb: np.ndarray, processor, repeat: int) -> tuple[float, float, str]:
    """Seconds per frame from a serialized sensor_msgs/Image (bgr8) to the model's input, through the node's code.

    Returns (message -> RGB array, RGB array -> HD crops, note). The first part is deserialisation (what rclpy does
    before the callback), the node's callback payload and the window frame's decode; the second is the HD
    transform the engine runs on a vision-cache miss. Without ROS installed the message part starts at raw bytes.
    """
    from ..engine.window import Frame, RawPayload

    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    h, w = bgr.shape[:2]
    try:
        from rclpy.serialization import deserialize_message, serialize_message
        from sensor_msgs.msg import Image

        from ..ros.messages import raw_payload

        wire = serialize_message(Image(height=h, width=w, encoding="bgr8", step=w * 3, data=bgr.tobytes()))

        def to_rgb():
            return Frame("/camera/image_raw", 0, raw_payload(deserialize_message(wire, Image))).rgb()

        note = "serialized sensor_msgs/Image bgr8 -> deserialize -> window frame -> RGB"
    except ImportError:
        data = bgr.tobytes()

        def to_rgb():
            return Frame("/camera/image_raw", 0, RawPayload("bgr8", h, w, w * 3, data, False)).rgb()

        note = "ROS not importable: raw bgr8 bytes -> window frame -> RGB"
    rgb = to_rgb()
    n = max(5, repeat * 5)
    t_rgb = statistics.median(timed(to_rgb, "cpu") for _ in range(n))
    hd = lambda: processor.image_processor.preprocess_unpadded([rgb])  # noqa: E731
    hd()
    t_hd = statistics.median(timed(hd, "cpu") for _ in range(n))
    return t_rgb, t_hd, note


# ---------------------------------------------------------------------- the benchmark
def run(cfg: BenchConfig, progress=print) -> BenchResult:
    import torch

    from ..engine import prompts
    from ..engine.engine import EngineOptions, SpatialEngine
    from ..model.image_processing_phi3v import Phi3VImageProcessor

    engine = SpatialEngine.from_pretrained(cfg.model, adapters=cfg.adapters or None,
                                           active_adapter=cfg.active_adapter or None, device=cfg.device,
                                           dtype=cfg.dtype, num_crops=cfg.num_crops)
    naive = engine.with_options(EngineOptions.naive())
    dev = engine.device
    images, keys, cands = make_window(cfg)
    c1, others = cands[0], cands[1:]
    many = cands[: cfg.candidates]
    question = "Describe where the objects are."
    follow_ups = [prompts.relation_question(c.subject, c.relation, c.object) for c in others]
    rel_prompts = [prompts.relation_question(c.subject, c.relation, c.object) for c in many]
    mc = engine.model.config
    vc = engine.model.model.vision_embed_tokens.img_processor.vision_model.config
    progress(f"model: {cfg.model} | LM {mc.num_hidden_layers}x{mc.hidden_size}, CLIP {vc.num_hidden_layers}x"
             f"{vc.hidden_size} @ {engine.processor.image_processor.crop_size}px, "
             f"num_crops={engine.processor.num_crops}, adapter={engine.active_adapter or 'none'}, device={dev}, "
             f"dtype={str(engine.dtype).replace('torch.', '')}")

    def cold():
        engine.clear_caches()

    # Warm-up (allocator, thread pools) and the equality check the numbers depend on.
    progress("warm-up and output check ...")
    ref = naive.query_relations(many, images)
    got = engine.query_relations(many, images, frame_keys=keys)
    same = all(abs(a.probability - b.probability) <= 1e-5 for a, b in zip(ref, got))
    a_ref = naive.ask(question, images, max_new_tokens=cfg.max_new_tokens)
    a_got = engine.ask(question, images, max_new_tokens=cfg.max_new_tokens, frame_keys=keys)
    same = same and a_ref.answer == a_got.answer
    rows: list[Row] = []
    R = cfg.repeat

    progress("first query on a new window (1 relation) ...")
    n_first, e_first = median_pair(lambda: naive.query_relations([c1], images),
                                   lambda: engine.query_relations([c1], images, frame_keys=keys), R, dev,
                                   before_engine=cold)
    rows.append(Row("first query, new window (1 relation)", n_first, e_first))

    progress("follow-up queries on the same window ...")
    engine.query_relations([c1], images, frame_keys=keys)  # the window is now known
    it_n, it_e = iter(range(10**9)), iter(range(10**9))  # both paths ask the same sequence of new questions
    n_follow, e_follow = median_pair(lambda: naive.query_relations([others[next(it_n) % len(others)]], images),
                                     lambda: engine.query_relations([others[next(it_e) % len(others)]], images,
                                                                    frame_keys=keys), R, dev)
    rows.append(Row("follow-up query, same window (1 relation)", n_follow, e_follow))

    progress("follow-up question with a generated answer ...")
    n_ask, e_ask = median_pair(lambda: naive.ask(follow_ups[0], images, max_new_tokens=cfg.max_new_tokens),
                               lambda: engine.ask(follow_ups[0], images, max_new_tokens=cfg.max_new_tokens,
                                                  frame_keys=keys), R, dev)
    rows.append(Row(f"follow-up ask, same window (<= {cfg.max_new_tokens} tokens)", n_ask, e_ask))

    progress(f"{len(many)}-candidate relation query ...")
    n_many, e_many = median_pair(
        lambda: [naive.ask(q, images, max_new_tokens=cfg.max_new_tokens) for q in rel_prompts],
        lambda: engine.query_relations(many, images, frame_keys=keys), R, dev, before_engine=cold)
    rows.append(Row(f"{len(many)} relations, new window", n_many, e_many,
                    f"naive: {len(many)} separate generations; engine: one QueryRelations"))
    n_many_fwd = statistics.median(timed(lambda: naive.query_relations(many, images), dev) for _ in range(R))
    rows.append(Row(f"{len(many)} relations, new window (naive = full forward each)", n_many_fwd, e_many))

    progress(f"vision tower, {cfg.size[0]}x{cfg.size[1]} frame at {cfg.vision_crops} crops ...")
    ip = engine.processor.image_processor
    vip = Phi3VImageProcessor(num_crops=cfg.vision_crops, image_mean=ip.image_mean, image_std=ip.image_std,
                              crop_size=ip.crop_size, patch_size=ip.patch_size)
    feats = vip([images[0]])
    pv = feats["pixel_values"].to(dev).to(engine.dtype)
    hc, wc = (int(v) // ip.crop_size for v in feats["image_sizes"][0])
    emb = engine.model.model.vision_embed_tokens
    with torch.inference_mode():
        n_vis, e_vis = median_pair(lambda: emb.image_features(pv, feats["image_sizes"], encode_padding=True),
                                   lambda: emb.image_features(pv, feats["image_sizes"]), R, dev)
    slots = pv.shape[1]
    rows.append(Row(f"vision tower per frame ({1 + hc * wc} of {slots} crop slots real)", n_vis, e_vis,
                    "naive encodes every slot"))

    progress("node overhead per frame ...")
    t_rgb, t_hd, overhead_note = node_overhead_s(images[0], engine.processor, R)
    overhead = t_rgb + t_hd
    frame = f"{cfg.size[0]}x{cfg.size[1]}"
    rows.append(Row(f"node: {frame} message -> RGB frame", None, t_rgb, overhead_note))
    rows.append(Row(f"node: RGB frame -> HD crops ({engine.processor.num_crops} crops, once per frame)", None, t_hd,
                    "the vision cache skips it for frames seen before"))

    progress("peak memory ...")
    with PeakMemory(dev) as m_naive:
        naive.query_relations([c1], images)
        naive.query_relations(many, images)
    cold()
    with PeakMemory(dev) as m_engine:
        engine.query_relations([c1], images, frame_keys=keys)
        engine.query_relations(many, images, frame_keys=keys)
    memory = {"naive_peak_bytes": m_naive.peak, "engine_peak_bytes": m_engine.peak,
              "engine_cache": engine.cache_stats(), "kind": "CUDA allocated" if dev.startswith("cuda") else "process RSS"}

    e2e = e_first
    targets = [
        Target("follow-up query / first query (engine)", e_follow / e_first, 0.25),
        Target(f"{len(many)}-candidate query / 1-relation query (engine, new window)", e_many / e_first, 2.0),
        Target(f"{len(many)} separate generations / {len(many)}-candidate query", n_many / e_many, 4.0, op=">="),
        Target(f"vision tower real crops / all {slots} slots", e_vis / n_vis, 0.8),
        Target("node overhead per frame, message -> model input (ms)", overhead * 1e3, 5.0, unit="ms"),
        Target("node overhead / first-query latency", overhead / e2e, 0.05),
    ]
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else ""}
    setup = {"model": cfg.model, "adapter": engine.active_adapter, "device": dev,
             "dtype": str(engine.dtype).replace("torch.", ""), "num_crops": engine.processor.num_crops,
             "frames": cfg.frames, "size": list(cfg.size), "candidates": len(many), "repeat": R,
             "max_new_tokens": cfg.max_new_tokens}
    return BenchResult(machine, setup, rows, targets, memory, same)


def format_result(res: BenchResult) -> str:
    m, s = res.machine, res.setup
    out = [f"machine: {m['machine']} {m['platform']} | cpus={m['cpus']} torch_threads={m['torch_threads']} "
           f"torch={m['torch']} python={m['python']}" + (f" | GPU {m['gpu']}" if m["gpu"] else ""),
           f"setup: {s['frames']} frame(s) {s['size'][0]}x{s['size'][1]}, num_crops={s['num_crops']}, "
           f"device={s['device']} {s['dtype']}, adapter={s['adapter'] or 'none'}, median of {s['repeat']}",
           f"outputs equal on both paths: {'yes' if res.equal_outputs else 'NO'}", ""]
    w = max(len(r.name) for r in res.rows)
    out.append(f"{'measurement':<{w}}  {'naive':>11}  {'engine':>11}  {'speed-up':>8}")
    for r in res.rows:
        naive = f"{r.naive_s * 1e3:9.1f}ms" if r.naive_s is not None else f"{'-':>11}"
        sp = f"{r.speedup:7.1f}x" if r.speedup else f"{'-':>8}"
        out.append(f"{r.name:<{w}}  {naive}  {r.engine_s * 1e3:9.1f}ms  {sp}" + (f"  ({r.note})" if r.note else ""))
    mem = res.memory
    out += ["", f"peak memory above idle ({mem['kind']}): naive {mem['naive_peak_bytes'] / 2**20:.1f} MiB, "
                f"engine {mem['engine_peak_bytes'] / 2**20:.1f} MiB (caches hold "
                f"{mem['engine_cache']['vision']['bytes'] / 2**20:.2f} MiB image embeddings, "
                f"{mem['engine_cache']['prefix']['bytes'] / 2**20:.2f} MiB prefix KV)", "", "targets:"]
    w = max(len(t.name) for t in res.targets)
    for t in res.targets:
        val = f"{t.value:.2f} {t.unit}" if t.unit != "x" else f"{t.value:.3f}x"
        lim = f"{t.limit:g} {t.unit}" if t.unit != "x" else f"{t.limit:g}x"
        out.append(f"  {t.name:<{w}}  {val:>10}  (target {t.op} {lim})  {'met' if t.met else 'NOT met'}")
    return "\n".join(out)
