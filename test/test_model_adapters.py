"""AdapterManager: several LoRA adapters on one model; on/off/scale/merge change and restore the logits."""
import copy
import json
import os

import pytest
import torch

from phi3v_spatial.model.adapters import (DEFAULT_LORA_TARGETS, VISION_LORA_TARGETS, AdapterError, AdapterManager,
                                          lora_config)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model, tmp_path_factory):
    """Two random (non-zero) LoRA adapters saved with peft: LM-only and LM+vision."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, vision) in enumerate((("spatial", False), ("vision", True))):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(tiny_model), lora_config(r=4, include_vision=vision,
                                                                          init_lora_weights=False))
        peft_model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture
def inputs(tiny_model):
    cfg = tiny_model.config
    n = cfg.num_image_tokens(1, 1)
    ids = torch.tensor([[1, 32010, 29871, 13] + [-1] * n + [1, 29871, 13, 450, 32007, 29871, 13, 32001]])
    pix = torch.randn(1, 3, 3, cfg.crop_size, cfg.crop_size, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, pixel_values=pix, image_sizes=torch.tensor([[cfg.crop_size, cfg.crop_size]]))


def test_targets():
    assert DEFAULT_LORA_TARGETS == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert {"q_proj", "fc1", "img_projection.0", "img_projection.2"} <= set(VISION_LORA_TARGETS)


@torch.no_grad()
def test_on_off_scale_merge(tiny_model, adapter_dirs, inputs):
    model = copy.deepcopy(tiny_model)
    base = model(**inputs).logits
    mgr = AdapterManager(model)
    mgr.load("spatial", adapter_dirs["spatial"])
    mgr.load("vision", adapter_dirs["vision"])
    assert mgr.available == ["spatial", "vision"] and mgr.active == ""
    assert torch.equal(model(**inputs).logits, base)  # loading does not activate

    mgr.activate("spatial")
    spatial = model(**inputs).logits
    assert mgr.active == "spatial" and (spatial - base).abs().max() > 1e-2
    mgr.activate("vision")
    vision = model(**inputs).logits
    assert (vision - spatial).abs().max() > 1e-2 and (vision - base).abs().max() > 1e-2

    mgr.activate(None)
    assert mgr.active == "" and torch.equal(model(**inputs).logits, base)  # disabled = exactly the base model
    mgr.activate("spatial")
    assert torch.equal(model(**inputs).logits, spatial)  # and back exactly

    mgr.activate("spatial", scale=0.0)
    assert torch.allclose(model(**inputs).logits, base, atol=1e-6)
    mgr.activate("spatial", scale=0.5)
    half = model(**inputs).logits
    assert (half - base).abs().max() > 1e-3 and (half - spatial).abs().max() > 1e-3

    mgr.activate("spatial")
    mgr.merge()
    assert mgr.merged
    tol = 1e-4 * spatial.abs().max()
    assert (model(**inputs).logits - spatial).abs().max() <= tol
    mgr.activate(None)  # unmerges
    assert not mgr.merged and (model(**inputs).logits - base).abs().max() <= tol
    mgr.activate("vision")
    assert (model(**inputs).logits - vision).abs().max() <= tol

    mgr.unload("vision")
    assert mgr.available == ["spatial"] and mgr.active == ""
    assert (model(**inputs).logits - base).abs().max() <= tol


def test_errors_name_the_problem(tiny_model, adapter_dirs, tmp_path):
    mgr = AdapterManager(copy.deepcopy(tiny_model))
    with pytest.raises(AdapterError, match="does not exist"):
        mgr.load("x", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        mgr.load("x", str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    with open(adapter_dirs["spatial"] + "/adapter_config.json") as f:
        cfg = json.load(f)
    with open(tmp_path / "noweights" / "adapter_config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(AdapterError, match="no adapter weights"):
        mgr.load("x", str(tmp_path / "noweights"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="not valid JSON"):
        mgr.load("x", str(tmp_path / "badjson"))
    with pytest.raises(AdapterError, match="unknown adapter"):
        mgr.activate("ghost")
    with pytest.raises(AdapterError, match="no adapter is active"):
        mgr.merge()
    mgr.load("spatial", adapter_dirs["spatial"])
    with pytest.raises(AdapterError, match="already loaded"):
        mgr.load("spatial", adapter_dirs["spatial"])
    for reserved in ("eval", "to", "none", "a.b"):
        with pytest.raises(AdapterError, match="is reserved"):
            mgr.load(reserved, adapter_dirs["spatial"])


def test_adapter_for_another_model_is_rejected(tiny_model, tmp_path):
    """An adapter whose target modules do not exist in this model fails with AdapterError."""
    from peft import LoraConfig, get_peft_model

    other = torch.nn.Sequential()
    other.add_module("foo_proj", torch.nn.Linear(4, 4))
    get_peft_model(other, LoraConfig(r=2, target_modules=["foo_proj"])).save_pretrained(str(tmp_path / "other"))
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")
    mgr = AdapterManager(copy.deepcopy(tiny_model))
    with pytest.raises(AdapterError, match="does not fit this model"):
        mgr.load("other", str(tmp_path / "other"))


@torch.no_grad()
def test_modules_to_save_adapter(tiny_model, inputs, tmp_path):
    """An adapter carrying a retrained copy of the whole vision tower + projector (PEFT modules_to_save, as the
    embedded recipe's ``lora_modules_to_save`` writes it) loads through AdapterManager and switches on/off exactly."""
    from peft import get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), lora_config(r=4, init_lora_weights=False,
                                                                      modules_to_save=["vision_embed_tokens"]))
    copy_ = peft_model.base_model.model.model.vision_embed_tokens.modules_to_save["default"]
    for p in copy_.img_projection.parameters():
        p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "mts"))

    model = copy.deepcopy(tiny_model)
    base = model(**inputs).logits
    mgr = AdapterManager(model)
    mgr.load("mts", str(tmp_path / "mts"))
    assert torch.equal(model(**inputs).logits, base)
    mgr.activate("mts")
    on = model(**inputs).logits
    assert (on - base).abs().max() > 1e-2
    mgr.disable()
    assert torch.equal(model(**inputs).logits, base)
    mgr.activate("mts")
    assert torch.equal(model(**inputs).logits, on)


@torch.no_grad()
def test_adapter_with_full_decoder_layers_loads_in_float16(tiny_model, inputs, tmp_path):
    """The embedded recipe's adapter shape: full copies of the vision tower and the last decoder layer(s), LoRA in
    the layers before (``train.embedded.lora_modules``), stored in float16 (``cast_adapter``). It loads through
    AdapterManager, answers like the in-memory adapter up to float16 rounding, and switches off exactly."""
    from peft import get_peft_model

    from phi3v_spatial.train.embedded import Recipe, cast_adapter, lora_modules

    n_layers = tiny_model.config.num_hidden_layers
    saved, targets = lora_modules(Recipe(layers=n_layers, lora_full_layers=1,
                                         lora_modules_to_save=["vision_embed_tokens"], lora_extra_targets=[]))
    assert saved == ["vision_embed_tokens", f"model.layers.{n_layers - 1}"]
    assert all(not t.startswith(f"model.layers.{n_layers - 1}.") for t in targets)
    torch.manual_seed(4)
    peft_model = get_peft_model(copy.deepcopy(tiny_model), lora_config(r=4, targets=targets, init_lora_weights=False,
                                                                      modules_to_save=saved))
    layer_copy = peft_model.base_model.model.model.layers[n_layers - 1].modules_to_save["default"]
    for p in layer_copy.mlp.parameters():
        p.add_(0.05 * torch.randn_like(p))
    expected = peft_model(**inputs).logits
    peft_model.save_pretrained(str(tmp_path / "full"))
    cast_adapter(str(tmp_path / "full"), "float16")
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert {w.dtype for w in stored.values()} == {torch.float16}
    assert any(k.endswith(f"model.layers.{n_layers - 1}.mlp.down_proj.weight") for k in stored)  # the full copy

    model = copy.deepcopy(tiny_model)
    base = model(**inputs).logits
    mgr = AdapterManager(model)
    mgr.load("full", str(tmp_path / "full"))
    mgr.activate("full")
    on = model(**inputs).logits
    assert (on - base).abs().max() > 1e-2
    torch.testing.assert_close(on, expected, atol=5e-3, rtol=5e-3)
    mgr.disable()
    assert torch.equal(model(**inputs).logits, base)
