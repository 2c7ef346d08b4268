#!/usr/bin/env python3
"""The CUDA paths and real-size speed of phi3v_spatial, checked in one short run on a GPU machine.

GPU machines are rare here (minutes at a time, start-up included), so this is one command that needs no ROS, no
download and no install (the package on PYTHONPATH), sized to finish within 8 minutes (``--budget-s`` 450 s for the
sections, counted from the start; a watchdog at 470 s):

* builds a real-size Phi-3.5-vision model (the official config, random weights) directly on the GPU in bfloat16;
* runs the engine's real paths on it: SDPA, float16 and bfloat16, eager vs SDPA, pinned upload, the vision /
  prefix caches, batched relation scoring, streaming and cancel, flash-attention-2 and bitsandbytes 8/4-bit when
  they import, a LoRA adapter (PEFT);
* measures, for one 640x480 frame at 4 crops and for a 2-frame window: time to first token, greedy decode tokens/s,
  a 1-relation and an 8-candidate QueryRelations, a follow-up on the same window and peak GPU memory; and how far
  bf16 (fp16, eager, ...) is from fp32 (greedy tokens on 3 prompts, max |dP(yes)| on 8 relations);
* prints one table: the GPU, the versions, and each figure beside its roofline (max of FLOPs / peak bf16 FLOP/s
  and bytes moved / memory bandwidth, from a small table of known GPUs; "unknown" otherwise).

Every section is guarded and has its own time budget: a failure or an overrun is a row in the table and the next
section runs. A watchdog prints what finished if a call hangs. Without CUDA it prints "no CUDA device: skipped"
and exits 0. ``--device cpu --small`` runs every section on a small config (CUDA-only calls are reported as
skipped) in seconds: the test suite runs that, so the rare GPU run only meets code that already ran.

Random weights: the numbers are speed and numerics, not answers. The lm_head rows of the stop tokens (and of ids
the tokenizer does not have) are zeroed so that greedy decoding runs its full token count on a real-token stream.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

T_START = time.monotonic()  # the budget counts from here, imports included
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python scripts/gpu_check.py` works without PYTHONPATH too
    sys.path.insert(0, REPO_ROOT)

SKIP_LINE = "no CUDA device: skipped"
FRAME_SIZE = (640, 480)
NUM_CROPS = 4
OBJECTS = ("red box", "blue box", "green box", "yellow box")
PROMPTS = ("Describe where the objects are.", "What is left of the red box?",
           "Put the red box next to the blue box. What do you do first?")

# config.json of microsoft/Phi-3.5-vision-instruct (../shared/phi3v-configs), without its remote-code auto_map.
# A copy in code because ../shared does not travel to the GPU machine; a test compares it with the file.
PHI35_VISION_CONFIG = {
    "_name_or_path": "Phi-3.5-vision-instruct", "architectures": ["Phi3VForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                   "use_hd_transform": True, "with_learnable_separator": True},
    "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 3072,
    "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                      "name": "clip_vision_model", "num_img_tokens": 144},
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3_v",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "long_factor": [
            1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
            1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
            4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
            17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
            32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
            50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
            62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
            63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
            64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
            64.51000213623047, 64.52999877929688, 64.83999633789062],
        "short_factor": [
            1.08, 1.1, 1.1300000000000001, 1.2800000000000002, 1.3100000000000003, 1.4500000000000004,
            1.4500000000000004, 1.9500000000000008, 2.030000000000001, 2.4299999999999926, 2.5699999999999896,
            2.9499999999999815, 3.729999999999965, 3.869999999999962, 4.189999999999955, 4.43999999999995,
            4.6399999999999455, 4.979999999999938, 5.159999999999934, 5.279999999999932, 5.759999999999922,
            5.889999999999919, 5.889999999999919, 5.969999999999917, 6.089999999999915, 6.2799999999999105,
            6.7699999999999, 6.8899999999998975, 7.109999999999893, 7.129999999999892, 7.179999999999891,
            7.289999999999889, 7.339999999999888, 7.559999999999883, 7.619999999999882, 7.69999999999988,
            7.879999999999876, 7.879999999999876, 7.879999999999876, 7.939999999999875, 7.949999999999875,
            7.979999999999874, 8.19999999999987, 8.439999999999864, 8.469999999999864, 8.589999999999861,
            8.809999999999857, 8.999999999999853],
        "type": "su"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1", "use_cache": True, "vocab_size": 32064,
    "_attn_implementation": "flash_attention_2",
}


def small_config() -> dict:
    """The official config with small dimensions (same keys, LongRoPE factors subsampled): the smoke-test model."""
    cfg = copy.deepcopy(PHI35_VISION_CONFIG)
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    for key in ("long_factor", "short_factor"):  # head_dim 16 -> 8 factors
        cfg["rope_scaling"][key] = cfg["rope_scaling"][key][::6]
    cfg["img_processor"].update(image_size=56, patch_size=14, hidden_size=32, image_dim_out=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, num_img_tokens=4, layer_idx=-2)
    return cfg


# ---------------------------------------------------------------------- known GPUs and the roofline
@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures: memory bandwidth (GB/s) and dense bf16 tensor FLOP/s (no sparsity, fp32 accumulate)."""

    name: str
    bandwidth_gbs: float
    bf16_tflops: float


# Datasheet figures by what torch's device name contains (lowercase) and must not contain, and the least memory
# (GiB) the device reports; the first match wins. Jetson: torch names every Orin "Orin", so only the 64 GB AGX is
# listed (170 sparse INT8 TOPS -> 42.5 dense bf16 TFLOP/s).
KNOWN_GPUS = (
    (("gh200",), (), 0, GpuSpec("GH200 96GB", 4000, 989)),
    (("h200", "nvl"), (), 0, GpuSpec("H200 NVL", 4800, 835)),
    (("h200",), (), 0, GpuSpec("H200 SXM", 4800, 989)),
    (("h100", "nvl"), (), 0, GpuSpec("H100 NVL", 3900, 835)),
    (("h100", "pcie"), (), 0, GpuSpec("H100 PCIe", 2000, 756)),
    (("h100",), (), 0, GpuSpec("H100 SXM", 3350, 989)),
    (("a100", "pcie", "80gb"), (), 0, GpuSpec("A100 PCIe 80GB", 1935, 312)),
    (("a100", "pcie"), (), 0, GpuSpec("A100 PCIe 40GB", 1555, 312)),
    (("a100", "80gb"), (), 0, GpuSpec("A100 SXM 80GB", 2039, 312)),
    (("a100",), (), 0, GpuSpec("A100 SXM 40GB", 1555, 312)),
    (("l40s",), (), 0, GpuSpec("L40S", 864, 362)),
    ((" l4",), ("l40",), 0, GpuSpec("L4", 300, 121)),
    (("4090",), (), 0, GpuSpec("RTX 4090", 1008, 165)),
    (("orin",), (), 48, GpuSpec("Jetson AGX Orin 64GB", 204.8, 42.5)),
)


def gpu_spec(device_name: str, total_memory_bytes: int = 0) -> GpuSpec | None:
    """The datasheet entry for a CUDA device name (as torch reports it), or None when it is not known here."""
    name = f" {device_name.lower()} "
    for has, lacks, min_gib, spec in KNOWN_GPUS:
        if all(h in name for h in has) and not any(x in name for x in lacks) and total_memory_bytes >= min_gib * 2**30:
            return spec
    return None


@dataclass
class Cost:
    """Work of one call: floating-point operations and bytes that must cross the memory bus at least once."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)

    def seconds(self, spec: GpuSpec | None) -> float | None:
        """Roofline time: the larger of compute at peak bf16 FLOP/s and traffic at peak bandwidth."""
        if spec is None:
            return None
        return max(self.flops / (spec.bf16_tflops * 1e12), self.bytes / (spec.bandwidth_gbs * 1e9))


def lm_params(cfg) -> tuple[int, int]:
    """(decoder linear weights, lm_head weights) of the language model."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * inter + inter * h
    return layers * per_layer, h * cfg.vocab_size


def lm_cost(cfg, new: int, context: int = 0, batch: int = 1, logits_rows: int = 1, weight_bytes: float = 2.0,
            act_bytes: int = 2) -> Cost:
    """A decoder forward of ``new`` tokens per row after ``context`` cached ones: weights read once, every row's
    KV cache read once, causal attention; ``logits_rows`` positions per row go through lm_head."""
    dec, head = lm_params(cfg)
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layers = cfg.num_hidden_layers
    flops = 2 * batch * new * dec + 2 * batch * logits_rows * head
    flops += layers * batch * 4 * q * new * (context + (new + 1) / 2)
    nbytes = dec * weight_bytes + head * act_bytes + layers * 2 * kv * (context + new) * act_bytes * batch
    return Cost(flops, nbytes)


def vision_cost(cfg, crops: int, image_tokens: int, act_bytes: int = 2) -> Cost:
    """CLIP on ``crops`` crops (the layers up to layer_idx) + the projector on ``image_tokens`` tokens."""
    v = cfg.clip_vision_config()
    d, inter, layers = v.hidden_size, v.intermediate_size, cfg.vision_layers_used
    t = (v.image_size // v.patch_size) ** 2 + 1
    per_layer = 4 * d * d + 2 * d * inter
    proj = 4 * d * cfg.hidden_size + cfg.hidden_size * cfg.hidden_size
    flops = 2 * crops * t * layers * per_layer + layers * crops * 4 * d * t * t
    flops += 2 * crops * (t - 1) * 3 * v.patch_size ** 2 * d + 2 * image_tokens * proj
    return Cost(flops, (layers * per_layer + proj) * act_bytes)


# ---------------------------------------------------------------------- results, budgets, the table
@dataclass
class Row:
    section: str
    figure: str
    measured: str = ""
    roofline: str = ""
    of_roofline: str = ""   # share of the hardware bound reached (roofline time / measured time)
    note: str = ""
    status: str = "ok"      # ok | FAILED | stopped | skipped | absent
    value: float | None = None  # the figure in SI units (seconds, tokens/s, bytes, probability), for the JSON


class OverBudget(Exception):
    """A section ran past its time budget; the steps after the check are skipped."""


class Skip(Exception):
    """A section cannot run here (CUDA only, a package absent, not enough memory); not a failure."""

    def __init__(self, reason: str, status: str = "skipped"):
        super().__init__(reason)
        self.status = status


@dataclass
class Run:
    """Rows so far, the global deadline and the current section's deadline."""

    budget_s: float
    t0: float = field(default_factory=time.monotonic)
    rows: list = field(default_factory=list)
    header: list = field(default_factory=list)
    section: str = ""
    section_deadline: float = math.inf
    out_dir: str | None = None
    echo: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def check(self) -> None:
        if time.monotonic() > self.section_deadline:
            raise OverBudget(f"past its time budget in {self.section!r}")

    def add(self, figure: str, measured: str = "", *, roofline: str = "", of_roofline: str = "", note: str = "",
            status: str = "ok", value: float | None = None) -> Row:
        row = Row(self.section, figure, measured, roofline, of_roofline, note, status, value)
        with self.lock:
            self.rows.append(row)
        if self.echo:
            print(f"  [{row.status}] {row.section} | {row.figure}: {row.measured} {row.note}".rstrip(),
                  file=sys.stderr, flush=True)
        return row

    def timing(self, figure: str, seconds: float, cost: Cost | None, spec: GpuSpec | None, note: str = "") -> Row:
        """A time beside its roofline."""
        roof = cost.seconds(spec) if cost is not None else None
        return self.add(figure, fmt_s(seconds), roofline=fmt_s(roof) if roof else ("unknown" if cost else ""),
                        of_roofline=f"{100 * roof / seconds:.0f}%" if roof and seconds > 0 else "", note=note,
                        value=seconds)

    def rate(self, figure: str, per_s: float, cost_per_item: Cost | None, spec: GpuSpec | None, unit: str,
             note: str = "") -> Row:
        """A throughput beside its roofline (items/s at the bound)."""
        roof = cost_per_item.seconds(spec) if cost_per_item is not None else None
        if not per_s > 0:
            return self.add(figure, "n/a", note="an n-token answer took no longer than a 1-token one (timing noise)")
        return self.add(figure, f"{per_s:.1f} {unit}",
                        roofline=f"{1 / roof:.1f} {unit}" if roof else ("unknown" if cost_per_item else ""),
                        of_roofline=f"{100 * per_s * roof:.0f}%" if roof else "", note=note, value=per_s)

    def table(self) -> str:
        cols = [("section", lambda r: r.section), ("figure", lambda r: r.figure), ("measured", lambda r: r.measured),
                ("roofline", lambda r: r.roofline), ("of roofline", lambda r: r.of_roofline),
                ("status", lambda r: r.status)]
        with self.lock:
            rows = list(self.rows)
        widths = [max([len(h)] + [len(get(r)) for r in rows]) for h, get in cols]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = list(self.header) + ["", line([h for h, _ in cols]) + "  note", line(["-" * w for w in widths])]
        for r in rows:
            out.append((line([get(r) for _, get in cols]) + ("  " + r.note if r.note else "")).rstrip())
        return "\n".join(out)

    def save(self) -> None:
        """results.json and table.txt in ``out_dir`` (rewritten after every section, so a cut-off run keeps them)."""
        if not self.out_dir:
            return
        with self.lock:
            data = {"header": self.header, "rows": [asdict(r) for r in self.rows],
                    "elapsed_s": time.monotonic() - self.t0}
        os.makedirs(self.out_dir, exist_ok=True)
        for name, text in (("results.json", json.dumps(data, indent=1)), ("table.txt", self.table() + "\n")):
            path = os.path.join(self.out_dir, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def run_sections(run: Run, st, sections) -> None:
    """Run each (title, budget_s, fn) in order: fn(run, st) adds rows; an exception is reported as a row and the next
    section runs. A section gets min(its budget, the time left); none starts with under 5 s left."""
    for title, budget, fn in sections:
        run.section = title
        if run.left() < 5:
            run.add("section", status="skipped", note="no time left in the run's budget")
            continue
        run.section_deadline = time.monotonic() + min(budget, run.left())
        t = time.monotonic()
        if run.echo:
            print(f"== {title} (budget {min(budget, run.left()):.0f} s, {run.left():.0f} s left)", file=sys.stderr,
                  flush=True)
        try:
            fn(run, st)
        except Skip as e:
            run.add("section", status=e.status, note=str(e))
        except OverBudget:
            run.add("section", status="stopped", note=f"over its {budget:.0f} s budget: the rest of it was skipped")
        except Exception as e:  # noqa: BLE001 -- one broken path must not lose the others' numbers
            traceback.print_exc(file=sys.stderr)
            first_line = str(e).splitlines()[0][:240] if str(e) else ""
            run.add("section", status="FAILED", note=f"{type(e).__name__}: {first_line}")
        finally:
            st.scratch.clear()
            gc.collect()
            if getattr(st, "cuda", False):
                import torch

                torch.cuda.empty_cache()
            if run.echo:
                print(f"   ({title}: {time.monotonic() - t:.1f} s)", file=sys.stderr, flush=True)
            run.section_deadline = math.inf
            try:
                run.save()
            except OSError as e:
                print(f"could not write to {run.out_dir}: {e}", file=sys.stderr)


# ---------------------------------------------------------------------- building the model and the engine
def find_tokenizer(explicit: str | None) -> tuple[str, str]:
    """(directory, description): --tokenizer, $PHI3V_TOKENIZER, the official files in ../shared or shared/, else the
    embedded model's own tokenizer (same special tokens, 573 ids: text prompts differ by a token or so)."""
    if explicit and not os.path.isfile(os.path.join(explicit, "tokenizer.json")):
        raise SystemExit(f"error: --tokenizer {explicit!r} has no tokenizer.json")
    candidates = [explicit, os.environ.get("PHI3V_TOKENIZER")]
    shared = os.environ.get("PHI3V_SHARED_DIR")
    candidates += [os.path.join(shared, "phi3v-tokenizer") if shared else None,
                   os.path.join(os.path.dirname(REPO_ROOT), "shared", "phi3v-tokenizer"),
                   os.path.join(REPO_ROOT, "shared", "phi3v-tokenizer")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "tokenizer.json")):
            return c, f"tokenizer from {os.path.relpath(c, REPO_ROOT)}"
    from phi3v_spatial.paths import default_model_dir

    return default_model_dir(), "the embedded model's tokenizer (the official one was not found; text prompts " \
                                "differ from it by a token or so)"


def randomize_(model, seed: int) -> None:
    """Seeded random weights on the model's own device, scaled so that every norm and the image features matter
    (the scheme of model.tiny.random_state_dict, drawn on the GPU instead of the CPU)."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.normal_(1.0, 0.1, generator=gen)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1, generator=gen)
            elif name.endswith(("glb_GN", "sub_GN", "class_embedding", "embed_tokens.weight",
                                "position_embedding.weight")) or p.dim() < 2:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=gen)


def build_model(cfg_dict: dict, dtype, device: str, attn: str, source=None, seed: int = 0):
    """A Phi3VForCausalLM built on the meta device and materialised on ``device`` in ``dtype``: random weights, or
    a converted copy of ``source``'s weights. Never holds a float32 copy of a bf16 model on the host."""
    import torch

    from phi3v_spatial.model import Phi3VConfig, Phi3VForCausalLM

    config = Phi3VConfig(**copy.deepcopy(cfg_dict))
    config._attn_implementation = attn
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    if source is None:
        model = model.to(dtype=dtype).to_empty(device=device)
        randomize_(model, seed)
    else:
        state = {k: v.detach().to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=True)
                 for k, v in source.state_dict().items()}
        model.load_state_dict(state, strict=True, assign=True)
        del state
    model._materialize_buffers(torch.device(device))  # rotary inv_freq, CLIP position ids (what from_pretrained does)
    model.config.dtype = dtype
    model.set_attention(attn)
    return model.eval()


def endless_(model, tokenizer) -> None:
    """Zero the lm_head rows of the stop tokens and of ids the tokenizer lacks: a zero row gives logit 0, below the
    best random logit, so greedy decoding with random weights runs its full length on tokens that decode to text."""
    import torch

    from phi3v_spatial.model.processing_phi3v import STOP_TOKENS

    rows = [i for i in tokenizer.convert_tokens_to_ids(list(STOP_TOKENS)) if i is not None]
    with torch.no_grad():
        model.lm_head.weight[rows] = 0
        model.lm_head.weight[len(tokenizer):] = 0


def make_engine(st, model, dtype, attn: str, quantization: str = "none", options=None):
    from phi3v_spatial.engine.engine import SpatialEngine

    return SpatialEngine(model, st.processor, device=st.device, dtype=dtype, attn_implementation=attn,
                         model_path=st.model_name, options=options, quantization=quantization)


def make_frames(n: int, size=FRAME_SIZE):
    """``n`` RGB frames of a simple scene (gradient background, four coloured boxes moving a little per frame)."""
    import numpy as np

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    colours = ((220, 30, 30), (30, 30, 220), (30, 180, 30), (230, 200, 40))
    frames = []
    for f in range(n):
        img = np.empty((h, w, 3), np.uint8)
        img[..., 0] = xx * 255 // max(w - 1, 1)
        img[..., 1] = yy * 255 // max(h - 1, 1)
        img[..., 2] = 96
        for k, colour in enumerate(colours):
            x0, y0 = int(w * (0.08 + 0.22 * k)) + 12 * f, int(h * (0.3 + 0.15 * (k % 2)))
            img[y0 : y0 + h // 5, x0 : x0 + w // 8] = colour
        frames.append(img)
    return frames


def candidates(n: int = 8):
    from phi3v_spatial.benchmark.engine_bench import RELATIONS
    from phi3v_spatial.engine.parsing import Relation

    pairs = [(a, b) for a in OBJECTS for b in OBJECTS if a != b]
    return [Relation(pairs[i % len(pairs)][0], RELATIONS[i % len(RELATIONS)], pairs[i % len(pairs)][1])
            for i in range(n)]


def prompt_lengths(st, text: str, images) -> tuple[int, int]:
    """(tokens up to the last image, whole prompt) of a chat prompt, as the engine's processor builds it."""
    ip = st.processor.image_processor
    tokens = [ip.tokens_for_size(*ip.hd_size(im.shape[1], im.shape[0])) for im in images]
    info = {"num_img_tokens": tokens, "pixel_values": None, "image_sizes": None}
    row = st.processor(text, images=list(images), image_features=info)["input_ids"][0].tolist()
    image_pos = [i for i, t in enumerate(row) if t < 0]
    return (image_pos[-1] + 1 if image_pos else 0), len(row)


def window_costs(st, images) -> dict:
    """Roofline costs of the measured calls on a window (bf16 weights and activations)."""
    from phi3v_spatial.engine import prompts

    cfg, ip = st.config, st.processor.image_processor
    n_img = len(images)
    crops, img_tokens = 0, 0
    for im in images:
        h, w = ip.hd_size(im.shape[1], im.shape[0])
        crops += 1 + (h // ip.crop_size) * (w // ip.crop_size)
        img_tokens += ip.tokens_for_size(h, w)
    vis = vision_cost(cfg, crops, img_tokens)
    _, ask_len = prompt_lengths(st, prompts.chat_prompt(PROMPTS[0], n_img), images)
    rel = [prompt_lengths(st, prompts.chat_prompt(prompts.relation_question(c.subject, c.relation, c.object), n_img),
                          images) for c in st.cands]
    prefix = rel[0][0]
    suffix = max(total - prefix for _, total in rel)
    return {
        "ttft": vis + lm_cost(cfg, ask_len),
        "rel1": vis + lm_cost(cfg, rel[0][1]),
        "rel8": vis + lm_cost(cfg, prefix) + lm_cost(cfg, suffix, prefix, batch=len(rel), logits_rows=suffix),
        "follow": lm_cost(cfg, rel[1][1] - prefix, prefix),
        "crops": crops, "image_tokens": img_tokens, "ask_len": ask_len, "prefix": prefix,
    }


# ---------------------------------------------------------------------- measuring helpers
def median_s(run: Run, st, fn, repeat: int, before=None) -> float:
    """Median wall time of ``fn`` (CUDA synchronised); ``before`` runs untimed before each call."""
    from phi3v_spatial.benchmark.engine_bench import timed

    times = []
    for _ in range(repeat):
        run.check()
        if before:
            before()
        times.append(timed(fn, st.device))
    return statistics.median(times)


def need_memory(st, nbytes: float, what: str) -> None:
    if not st.cuda:
        return
    import torch

    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.15:
        raise Skip(f"not enough free GPU memory for {what}: needs about {gib(nbytes)}, {gib(free)} free")


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def outputs(engine, st, images, keys, tokens: int) -> dict:
    """Greedy answers to the 3 prompts and P(yes) of the 8 candidates on a fresh cache (the comparison inputs)."""
    engine.clear_caches()
    streams = []
    for q in PROMPTS:
        seen: dict[int, str] = {}  # token count -> streamed text after that many tokens
        engine.ask(q, images, max_new_tokens=tokens, frame_keys=keys, on_text=lambda text, n: seen.__setitem__(n, text))
        streams.append(seen)
    probs = [r.probability for r in engine.query_relations(st.cands, images, frame_keys=keys)]
    engine.clear_caches()
    return {"streams": streams, "probs": probs}


def agreeing_tokens(a: dict, b: dict, tokens: int) -> int:
    """How many leading greedy tokens two streamed answers share (the text after every token count agrees)."""
    def text_at(stream, n):
        done = [k for k in stream if k <= n]
        return stream[max(done)] if done else ""

    for n in range(1, tokens + 1):
        if text_at(a, n) != text_at(b, n):
            return n - 1
    return tokens


def compare(run: Run, label: str, got: dict, ref: dict, ref_name: str, tokens: int) -> None:
    agree = [agreeing_tokens(a, b, tokens) for a, b in zip(got["streams"], ref["streams"])]
    same = sum(k == tokens for k in agree)
    run.add(f"{label} vs {ref_name}: greedy tokens, 3 prompts", f"{same}/3 identical", value=same / 3,
            note=f"leading tokens that agree: {', '.join(f'{k}/{tokens}' for k in agree)}")
    dp = max(abs(a - b) for a, b in zip(got["probs"], ref["probs"]))
    run.add(f"{label} vs {ref_name}: max |dP(yes)|, {len(ref['probs'])} relations", f"{dp:.2e}", value=dp)


def costs1(st) -> dict:
    """Roofline costs on the 1-frame window (computed once)."""
    if "costs1" not in st.memo:
        st.memo["costs1"] = window_costs(st, st.win1)
    return st.memo["costs1"]


def reference(st) -> dict:
    """The bf16 SDPA engine's outputs on the 1-frame window (computed once, on first need)."""
    if "bf16 SDPA" not in st.memo:
        st.memo["bf16 SDPA"] = outputs(st.engine, st, st.win1, st.keys1, st.compare_tokens)
    return st.memo["bf16 SDPA"]


def best_reference(st) -> tuple[dict, str]:
    """The fp32 outputs when the fp32 section ran, else bf16 SDPA's."""
    return (st.memo["fp32"], "fp32") if "fp32" in st.memo else (reference(st), "bf16 SDPA")


def speed_rows(run: Run, st, engine, label: str, costs: dict | None, weight_bytes: float = 2.0, window=None) -> None:
    """Time to first token (new window) and decode tokens/s of ``engine`` on ``window`` (images, keys; default: the
    1-frame window)."""
    (images, keys), q = window or (st.win1, st.keys1), PROMPTS[0]
    t = median_s(run, st, lambda: engine.ask(q, images, max_new_tokens=1, frame_keys=keys), st.repeat,
                 before=engine.clear_caches)
    run.timing(f"{label}: time to first token, new window", t, costs and costs["ttft"], st.spec)
    rate, tokens = decode_rate(run, st, engine, images, keys)
    per_token = None
    if costs:
        per_token = lm_cost(st.config, 1, costs["ask_len"] + st.decode_tokens // 2, weight_bytes=weight_bytes)
    run.rate(f"{label}: greedy decode ({tokens} tokens)", rate, per_token, st.spec, "tok/s")


def decode_rate(run: Run, st, engine, images, keys) -> tuple[float, int]:
    """Tokens/s of the greedy loop: (n - 1) tokens over the time an n-token answer takes beyond a 1-token one, on a
    window whose prefix is cached (so neither includes CLIP or the image prefill)."""
    from phi3v_spatial.benchmark.engine_bench import timed

    q, n = PROMPTS[0], st.decode_tokens
    engine.ask(q, images, max_new_tokens=1, frame_keys=keys)
    got, diffs = {}, []
    for _ in range(st.repeat):  # paired, so that load drifts hit both alike
        run.check()
        t1 = timed(lambda: engine.ask(q, images, max_new_tokens=1, frame_keys=keys), st.device)
        tn = timed(lambda: got.__setitem__("r", engine.ask(q, images, max_new_tokens=n, frame_keys=keys)), st.device)
        diffs.append(tn - t1)
    tokens, dt = got["r"].tokens_generated, statistics.median(diffs)
    return ((tokens - 1) / dt if dt > 0 else float("nan")), tokens


# ---------------------------------------------------------------------- the sections
def s_build(run: Run, st) -> None:
    """The real-size (or --small) model with random weights, straight on the device in bf16, SDPA attention."""
    import torch

    from phi3v_spatial.model import Phi3VImageProcessor, Phi3VProcessor
    from phi3v_spatial.model.processing_phi3v import load_tokenizer

    t = time.perf_counter()
    model = build_model(st.cfg_dict, torch.bfloat16, st.device, "sdpa")
    if st.cuda:
        torch.cuda.synchronize()
    st.build_s = time.perf_counter() - t
    st.config = model.config
    tok = load_tokenizer(st.tokenizer_dir)
    endless_(model, tok)
    cfg = st.config
    st.processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=NUM_CROPS, crop_size=cfg.crop_size,
                                                      patch_size=cfg.patch_size), tok)
    st.model = model
    st.engine = make_engine(st, model, torch.bfloat16, "sdpa")
    st.cands = candidates(8)
    st.win1, st.keys1 = make_frames(1), [("/camera/image_raw", 1)]
    st.win2, st.keys2 = make_frames(2), [("/camera/image_raw", 1), ("/camera/image_raw", 2)]
    vision = sum(p.numel() for p in model.model.vision_embed_tokens.parameters())
    total = sum(p.numel() for p in model.parameters())
    st.weights_bytes = model_bytes(model)
    dec, head = lm_params(cfg)
    run.add("build on the device, random bf16 weights", fmt_s(st.build_s), value=st.build_s,
            note=f"{count(total)} params ({count(vision)} vision + projector, decoder linears {count(dec)}, "
                 f"lm_head {count(head)}), {gib(st.weights_bytes)}")
    t = time.perf_counter()
    st.engine.ask(PROMPTS[0], st.win1, max_new_tokens=2, frame_keys=st.keys1)  # kernels, allocator, cuBLAS handles
    run.add("warm-up: first ask (2 tokens)", fmt_s(time.perf_counter() - t), value=time.perf_counter() - t)
    st.engine.clear_caches()


def s_window(n_frames: int):
    def section(run: Run, st) -> None:
        """The issue's figures on one window, bf16 SDPA, default engine options (caches, batching, pinned upload)."""
        import torch

        engine = st.engine
        images, keys = (st.win1, st.keys1) if n_frames == 1 else (st.win2, st.keys2)
        costs = costs1(st) if n_frames == 1 else window_costs(st, images)
        c1, others, many = st.cands[0], st.cands[1:], st.cands
        if st.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        run.add("window", f"{n_frames} x {FRAME_SIZE[0]}x{FRAME_SIZE[1]}",
                note=f"{NUM_CROPS} crops: {costs['crops']} CLIP crops, {costs['image_tokens']} image tokens, "
                     f"prompt {costs['ask_len']} tokens")
        if n_frames == 1:
            t = median_s(run, st, lambda: st.processor.image_processor.preprocess_unpadded(images), st.repeat)
            run.add("HD transform per frame (CPU, every new frame)", fmt_s(t), value=t)
        speed_rows(run, st, engine, "bf16 SDPA", costs, window=(images, keys))
        t = median_s(run, st, lambda: engine.query_relations([c1], images, frame_keys=keys), st.repeat,
                     before=engine.clear_caches)
        run.timing("QueryRelations, 1 relation, new window", t, costs["rel1"], st.spec)
        t = median_s(run, st, lambda: engine.query_relations(many, images, frame_keys=keys), st.repeat,
                     before=engine.clear_caches)
        run.timing(f"QueryRelations, {len(many)} candidates, new window", t, costs["rel8"], st.spec,
                   note=f"batches of {engine.options.relation_batch_size}")
        engine.query_relations([c1], images, frame_keys=keys)  # the window is known now
        it = iter(range(10**9))
        t = median_s(run, st, lambda: engine.query_relations([others[next(it) % len(others)]], images,
                                                             frame_keys=keys), st.repeat)
        run.timing("follow-up QueryRelations, same window", t, costs["follow"], st.spec,
                   note="a new relation; the prefix KV from the cache")
        if st.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            run.add("peak GPU memory (allocated)", gib(peak), value=peak,
                    note=f"weights {gib(st.weights_bytes)}; reserved {gib(torch.cuda.max_memory_reserved())}; caches "
                         f"{gib(engine.vision_cache.bytes)} image embeddings + {gib(engine.prefix_cache.bytes)} "
                         "prefix KV")
        else:
            run.add("peak GPU memory (allocated)", "n/a", note="CPU run")
        engine.clear_caches()
    return section


def s_reuse(run: Run, st) -> None:
    """The engine's reuse paths against the naive path (same model), and the pinned upload."""
    import torch

    from phi3v_spatial.engine.engine import EngineOptions

    engine, images, keys = st.engine, st.win1, st.keys1
    naive = engine.with_options(EngineOptions.naive())
    engine.clear_caches()
    got = [r.probability for r in engine.query_relations(st.cands, images, frame_keys=keys)]
    ref = [r.probability for r in naive.query_relations(st.cands, images)]
    run.add(f"engine vs naive path: max |dP(yes)|, {len(ref)} relations",
            f"{max(abs(a - b) for a, b in zip(got, ref)):.2e}", value=max(abs(a - b) for a, b in zip(got, ref)),
            note="batched, cached, real crops only vs one forward per candidate, every crop slot, no caches")
    n = st.compare_tokens
    streams = [{}, {}]
    engine.ask(PROMPTS[1], images, max_new_tokens=n, frame_keys=keys, on_text=lambda t, k: streams[0].__setitem__(k, t))
    naive.ask(PROMPTS[1], images, max_new_tokens=n, on_text=lambda t, k: streams[1].__setitem__(k, t))
    agree = agreeing_tokens(*streams, n)
    run.add("follow-up ask from the prefix cache vs naive: greedy tokens", f"{agree}/{n} agree", value=agree / n)
    run.check()
    before = engine.cache_stats()
    engine.query_relations(st.cands[:1], images, frame_keys=keys)
    after = engine.cache_stats()
    vh = after["vision"]["hits"] - before["vision"]["hits"]
    ph = after["prefix"]["hits"] - before["prefix"]["hits"]
    run.add("vision / prefix cache hits on a repeated window", f"{vh} / {ph}", status="ok" if vh and ph else "FAILED",
            note=f"entries {after['vision']['entries']} / {after['prefix']['entries']}, bytes "
                 f"{gib(after['vision']['bytes'])} / {gib(after['prefix']['bytes'])}")
    engine.clear_caches()
    run.check()
    if not st.cuda:
        run.add("pinned upload", status="skipped", note="CUDA only (the engine pins host memory on CUDA devices)")
        return
    crops = st.processor.image_processor.preprocess_unpadded(images)["crops"][0]
    up = engine._upload(crops)
    torch.cuda.synchronize()
    equal = up.device.type == "cuda" and torch.equal(up.cpu(), crops)
    t_pin = median_s(run, st, lambda: engine._upload(crops), max(st.repeat, 5))
    t_plain = median_s(run, st, lambda: crops.to(st.device), max(st.repeat, 5))
    run.add(f"pinned upload of one frame's crops ({crops.numel() * 4 / 2**20:.1f} MiB)", fmt_s(t_pin), value=t_pin,
            status="ok" if equal else "FAILED",
            note=f"pageable .to(device): {fmt_s(t_plain)}; data {'equal' if equal else 'DIFFERENT'} on the device; "
                 f"describe(): pinned_upload={engine.describe()['pinned_upload']}")


def s_streaming(run: Run, st) -> None:
    """Text reaches on_text as tokens are generated; should_stop cancels between tokens; plan() runs."""
    engine, images, keys = st.engine, st.win1, st.keys1
    engine.ask(PROMPTS[0], images, max_new_tokens=1, frame_keys=keys)
    events = []
    t0 = time.perf_counter()
    res = engine.ask(PROMPTS[0], images, max_new_tokens=st.decode_tokens, frame_keys=keys,
                     on_text=lambda text, n: events.append((time.perf_counter() - t0, text, n)))
    counts = [n for _, _, n in events]
    ok = bool(events) and events[-1][1].strip() == res.answer and counts == sorted(set(counts))
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    run.add("streamed ask: on_text calls", f"{len(events)} for {res.tokens_generated} tokens",
            status="ok" if ok else "FAILED", value=len(events),
            note=f"first after {fmt_s(events[0][0]) if events else '-'}, median gap "
                 f"{fmt_s(statistics.median(gaps)) if gaps else '-'}; last text == answer: "
                 f"{bool(events) and events[-1][1].strip() == res.answer}")
    run.check()
    seen = []
    res = engine.ask(PROMPTS[0], images, max_new_tokens=st.decode_tokens, frame_keys=keys,
                     on_text=lambda text, n: seen.append(n), should_stop=lambda: len(seen) >= 3)
    run.add("cancel after 3 streamed updates", f"{res.tokens_generated} tokens", value=res.tokens_generated,
            status="ok" if res.cancelled and res.tokens_generated < st.decode_tokens else "FAILED",
            note=f"cancelled={res.cancelled}")
    run.check()
    plan = engine.plan("Put the red box left of the blue box.", images, max_new_tokens=16, frame_keys=keys)
    run.add("plan() (16 tokens)", f"{plan.tokens_generated} tokens", value=plan.tokens_generated,
            note=f"{len(plan.steps)} steps; "
                 + ("parse error, as expected from random weights" if plan.error else "parsed"))
    engine.clear_caches()


def s_attention(impl: str, label: str):
    def section(run: Run, st) -> None:
        """The same bf16 weights with another attention implementation against SDPA (switched back afterwards)."""
        from phi3v_spatial.model.runtime import flash_attn_available

        if impl == "flash_attention_2" and not st.cuda:
            raise Skip("CUDA only")
        if impl == "flash_attention_2" and not flash_attn_available():
            raise Skip("flash_attn does not import here", status="absent")
        ref = reference(st)
        run.check()
        st.model.set_attention(impl)
        try:
            got = outputs(st.engine, st, st.win1, st.keys1, st.compare_tokens)
            compare(run, label, got, ref, "bf16 SDPA", st.compare_tokens)
            run.check()
            speed_rows(run, st, st.engine, label, costs1(st))
        finally:
            st.model.set_attention("sdpa")
            st.engine.clear_caches()
    return section


def s_fp32(run: Run, st) -> None:
    """bf16 against float32 on the same (bf16-representable) weights: the numerics of the robot's default dtype."""
    import torch

    ref16 = reference(st)
    need_memory(st, 2 * st.weights_bytes, "a float32 copy")
    run.check()
    model = build_model(st.cfg_dict, torch.float32, st.device, "sdpa", source=st.model)
    st.scratch["model"] = model
    engine = make_engine(st, model, torch.float32, "sdpa")
    st.memo["fp32"] = outputs(engine, st, st.win1, st.keys1, st.compare_tokens)
    compare(run, "bf16", ref16, st.memo["fp32"], "fp32", st.compare_tokens)
    run.check()
    speed_rows(run, st, engine, "fp32 SDPA", None)  # no fp32 roofline: the table holds bf16 peaks


def s_fp16(run: Run, st) -> None:
    import torch

    need_memory(st, st.weights_bytes, "a float16 copy")
    model = build_model(st.cfg_dict, torch.float16, st.device, "sdpa", source=st.model)
    st.scratch["model"] = model
    engine = make_engine(st, model, torch.float16, "sdpa")
    compare(run, "fp16", outputs(engine, st, st.win1, st.keys1, st.compare_tokens), *best_reference(st),
            st.compare_tokens)
    run.check()
    speed_rows(run, st, engine, "fp16 SDPA", costs1(st))


def s_quantized(mode: str):
    def section(run: Run, st) -> None:
        """Decoder weights through bitsandbytes (CLIP, projector, lm_head stay bf16), on a copy of the model."""
        import torch

        from phi3v_spatial.model.quantization import QuantizationError, check_quantization, quantize_decoder_linears

        try:
            check_quantization(mode, st.device)
        except QuantizationError as e:
            raise Skip(str(e), status="skipped" if not st.cuda else "absent") from e
        need_memory(st, st.weights_bytes, f"a {mode} copy")
        t, before = time.perf_counter(), torch.cuda.memory_allocated()
        model = build_model(st.cfg_dict, torch.bfloat16, st.device, "sdpa", source=st.model)
        st.scratch["model"] = model
        n = quantize_decoder_linears(model, mode, torch.bfloat16)
        torch.cuda.synchronize()
        run.add(f"copy + quantize {n} decoder linears", fmt_s(time.perf_counter() - t), value=time.perf_counter() - t,
                note=f"the copy holds {gib(torch.cuda.memory_allocated() - before)} on the GPU (bf16: "
                     f"{gib(st.weights_bytes)})")
        engine = make_engine(st, model, torch.bfloat16, "sdpa", quantization=mode)
        compare(run, mode, outputs(engine, st, st.win1, st.keys1, st.compare_tokens), *best_reference(st),
                st.compare_tokens)
        run.check()
        speed_rows(run, st, engine, f"{mode} decoder", costs1(st),
                   weight_bytes=1.0 if mode == "8bit" else 0.5)
    return section


def s_lora(run: Run, st) -> None:
    """A random rank-16 LoRA adapter on the decoder (PEFT files written here), loaded, switched on and off.

    Last on purpose: loading injects LoRA layers into the shared bf16 model."""
    import torch
    from safetensors.torch import save_file

    from phi3v_spatial.model.adapters import DEFAULT_LORA_TARGETS, lora_config

    rank = 16
    engine, images, keys, c = st.engine, st.win1, st.keys1, st.cands
    base = [r.probability for r in engine.query_relations(c, images, frame_keys=keys)]
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in st.model.named_modules():
        if name.rsplit(".", 1)[-1] in DEFAULT_LORA_TARGETS and ".layers." in name:
            pre = f"base_model.model.{name}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen)
                                               / math.sqrt(module.in_features)).to(torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = (0.02 * torch.randn(module.out_features, rank, generator=gen)
                                               ).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="gpu-check-lora-") as tmp:
        lora_config(r=rank).save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
        t = time.perf_counter()
        engine.load_adapter("gpucheck", tmp)
        engine.set_adapter("gpucheck")
        run.add(f"load + activate a rank-{rank} adapter ({len(tensors) // 2} layers)", fmt_s(time.perf_counter() - t),
                value=time.perf_counter() - t)
    on = [r.probability for r in engine.query_relations(c, images, frame_keys=keys)]
    dp = max(abs(a - b) for a, b in zip(on, base))
    run.add("adapter on: max |dP(yes)| vs base", f"{dp:.2e}", value=dp, status="ok" if dp > 0 else "FAILED",
            note="must be > 0: the adapter changes the answers")
    run.check()
    speed_rows(run, st, engine, "bf16 + LoRA (unmerged)", costs1(st))
    engine.set_adapter("none")
    off = [r.probability for r in engine.query_relations(c, images, frame_keys=keys)]
    dp = max(abs(a - b) for a, b in zip(off, base))
    run.add("adapter 'none' again: max |dP(yes)| vs base", f"{dp:.2e}", value=dp,
            status="ok" if dp < 1e-2 else "FAILED")


SECTIONS = [  # most valuable first: when time runs short, the tail is what gets skipped
    ("build", 150, s_build),
    ("1 frame", 60, s_window(1)),
    ("2 frames", 60, s_window(2)),
    ("reuse + upload", 40, s_reuse),
    ("streaming", 30, s_streaming),
    ("fp32", 60, s_fp32),
    ("eager", 40, s_attention("eager", "bf16 eager")),
    ("fp16", 45, s_fp16),
    ("flash-attn", 40, s_attention("flash_attention_2", "bf16 flash-attention-2")),
    ("8-bit", 60, s_quantized("8bit")),
    ("4-bit", 60, s_quantized("4bit")),
    ("LoRA", 40, s_lora),
]
# Sections that need what "build" made; when it failed they are reported as skipped instead of failing one by one.
NEEDS_MODEL = {title for title, _, _ in SECTIONS} - {"build"}


class State:
    """What the sections share (model, engine, processor, windows; ``memo``: reference outputs and costs computed
    once); ``scratch`` holds a section's own models and is freed after it."""

    def __init__(self, **kw):
        self.scratch: dict = {}
        self.memo: dict = {}
        self.__dict__.update(kw)


def guarded(sections):
    """Sections that need the model are skipped (not failed) when the build did not produce one."""
    def wrap(title, fn):
        def run_it(run, st):
            if title in NEEDS_MODEL and getattr(st, "engine", None) is None:
                raise Skip("the model was not built (see the build section)")
            fn(run, st)
        return run_it
    return [(title, budget, wrap(title, fn)) for title, budget, fn in sections]


def environment(args, st) -> list[str]:
    import torch
    import transformers

    lines = [f"phi3v_spatial GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    spec = st.spec
    roof = (f"roofline: {spec.name}, {spec.bandwidth_gbs:g} GB/s, {spec.bf16_tflops:g} TFLOP/s dense bf16" if spec
            else "roofline: unknown GPU (give --roofline GBPS,TFLOPS)")
    if st.cuda:
        p = torch.cuda.get_device_properties(torch.device(st.device))
        lines.append(f"GPU: {p.name} (sm{p.major}{p.minor}, {gib(p.total_memory)}, {p.multi_processor_count} SMs) | "
                     + roof)
    else:
        lines.append(f"GPU: none, device {st.device} ({platform.machine()}) | " + roof)
    versions = [f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
                f"transformers {transformers.__version__}"]
    for mod in ("peft", "accelerate", "safetensors", "bitsandbytes", "flash_attn"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 -- absent, or a build that fails at import
            versions.append(f"{mod} absent" + ("" if isinstance(e, ImportError) else f" ({type(e).__name__})"))
    lines.append(" | ".join(versions) + f" | python {platform.python_version()}")
    if not transformers.__version__.startswith("5."):
        lines.append(f"WARNING: phi3v_spatial is written for transformers 5.x (requirements.txt pins 5.23.0); "
                     f"this is {transformers.__version__}")
    size = "SMALL smoke-test config (--small)" if args.small else "Phi-3.5-vision-instruct config (real size)"
    lines.append(f"model: {size}, random weights, bf16 + SDPA unless a row says otherwise; {st.tokenizer_note}")
    lines.append(f"inputs: {FRAME_SIZE[0]}x{FRAME_SIZE[1]} frames at {NUM_CROPS} crops; decode {st.decode_tokens} "
                 f"greedy tokens; comparisons on {st.compare_tokens}-token answers; medians of {st.repeat}; "
                 f"roofline = max(FLOPs / peak bf16, bytes / bandwidth)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA, else skip) | cuda | cuda:N | cpu")
    p.add_argument("--small", action="store_true", help="a small config and few tokens (smoke test of every path)")
    p.add_argument("--budget-s", type=float, default=450.0, help="time for all sections (default 450 s; the "
                                                                  "watchdog stops the run 20 s after it)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per figure (default 3; 1 with --small)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="greedy tokens for decode (default 64; 8 with --small)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ../shared/phi3v-tokenizer, else the "
                                                     "embedded model's)")
    p.add_argument("--only", nargs="*", default=None, metavar="SECTION", help="run only these sections (build always)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write results.json and table.txt there (after "
                                                             "every section)")
    p.add_argument("--roofline", default=None, metavar="GBPS,TFLOPS", help="datasheet memory bandwidth (GB/s) and "
                   "dense bf16 TFLOP/s of a GPU the built-in table does not know")
    args = p.parse_args(argv)

    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    from phi3v_spatial.model.runtime import resolve_device

    device = str(resolve_device("cuda" if args.device == "auto" else args.device))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))  # memory statistics and mem_get_info follow the current device
    props = torch.cuda.get_device_properties(torch.device(device)) if cuda else None
    spec = gpu_spec(props.name, props.total_memory) if cuda else None
    if args.roofline:
        try:
            bw, tf = (float(v) for v in args.roofline.split(","))
        except ValueError:
            p.error(f"--roofline takes GBPS,TFLOPS (e.g. 3350,989), got {args.roofline!r}")
        spec = GpuSpec("given by --roofline", bw, tf)
    tok_dir, tok_note = find_tokenizer(args.tokenizer)
    st = State(device=device, cuda=cuda, spec=spec, small=args.small,
               cfg_dict=small_config() if args.small else copy.deepcopy(PHI35_VISION_CONFIG),
               tokenizer_dir=tok_dir, tokenizer_note=tok_note, engine=None,
               model_name="random:" + ("phi-3.5-vision-small" if args.small else "phi-3.5-vision-instruct"),
               repeat=args.repeat or (1 if args.small else 3),
               decode_tokens=args.decode_tokens or (8 if args.small else 64),
               compare_tokens=6 if args.small else 32)
    if st.decode_tokens < 2 or st.repeat < 1:
        p.error("--decode-tokens must be >= 2 and --repeat >= 1")
    run = Run(args.budget_s, t0=T_START, out_dir=args.out)
    run.header = environment(args, st)
    print("\n".join(run.header), file=sys.stderr, flush=True)
    names = [title for title, _, _ in SECTIONS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        p.error(f"unknown sections {unknown}; the sections are {names}")
    sections = SECTIONS if args.only is None else [s for s in SECTIONS if s[0] == "build" or s[0] in args.only]

    def watchdog():
        print(f"\nwatchdog: {args.budget_s + 20:.0f} s passed, still in section {run.section!r}; what finished:",
              file=sys.stderr, flush=True)
        run.add("section", status="stopped", note="the watchdog ended the run here (a call did not return in time)")
        print(run.table(), flush=True)
        try:
            run.save()
        finally:
            os._exit(3)

    timer = threading.Timer(max(1.0, args.budget_s + 20 - (time.monotonic() - T_START)), watchdog)
    timer.daemon = True
    timer.start()
    try:
        run_sections(run, st, guarded(sections))
    finally:
        timer.cancel()
    run.header.append(f"elapsed {time.monotonic() - run.t0:.0f} s")
    print(run.table(), flush=True)
    run.save()
    return 1 if any(r.status in ("FAILED", "stopped") for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
