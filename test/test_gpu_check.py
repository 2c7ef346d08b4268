"""scripts/gpu_check.py without a GPU: the skip line (through `make gpu-check`), every section end to end on a small
config on the CPU (the same code path the GPU run takes, minus the CUDA-only calls), the section runner's guards,
the roofline table and cost model, and the copy of the official config it carries.

No timing is asserted: the figures are printed, the tests check that each one is there.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "gpu_check.py")
EMBEDDED_TOKENIZER = os.path.join(REPO_ROOT, "models", "phi3v-spatial-tiny")
SECTIONS = ("build", "1 frame", "2 frames", "reuse + upload", "streaming", "fp32", "eager", "fp16", "flash-attn",
            "8-bit", "4-bit", "LoRA")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _no_cuda_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    return env


def test_make_gpu_check_skips_without_cuda():
    """The default interpreter is one that imports torch (here the venv's: python3 has no torch), the package comes
    from the checkout, and without CUDA the check says so and succeeds."""
    run = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO_ROOT, env=_no_cuda_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "no CUDA device: skipped", run.stdout
    run = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}"], cwd=REPO_ROOT, env=_no_cuda_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "no CUDA device: skipped", run.stdout + run.stderr[-3000:]


def test_small_cpu_run_goes_through_every_section(tmp_path):
    """--device cpu --small: every section runs (CUDA-only ones say so), the table and the files hold every figure."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--small", "--tokenizer", EMBEDDED_TOKENIZER,
                          "--roofline", "3350,989", "--out", str(out)], cwd=str(tmp_path), env=_no_cuda_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    table = run.stdout
    assert (out / "table.txt").read_text().strip() == table.strip()
    assert "torch " in table and "transformers " in table and "roofline: given by --roofline, 3350 GB/s" in table
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS)
    by = {(r["section"], r["figure"]): r for r in rows}
    bad = [r for r in rows if r["status"] not in ("ok", "skipped", "absent")]
    assert not bad, bad
    for section in ("1 frame", "2 frames"):
        for figure in ("bf16 SDPA: time to first token, new window", "QueryRelations, 1 relation, new window",
                       "QueryRelations, 8 candidates, new window", "follow-up QueryRelations, same window"):
            row = by[(section, figure)]
            assert row["value"] > 0 and row["roofline"].endswith("s") and row["of_roofline"].endswith("%"), row
        decode = by[(section, "bf16 SDPA: greedy decode (8 tokens)")]
        assert decode["measured"] == "n/a" or (decode["value"] > 0 and decode["roofline"].endswith("tok/s")), decode
        assert (section, "peak GPU memory (allocated)") in by
    compared = (("fp32", "bf16", "fp32"), ("eager", "bf16 eager", "bf16 SDPA"), ("fp16", "fp16", "fp32"))
    for section, label, ref in compared:
        assert by[(section, f"{label} vs {ref}: greedy tokens, 3 prompts")]["measured"].endswith("/3 identical")
        dp = by[(section, f"{label} vs {ref}: max |dP(yes)|, 8 relations")]
        assert 0 <= dp["value"] < 0.5, dp  # same weights, another dtype / kernel: close, not equal
    assert by[("reuse + upload", "vision / prefix cache hits on a repeated window")]["measured"] == "1 / 1"
    assert by[("reuse + upload", "pinned upload")]["status"] == "skipped"
    assert by[("streaming", "cancel after 3 streamed updates")]["status"] == "ok"
    assert by[("LoRA", "adapter on: max |dP(yes)| vs base")]["value"] > 0
    assert by[("LoRA", "adapter 'none' again: max |dP(yes)| vs base")]["value"] == 0
    for section in ("flash-attn", "8-bit", "4-bit"):  # CUDA only: reported, not run
        assert by[(section, "section")]["status"] == "skipped"


def test_a_failing_section_is_a_row_and_the_run_goes_on(gpu_check):
    """One broken path must not lose the others' numbers: errors, overruns and missing time each become a row."""
    def ok(run, st):
        run.add("fine", "1 ms", value=1e-3)

    def boom(run, st):
        run.add("before the error", "2 ms")
        st.scratch["big"] = object()
        raise RuntimeError("CUDA error: device-side assert\nmore lines")

    def slow(run, st):
        run.add("first step", "3 ms")
        time.sleep(0.05)
        run.check()
        run.add("never reached")

    def absent(run, st):
        raise gpu_check.Skip("bitsandbytes does not import", status="absent")

    run = gpu_check.Run(budget_s=60, echo=False)
    st = gpu_check.State(cuda=False)
    gpu_check.run_sections(run, st, [("a", 30, ok), ("b", 30, boom), ("c", 0.01, slow), ("d", 30, absent),
                                     ("e", 30, ok)])
    got = [(r.section, r.figure, r.status) for r in run.rows]
    assert got == [("a", "fine", "ok"), ("b", "before the error", "ok"), ("b", "section", "FAILED"),
                   ("c", "first step", "ok"), ("c", "section", "stopped"), ("d", "section", "absent"),
                   ("e", "fine", "ok")]
    assert run.rows[2].note == "RuntimeError: CUDA error: device-side assert"
    assert st.scratch == {}  # what a section left behind is freed
    table = run.table()
    assert "FAILED" in table and "device-side assert" in table and "stopped" in table

    late = gpu_check.Run(budget_s=3, echo=False)  # under 5 s left: nothing starts
    gpu_check.run_sections(late, st, [("a", 30, ok)])
    assert [(r.status, r.note) for r in late.rows] == [("skipped", "no time left in the run's budget")]

    skipped = gpu_check.Run(budget_s=60, echo=False)  # sections after a failed build are skipped, not failed
    gpu_check.run_sections(skipped, gpu_check.State(cuda=False, engine=None),
                           gpu_check.guarded([("1 frame", 30, ok)]))
    assert [(r.status, r.note) for r in skipped.rows] == [("skipped",
                                                           "the model was not built (see the build section)")]


def test_known_gpus_and_the_roofline(gpu_check):
    spec = gpu_check.gpu_spec
    gib = 2**30
    assert spec("NVIDIA H100 80GB HBM3", 80 * gib).name == "H100 SXM"
    assert spec("NVIDIA H100 PCIe", 80 * gib).name == "H100 PCIe"
    assert spec("NVIDIA H200", 141 * gib).name == "H200 SXM"
    assert spec("NVIDIA GH200 480GB", 96 * gib).name == "GH200 96GB"
    assert spec("NVIDIA A100-SXM4-40GB", 40 * gib).name == "A100 SXM 40GB"
    assert spec("NVIDIA A100 80GB PCIe", 80 * gib).name == "A100 PCIe 80GB"
    assert spec("NVIDIA L4", 22 * gib).name == "L4" and spec("NVIDIA L40", 45 * gib) is None
    assert spec("NVIDIA GeForce RTX 4090", 24 * gib).name == "RTX 4090"
    assert spec("Orin", 61 * gib).name == "Jetson AGX Orin 64GB" and spec("Orin", 15 * gib) is None
    assert spec("Tesla T4", 15 * gib) is None

    cost = gpu_check.Cost(flops=989e12, bytes=3350e9 / 2)  # one second of compute, half a second of traffic
    assert cost.seconds(spec("NVIDIA H100 80GB HBM3", 80 * gib)) == pytest.approx(1.0)
    assert cost.seconds(None) is None


def test_cost_model_counts_the_real_model(gpu_check):
    """The roofline's parameter counts are the real-size model's own (built on the meta device from the config copy)."""
    import torch

    from phi3v_spatial.model import Phi3VConfig, Phi3VForCausalLM

    cfg = Phi3VConfig(**copy.deepcopy(gpu_check.PHI35_VISION_CONFIG))
    with torch.device("meta"):
        model = Phi3VForCausalLM(cfg)
    dec, head = gpu_check.lm_params(cfg)
    linears = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert (dec, head) == (linears, model.lm_head.weight.numel())
    total = sum(p.numel() for p in model.parameters())
    assert 4.1e9 < total < 4.2e9  # Phi-3.5-vision: 4.15 B
    decode = gpu_check.lm_cost(cfg, new=1, context=0)
    assert decode.bytes == pytest.approx(2 * (dec + head), rel=1e-3)  # a decode step reads every weight once
    # CLIP ViT-L/14-336 up to layer -2 (23 layers) on one crop is about 0.35 TFLOP
    assert 0.3e12 < gpu_check.vision_cost(cfg, crops=1, image_tokens=157).flops < 0.4e12


def test_config_copy_is_the_official_file(gpu_check, official_configs_dir):
    with open(os.path.join(official_configs_dir, "phi-3.5-vision-instruct.config.json")) as f:
        official = json.load(f)
    official.pop("auto_map")
    assert gpu_check.PHI35_VISION_CONFIG == official
