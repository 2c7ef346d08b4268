"""generate() determinism and stopping, an external greedy loop, attention choices, training (loss, checkpointing)."""
import copy

import numpy as np
import pytest
import torch

from phi3v_spatial.model import Phi3VForCausalLM
from phi3v_spatial.model.runtime import resolve_attn, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def batch(tiny_processor):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is left of the cup?"}])
    return tiny_processor(text, [img])


@torch.no_grad()
def test_greedy_generate_is_deterministic_and_matches_external_loop(tiny_model, batch):
    n = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    a = tiny_model.generate(**batch, **kwargs)
    b = tiny_model.generate(**batch, **kwargs)
    assert torch.equal(a, b) and a.shape[1] == n + 6
    assert torch.equal(a[:, :n], batch["input_ids"])  # prompt (with its negative ids) comes back untouched
    # external token-by-token loop with the cache, as the engine does
    out = tiny_model(**batch, use_cache=True)
    toks = []
    for _ in range(6):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(int(nxt))
        out = tiny_model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    assert a[0, n:].tolist() == toks


@torch.no_grad()
def test_generate_stops_on_end_token(tiny_model, tiny_processor, batch):
    """Make <|end|> the greedy choice at step 3 (without changing steps 1-2): generation must stop right there."""
    n = batch["input_ids"].shape[1]
    free = tiny_model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None,
                               output_scores=True, return_dict_in_generate=True)
    seq, scores = free.sequences[0, n:].tolist(), free.scores
    end_id = tiny_processor.tokenizer.convert_tokens_to_ids("<|end|>")  # 32007 in the official tokenizer
    assert end_id not in seq[:3]
    target = seq[2]
    l3 = scores[2][0, target].item()
    assert l3 > 0
    eps = 1e-3
    for step in (0, 1):  # the scaled copy must stay below the winner at the earlier steps
        assert (1 + eps) * scores[step][0, target] < scores[step][0, seq[step]]
    model = copy.deepcopy(tiny_model)
    model.lm_head.weight[end_id] = model.lm_head.weight[target] * (1 + eps)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)  # eos from generation_config
    assert out[0, n:].tolist() == seq[:2] + [end_id]


@torch.no_grad()
def test_sdpa_matches_eager_on_cpu(tiny_model_dir, batch):
    eager = Phi3VForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    sdpa = Phi3VForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    auto = Phi3VForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="auto")
    assert auto.config._attn_implementation == "sdpa"
    le, ls = eager(**batch).logits, sdpa(**batch).logits
    assert (le - ls).abs().max() <= 1e-4 * le.abs().max()


def test_runtime_auto_choices():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_attn("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attn("eager", "cpu", torch.float32) == "eager"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attn("fast", "cpu", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    from phi3v_spatial.model.runtime import flash_attn_available

    if not flash_attn_available():
        with pytest.raises(ImportError, match="flash_attn"):
            resolve_attn("flash_attention_2", "cpu", torch.bfloat16)


def test_bf16_load_runs(tiny_model_dir, batch):
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_loss_ignores_minus_100_and_image_ids(tiny_model, batch):
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[:, : ids.shape[1] - 3] = -100
    with torch.no_grad():
        out = tiny_model(**batch, labels=labels)
        logits = out.logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
        # labels copied from input_ids (with negative image ids) are accepted: negatives are ignored
        with_images = tiny_model(**batch, labels=ids.clone()).loss
        keep2 = ids[0, 1:] >= 0
        manual2 = torch.nn.functional.cross_entropy(logits[keep2], ids[0, 1:][keep2])
        assert with_images.item() == pytest.approx(manual2.item(), rel=1e-5)


def test_gradient_checkpointing_training_step(tiny_model, batch):
    """Gradients with checkpointing equal those without, and reach the LM, the projector and the CLIP tower."""
    labels = batch["input_ids"].clone()
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(tiny_model)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**batch, labels=labels).loss
        loss.backward()
        named = dict(model.named_parameters())
        grads.append({k: named[k].grad.clone() for k in (
            "model.layers.0.self_attn.qkv_proj.weight", "model.vision_embed_tokens.img_projection.0.weight",
            "model.vision_embed_tokens.sub_GN", "model.vision_embed_tokens.glb_GN",
            "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight")})
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0, k
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k


def test_peft_lora_training_step(tiny_model, batch):
    from peft import get_peft_model

    from phi3v_spatial.model.adapters import lora_config

    model = get_peft_model(copy.deepcopy(tiny_model), lora_config(r=4, include_vision=True))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    loss = model(**batch, labels=batch["input_ids"].clone()).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("img_projection" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items())
    assert any("qkv_proj" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items())


@torch.no_grad()
def test_left_padded_batch_generation_matches_single_rows(tiny_model, tiny_processor):
    """Two prompts with different image counts/sizes, left padded: each row generates what it generates alone."""
    p = tiny_processor
    rng = np.random.default_rng(0)
    a = p(p.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhere?"}]),
          [rng.integers(0, 255, (60, 200, 3), dtype=np.uint8)])
    b = p(p.apply_chat_template([{"role": "user", "content": "<|image_1|>\n<|image_2|>\nIs the cup left of the plate?"}]),
          [rng.integers(0, 255, (300, 90, 3), dtype=np.uint8), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)])
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    singles = [tiny_model.generate(**x, **kw)[0, -5:].tolist() for x in (a, b)]
    both = tiny_model.generate(**p.collate([a, b], padding_side="left"), **kw)[:, -5:].tolist()
    assert both == singles
