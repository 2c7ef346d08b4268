"""Data-parallel training with 2 CPU processes (torchrun, gloo) against one process, on a tiny checkpoint.

2 processes x batch B/2 must follow the loss curve of 1 process x batch B (geometry loss included) to float
tolerance and end at the same adapter and geometry heads; an interrupted 2-process run resumes from its
checkpoint to exactly where the uninterrupted one ends (dropout on: every process's RNG is restored). The
processes run in a private network namespace with only the loopback interface (torch's rendezvous store
listens on every interface), so they reach each other and nothing else.
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from phi3v_spatial.train.trainer import TrainConfig, checkpoint_dirs, train
from test_train_trainer import setup  # noqa: F401 - the module fixture: synthetic records, tokenizer, tiny base

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK_ONLY = os.path.join(HERE, "fixtures", "loopback_only.py")
TRAIN_UNTIL = os.path.join(HERE, "fixtures", "train_until.py")
STEPS = 4


@pytest.fixture(scope="module")
def netns():
    """The command prefix that runs a command in a fresh loopback-only network namespace."""
    prefix = ["unshare", "-rn", sys.executable, LOOPBACK_ONLY]
    try:
        ok = subprocess.run(prefix + [sys.executable, "-c", "pass"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("cannot create a private network namespace (unshare -rn): torch's rendezvous store would "
                    "listen on every interface, so the 2-process test does not run here")
    return prefix


def _cfg(setup, out, **kw):  # noqa: F811
    base = dict(base=setup["base"], data=setup["data"], out=str(out), steps=STEPS, batch_size=4, grad_accum=2,
                lr=3e-3, warmup_steps=2, seed=0, device="cpu", num_crops=1, progress=False, lora_r=8,
                geometry_weight=1.0, geometry_layers=(1, 2), save_every=2, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _torchrun(netns, *argv, check=True):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = netns + [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", "29500", *map(str, argv)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def _cli_train(netns, cfg: TrainConfig, *extra):
    return _torchrun(netns, "-m", "phi3v_spatial.cli", "train", "--base", cfg.base, "--data", *cfg.data, "--out", cfg.out,
                     "--steps", cfg.steps, "--batch-size", cfg.batch_size, "--grad-accum", cfg.grad_accum, "--lr", cfg.lr,
                     "--warmup", cfg.warmup_steps, "--rank", cfg.lora_r, "--dropout", cfg.lora_dropout,
                     "--geometry-weight", cfg.geometry_weight, "--geometry-layers", *cfg.geometry_layers,
                     "--save-every", cfg.save_every, "--num-crops", cfg.num_crops, "--device", "cpu", "--no-progress",
                     *extra)


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


def _final_losses(out):
    """Every step's loss, from the final checkpoint (the CLI logs every 10 steps)."""
    return json.load(open(os.path.join(checkpoint_dirs(str(out))[-1], "state.json")))["losses"]


def _weights(out):
    from safetensors.torch import load_file

    return {f: load_file(os.path.join(out, f)) for f in ("adapter_model.safetensors", "geometry_heads.safetensors")}


def _close(a, b, atol):
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=atol, msg=lambda m: f"{f} {k}: {m}")


def test_two_processes_with_half_batches_follow_one_process(setup, netns, tmp_path):  # noqa: F811
    one = _cfg(setup, tmp_path / "one")
    train(one)
    two = _cfg(setup, tmp_path / "two", batch_size=2)
    _cli_train(netns, two)

    summary = json.load(open(tmp_path / "two" / "train_summary.json"))
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    assert json.load(open(tmp_path / "two" / "training_args.json"))["global_batch"] == 8
    a, b = _final_losses(tmp_path / "one"), _final_losses(tmp_path / "two")
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-5), (a, b)
    assert a[-1] < a[0]
    geo_a = [x["geometry_mse"] for x in _log(tmp_path / "one")]
    geo_b = json.load(open(tmp_path / "two" / "train_log.jsonl"))["geometry_mse"]   # the CLI logs the last step
    assert set(geo_b) == set(geo_a[-1]) and geo_b == pytest.approx(geo_a[-1], rel=1e-5)
    _close(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=2e-5)
    # written once, by rank 0: one log line per logged step, two checkpoints kept
    assert len(_log(tmp_path / "two")) == 1
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path / "two"))] == ["step-0000002", "step-0000004"]


def test_an_interrupted_two_process_run_resumes_exactly(setup, netns, tmp_path):  # noqa: F811
    kw = dict(batch_size=2, lora_dropout=0.1)
    full = _cfg(setup, tmp_path / "full", **kw)
    _cli_train(netns, full)

    cut = _cfg(setup, tmp_path / "cut", **kw)
    config = tmp_path / "cut.json"
    config.write_text(json.dumps(asdict(cut)))
    p = _torchrun(netns, TRAIN_UNTIL, config, 3, check=False)
    assert p.returncode != 0 and "stopped after step 3" in p.stdout + p.stderr
    assert [os.path.basename(d) for d in checkpoint_dirs(cut.out)] == ["step-0000002"]
    assert len(torch.load(os.path.join(checkpoint_dirs(cut.out)[0], "optim.pt"), weights_only=False)["rng_ranks"]) == 2

    p = _cli_train(netns, cut, "--resume")
    assert "resumed from" in p.stdout and json.load(open(tmp_path / "cut" / "train_summary.json"))["resumed_from_step"] == 2
    assert _final_losses(cut.out) == _final_losses(full.out)
    _close(_weights(full.out), _weights(cut.out), atol=1e-6)
