"""Official state-dict names, loading (shards, .bin, extras, errors), saving, config parsing and LongRoPE."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3v_spatial.model import CheckpointError, Phi3VConfig, Phi3VForCausalLM
from phi3v_spatial.model.tiny import save_random_checkpoint, tiny_config_dict


def official_config(configs_dir, name="phi-3-vision-128k-instruct"):
    with open(os.path.join(configs_dir, f"{name}.config.json")) as f:
        return json.load(f)


def official_names(configs_dir):
    with open(os.path.join(configs_dir, "phi-3-vision-128k-instruct.model.safetensors.index.json")) as f:
        return set(json.load(f)["weight_map"])


@pytest.mark.parametrize("name", ["phi-3-vision-128k-instruct", "phi-3.5-vision-instruct"])
def test_official_config_builds_the_official_state_dict(official_configs_dir, name):
    """All 592 official tensor names, and only those, on the meta device (cheap)."""
    raw = official_config(official_configs_dir, name)
    before = copy.deepcopy(raw)
    config = Phi3VConfig(**raw)
    assert raw == before  # the caller's dict (rope_scaling) is not modified
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    sd = model.state_dict()
    names = official_names(official_configs_dir)
    assert len(names) == 592
    assert set(sd) == names
    assert tuple(sd["model.layers.0.self_attn.qkv_proj.weight"].shape) == (9216, 3072)
    assert tuple(sd["model.layers.31.mlp.gate_up_proj.weight"].shape) == (16384, 3072)
    assert tuple(sd["model.vision_embed_tokens.img_projection.0.weight"].shape) == (3072, 4096)
    assert tuple(sd["model.vision_embed_tokens.glb_GN"].shape) == (1, 1, 4096)
    assert tuple(sd["model.vision_embed_tokens.sub_GN"].shape) == (1, 1, 1, 4096)
    pe = "model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight"
    assert tuple(sd[pe].shape) == (577, 1024)
    assert tuple(sd["lm_head.weight"].shape) == (32064, 3072)
    total = sum(v.numel() for v in sd.values())
    assert abs(total * 2 - 8_293_242_880) < 1e6  # bf16 bytes of the released checkpoint


def test_official_config_parsing(official_configs_dir):
    cfg = Phi3VConfig(**official_config(official_configs_dir))
    assert cfg.rope_parameters["rope_type"] == "longrope"
    assert cfg.rope_parameters["original_max_position_embeddings"] == 4096
    assert len(cfg.rope_parameters["short_factor"]) == len(cfg.rope_parameters["long_factor"]) == 48
    assert cfg._attn_implementation in (None, "sdpa", "eager", "flash_attention_2")
    from phi3v_spatial.model.runtime import flash_attn_available

    if not flash_attn_available():
        assert cfg._attn_implementation != "flash_attention_2"
    vc = cfg.clip_vision_config()
    assert (vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads,
            vc.intermediate_size, vc.hidden_act) == (336, 14, 1024, 24, 16, 4096, "quick_gelu")
    assert cfg.layer_idx == -2 and cfg.vision_layers_used == 23
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.vocab_size, cfg.tie_word_embeddings) == (2, 1, 32064, False)


def test_vision_config_dict_overrides_the_tower():
    cfg = Phi3VConfig(**tiny_config_dict(), vision_config={"image_size": 84, "num_hidden_layers": 3})
    vc = cfg.clip_vision_config()
    assert (vc.image_size, vc.num_hidden_layers, vc.hidden_size) == (84, 3, 32)
    assert cfg.num_image_tokens(1, 1) == 2 * 9 + 1 + 2 * 3
    with pytest.raises(ValueError, match="even patch grid"):
        Phi3VConfig(**tiny_config_dict(crop_size=42))


def test_longrope_switches_past_original_max_positions(official_configs_dir):
    """cos/sin scaled by sqrt(1 + ln(32)/ln(4096)) = 1.1902; short factors up to 4096 positions, long after."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    cfg = Phi3VConfig(**official_config(official_configs_dir))
    rot = Phi3RotaryEmbedding(cfg)
    expected_scale = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert rot.attention_scaling == pytest.approx(expected_scale, rel=1e-9)
    assert round(expected_scale, 4) == 1.1902
    hd = 96
    base = 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    short = 1.0 / (torch.tensor(cfg.rope_parameters["short_factor"]) * base)
    long_ = 1.0 / (torch.tensor(cfg.rope_parameters["long_factor"]) * base)
    x = torch.zeros(1, 1, hd)
    for last, inv in ((4095, short), (4096, long_)):
        pos = torch.tensor([[last]])
        cos, sin = rot(x, pos)
        ang = last * inv
        assert torch.allclose(cos[0, 0], torch.cat([ang.cos(), ang.cos()]) * expected_scale, atol=1e-5)
        assert torch.allclose(sin[0, 0], torch.cat([ang.sin(), ang.sin()]) * expected_scale, atol=1e-5)


@torch.no_grad()
def test_long_prompt_uses_long_factors_end_to_end(tiny_model):
    """Past 4096 positions the whole prompt is re-encoded with long factors, so early logits change too."""
    ids = torch.randint(3, 30000, (1, 4100), generator=torch.Generator().manual_seed(0))
    short = tiny_model(input_ids=ids[:, :4096]).logits[0, :50]
    long_ = tiny_model(input_ids=ids).logits[0, :50]
    ref_short = tiny_model(input_ids=ids[:, :50]).logits[0]
    assert torch.allclose(short, ref_short, atol=1e-4)
    assert (long_ - short).abs().max() > 1e-2


# ----------------------------------------------------------------------------- loading and saving
def ids_and_images(model):
    cfg = model.config
    n = cfg.num_image_tokens(1, 2)
    ids = torch.tensor([[1, 32010, 29871, 13] + [-1] * n + [1, 29871, 13, 450, 32007, 29871, 13, 32001]])
    pix = torch.randn(1, 5, 3, cfg.crop_size, cfg.crop_size, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pix, image_sizes=torch.tensor([[cfg.crop_size, 2 * cfg.crop_size]]))


def test_tiny_checkpoint_layout(tiny_model_dir):
    files = set(os.listdir(tiny_model_dir))
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "preprocessor_config.json", "generation_config.json"} <= files
    cfg = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert cfg["rope_scaling"]["type"] == "su" and cfg["model_type"] == "phi3_v" and "embd_layer" in cfg
    index = json.load(open(os.path.join(tiny_model_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) == 2
    with torch.device("meta"):
        names = set(Phi3VForCausalLM(Phi3VConfig(**cfg)).state_dict())
    assert set(index["weight_map"]) == names


def test_official_names_of_tiny_checkpoint_match_official_index(tiny_model_dir, official_configs_dir):
    """Same names as the release, only the per-layer indices run over fewer layers."""
    import re

    index = json.load(open(os.path.join(tiny_model_dir, "model.safetensors.index.json")))
    generalise = lambda names: {re.sub(r"\.\d+\.", ".N.", n) for n in names}  # noqa: E731
    assert generalise(index["weight_map"]) == generalise(official_names(official_configs_dir))


@torch.no_grad()
def test_save_load_roundtrip_identical_logits(tiny_model, tmp_path):
    total = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    tiny_model.save_pretrained(str(tmp_path), max_shard_size=total // 3)  # forces several shards
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    assert any(k.startswith("model.vision_embed_tokens.img_processor.vision_model.") for k in index["weight_map"])
    again = Phi3VForCausalLM.from_pretrained(str(tmp_path))
    batch = ids_and_images(tiny_model)
    assert torch.equal(again(**batch).logits, tiny_model(**batch).logits)


@torch.no_grad()
def test_loads_bin_shards_extra_wte_and_unprefixed_clip_names(tiny_model_dir, tiny_model, tmp_path):
    """pytorch_model*.bin shards, a stray vision_embed_tokens.wte.weight and CLIP keys without 'vision_model.'."""
    sd = {}
    for f in sorted(os.listdir(tiny_model_dir)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(tiny_model_dir, f)))
    sd["model.vision_embed_tokens.wte.weight"] = sd["model.embed_tokens.weight"].clone()
    p = "model.vision_embed_tokens.img_processor.vision_model."
    sd = {(k.replace(p, "model.vision_embed_tokens.img_processor.") if k.startswith(p) else k): v for k, v in sd.items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for fname, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, tmp_path / fname)
    with open(tmp_path / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), tmp_path / "config.json")
    model = Phi3VForCausalLM.from_pretrained(str(tmp_path))
    batch = ids_and_images(tiny_model)
    assert torch.equal(model(**batch).logits, tiny_model(**batch).logits)


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_shard(path, fn):
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = os.path.join(path, index["weight_map"]["lm_head.weight"])
    sd = load_file(shard)
    fn(sd)
    save_file(sd, shard)


def test_missing_unexpected_and_mismatched_tensors_are_named(tiny_model_dir, tmp_path):
    missing = _copy_ckpt(tiny_model_dir, tmp_path / "missing")
    _edit_shard(missing, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): lm_head\.weight"):
        Phi3VForCausalLM.from_pretrained(missing)

    extra = _copy_ckpt(tiny_model_dir, tmp_path / "extra")
    _edit_shard(extra, lambda sd: sd.update({"model.layers.7.mlp.new_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): model\.layers\.7\.mlp\.new_proj\.weight"):
        Phi3VForCausalLM.from_pretrained(extra)

    bad = _copy_ckpt(tiny_model_dir, tmp_path / "bad")
    _edit_shard(bad, lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"][:-64].clone()}))
    vocab, hidden = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"], 64
    with pytest.raises(CheckpointError, match=rf"lm_head\.weight: checkpoint \({vocab - 64}, {hidden}\) vs model \({vocab}, {hidden}\)"):
        Phi3VForCausalLM.from_pretrained(bad)

    shard_gone = _copy_ckpt(tiny_model_dir, tmp_path / "gone")
    os.remove(os.path.join(shard_gone, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Phi3VForCausalLM.from_pretrained(shard_gone)


def test_unknown_hub_id_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory"):
        Phi3VForCausalLM.from_pretrained("no-such-org/no-such-model-xyz", local_files_only=True)


def test_generation_config_stops_on_phi3_turn_tokens(tiny_model_dir, official_tokenizer_dir):
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id[:3] == [32007, 32000, 2]
    assert model.generation_config.pad_token_id == 32000


def test_random_checkpoints_are_seeded(tmp_path):
    a = save_random_checkpoint(str(tmp_path / "a"), None, seed=1)
    b = save_random_checkpoint(str(tmp_path / "b"), None, seed=1)
    c = save_random_checkpoint(str(tmp_path / "c"), None, seed=2)
    sa, sb, sc = (load_file(os.path.join(d, "model-00001-of-00002.safetensors")) for d in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_image_dim_out_follows_the_tower_when_absent():
    raw = tiny_config_dict()
    raw["img_processor"].pop("image_dim_out")
    cfg = Phi3VConfig(**raw)
    assert cfg.image_dim_out == cfg.clip_vision_config().hidden_size == 32
    raw["img_processor"]["image_dim_out"] = 48
    with pytest.raises(ValueError, match="image_dim_out=48"):
        Phi3VConfig(**raw)


def test_small_custom_tokenizer_gets_a_valid_pad_id(tmp_path, official_tokenizer_dir):
    """A tokenizer without id 32000: the tiny checkpoint takes its pad (or eos) id, and bad ids fail clearly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 3, "hi": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    shutil.copy(os.path.join(official_tokenizer_dir, "special_tokens_map.json"), tok_dir / "special_tokens_map.json")
    out = save_random_checkpoint(str(tmp_path / "ckpt"), str(tok_dir))
    cfg = Phi3VConfig.from_pretrained(out)
    assert (cfg.vocab_size, cfg.pad_token_id) == (64, 3)
    with pytest.raises(ValueError, match="pad_token_id=32000 is outside the vocabulary"):
        Phi3VConfig(**tiny_config_dict(vocab_size=64))
