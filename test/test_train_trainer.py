"""Training on a tiny random checkpoint: the loss falls, adapters reload exactly, resume continues exactly."""
import json
import os

import pytest
import torch

from phi3v_spatial.data.records import read_jsonl, write_jsonl
from phi3v_spatial.engine import prompts
from phi3v_spatial.train.collator import SpatialCollator
from phi3v_spatial.train.trainer import TrainConfig, checkpoint_dirs, load_sources, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic records (yes/no + describe), a small tokenizer trained on them, a tiny random checkpoint."""
    from phi3v_spatial.data.synth import generate_dataset
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.train.tokenizer_training import load_fast_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("train")
    path = generate_dataset(str(root / "synth"), 6, seed=3, size=(64, 48), kinds=["yesno", "describe"])
    recs = list(read_jsonl(path))
    texts = [prompts.chat_prompt(r.question, 1) + prompts.answer_target(r.answer) for r in recs]
    tok = train_tokenizer(texts, str(root / "tok"), vocab_size=300)
    base = save_random_checkpoint(str(root / "base"), tok, seed=0, num_crops=1,
                                  pad_token_id=load_fast_tokenizer(tok).pad_token_id)
    small = str(root / "synth" / "subset.jsonl")
    write_jsonl(small, recs[:16])
    return {"root": root, "base": base, "data": [small]}


def _mean_loss(model_dir, data, adapter=None):
    """Answer-token loss of a saved model (+ adapter, loaded the way the node loads it) on ``data``."""
    from phi3v_spatial.model import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_spatial.model.adapters import AdapterManager

    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=1)
    model = Phi3VForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if adapter:
        manager = AdapterManager(model)
        manager.load("spatial", adapter)
        manager.activate("spatial")
    items = load_sources(data)[0][0]
    batch = SpatialCollator(processor)(items)
    with torch.no_grad():
        out = model(**batch)
    return float(out.loss), out.logits


def _cfg(setup, out, **kw):
    base = dict(base=setup["base"], data=setup["data"], out=str(out), steps=8, batch_size=4, grad_accum=2, lr=3e-3,
                warmup_steps=2, seed=0, device="cpu", num_crops=1, progress=False, lora_r=8)
    base.update(kw)
    return TrainConfig(**base)


def test_full_training_lowers_the_loss_and_saves_the_official_layout(setup, tmp_path):
    before, _ = _mean_loss(setup["base"], setup["data"])
    summary = train(_cfg(setup, tmp_path / "full", full=True))
    after, _ = _mean_loss(str(tmp_path / "full"), setup["data"])
    assert after < 0.7 * before, (before, after)
    assert summary["trainable_params"] == summary["total_params"]
    files = set(os.listdir(tmp_path / "full"))
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)


def test_lora_adapter_lowers_the_loss_and_reloads_with_identical_outputs(setup, tmp_path):
    out = tmp_path / "lora"
    cfg = _cfg(setup, out, vision_lora=True)
    trained = {}

    def keep_outputs(model, processor):
        batch = SpatialCollator(processor)(load_sources(setup["data"])[0][0])
        with torch.no_grad():
            trained["logits"] = model(**batch).logits

    summary = train(cfg, on_end=keep_outputs)
    assert summary["trainable_params"] < summary["total_params"] / 2
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    acfg = json.load(open(out / "adapter_config.json"))
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 8 and acfg["lora_alpha"] == 16
    assert "img_projection.0" in acfg["target_modules"] and "qkv_proj" in acfg["target_modules"]

    base_loss, base_logits = _mean_loss(setup["base"], setup["data"])
    loss, logits = _mean_loss(setup["base"], setup["data"], adapter=str(out))
    assert loss < 0.8 * base_loss, (base_loss, loss)
    assert not torch.allclose(logits, base_logits, atol=1e-3)

    # base + saved adapter through AdapterManager == the trained model at the end of training
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)


class _Interrupt(Exception):
    pass


def test_resume_continues_at_the_right_step_and_matches_an_uninterrupted_run(setup, tmp_path):
    from safetensors.torch import load_file

    full_run = tmp_path / "uninterrupted"
    train(_cfg(setup, full_run, save_every=3, lora_dropout=0.1))

    cut = tmp_path / "interrupted"

    def stop_at_5(step, loss):
        if step == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        train(_cfg(setup, cut, save_every=3, lora_dropout=0.1), on_step=stop_at_5)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(cut))] == ["step-0000003"]
    summary = train(_cfg(setup, cut, save_every=3, lora_dropout=0.1, resume=True))
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8

    a = load_file(str(full_run / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log_a = [json.loads(line)["loss"] for line in open(full_run / "train_log.jsonl")]
    assert len(log_a) >= 1

    # a fresh (non-resumed) run with another seed ends elsewhere: the comparison above can fail
    other = tmp_path / "other-seed"
    train(_cfg(setup, other, save_every=3, lora_dropout=0.1, seed=1))
    c = load_file(str(other / "adapter_model.safetensors"))
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_init_adapter_continues_an_adapter_from_its_weights_and_config(setup, tmp_path):
    """A second phase (--init-adapter) starts exactly where the first adapter ended -- its config (rank 8) wins
    over the new run's rank -- keeps learning, and saves an adapter the node loads."""
    from safetensors.torch import load_file

    first = tmp_path / "phase1"
    train(_cfg(setup, first, steps=4))
    start = {}

    def record_start(step, loss):
        if step == 1:
            start["loss"] = loss

    second = tmp_path / "phase2"
    summary = train(_cfg(setup, second, steps=6, lora_r=32, init_adapter=str(first), warmup_steps=0, lr=3e-3),
                    on_step=record_start)
    assert json.load(open(second / "adapter_config.json"))["r"] == 8
    w1, w2 = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    assert set(w1) == set(w2) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    # the continued run's first step is scored by the phase-1 adapter, not a fresh (identity) one
    phase1_loss, _ = _mean_loss(setup["base"], setup["data"], adapter=str(first))
    fresh_loss, _ = _mean_loss(setup["base"], setup["data"])
    assert abs(start["loss"] - phase1_loss) < abs(start["loss"] - fresh_loss)
    loss2, _ = _mean_loss(setup["base"], setup["data"], adapter=str(second))
    assert loss2 < phase1_loss and summary["steps"] == 6


def test_init_adapter_errors_are_clear(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        train(_cfg(setup, tmp_path / "x", init_adapter=str(tmp_path)))
    with pytest.raises(ValueError, match="cannot be combined with --full"):
        train(_cfg(setup, tmp_path / "y", full=True, init_adapter=str(tmp_path)))


def test_geometry_loss_falls_and_its_heads_continue_into_the_next_phase(setup, tmp_path):
    """--geometry-weight: the heads' error falls, they are saved beside the adapter (which stays a plain PEFT
    adapter the node loads), and a next phase (--init-adapter) starts from them instead of fresh heads."""
    from safetensors.torch import load_file

    first = tmp_path / "geo1"
    summary = train(_cfg(setup, first, steps=12, geometry_weight=1.0, geometry_layers=(1, 2), log_every=1))
    log = [json.loads(line) for line in open(first / "train_log.jsonl")]
    mse = [sum(x["geometry_mse"].values()) for x in log]
    assert set(log[0]["geometry_mse"]) == {"name", "answer"}
    assert mse[-1] < 0.6 * mse[0], mse
    assert (first / "geometry_heads.safetensors").exists()
    plain = tmp_path / "plain"
    plain_summary = train(_cfg(setup, plain, steps=12, log_every=1))
    assert plain_summary["trainable_params"] == summary["trainable_params"]   # the heads are not in the adapter
    assert "geometry_mse" not in json.loads(open(plain / "train_log.jsonl").readline())
    loss, _ = _mean_loss(setup["base"], setup["data"], adapter=str(first))
    base_loss, _ = _mean_loss(setup["base"], setup["data"])
    assert loss < base_loss

    def second_phase(name):
        out = tmp_path / name
        train(_cfg(setup, out, steps=1, geometry_weight=1.0, geometry_layers=(1, 2), init_adapter=str(first),
                   lr=1e-9, warmup_steps=0))
        return load_file(str(out / "geometry_heads.safetensors"))

    saved = load_file(str(first / "geometry_heads.safetensors"))
    continued = second_phase("geo2")
    os.remove(first / "geometry_heads.safetensors")
    fresh = second_phase("geo3")
    assert saved.keys() == continued.keys() == fresh.keys()
    for k in saved:
        torch.testing.assert_close(continued[k], saved[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(fresh[k], saved[k], atol=1e-3) for k in saved)


def test_resume_with_the_geometry_loss_matches_an_uninterrupted_run(setup, tmp_path):
    from safetensors.torch import load_file

    kw = dict(save_every=3, geometry_weight=1.0, geometry_layers=(1, 2))
    full_run = tmp_path / "uninterrupted"
    train(_cfg(setup, full_run, **kw))
    cut = tmp_path / "interrupted"

    def stop_at_5(step, loss):
        if step == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        train(_cfg(setup, cut, **kw), on_step=stop_at_5)
    assert train(_cfg(setup, cut, resume=True, **kw))["resumed_from_step"] == 3
    for f in ("adapter_model.safetensors", "geometry_heads.safetensors"):
        a, b = load_file(str(full_run / f)), load_file(str(cut / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # resuming a run that had no heads with the loss switched on is an error, not silently fresh heads
    plain = tmp_path / "plain"
    with pytest.raises(_Interrupt):
        train(_cfg(setup, plain, save_every=3), on_step=stop_at_5)
    with pytest.raises(RuntimeError, match="no geometry heads"):
        train(_cfg(setup, plain, resume=True, **kw))


def test_geometry_layers_are_checked(setup, tmp_path):
    with pytest.raises(ValueError, match="--geometry-layers"):
        train(_cfg(setup, tmp_path / "bad", geometry_weight=1.0, geometry_layers=(2, 99)))


def test_length_groups_train_like_one_padded_batch(setup, tmp_path):
    """length_groups=2: each micro-batch as two groups of similar length, each padded to its own longest, weighted
    by answer tokens and geometry rows -- the same losses and the same adapter and heads as one padded batch."""
    from safetensors.torch import load_file

    from phi3v_spatial.model import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(setup["base"], num_crops=1)
    items = load_sources(setup["data"])[0][0][:8]
    groups = SpatialCollator(processor).batches(items, 2)
    widths = [g["input_ids"].shape[1] for g in groups]
    assert len(groups) == 2 and widths[0] < widths[1] == SpatialCollator(processor)(items)["input_ids"].shape[1]
    kw = dict(steps=6, geometry_weight=1.0, geometry_layers=(1, 2), log_every=1)
    one, two = tmp_path / "one", tmp_path / "two"
    train(_cfg(setup, one, **kw))
    train(_cfg(setup, two, length_groups=2, **kw))
    log_one = [json.loads(line) for line in open(one / "train_log.jsonl")]
    log_two = [json.loads(line) for line in open(two / "train_log.jsonl")]
    for a, b in zip(log_one, log_two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["geometry_mse"].keys() == b["geometry_mse"].keys()
        for k in a["geometry_mse"]:
            assert a["geometry_mse"][k] == pytest.approx(b["geometry_mse"][k], rel=1e-4, abs=1e-7)
    assert log_one[-1]["loss"] < log_one[0]["loss"]
    for f in ("adapter_model.safetensors", "geometry_heads.safetensors"):
        a, b = load_file(str(one / f)), load_file(str(two / f))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
