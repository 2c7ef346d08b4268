"""The embedded-model recipe end to end at toy size: record sets, the adapter phases on one adapter, the report."""
import json
import os

import pytest
import torch

from phi3v_spatial.data.questions import CANONICAL_RELATIONS
from phi3v_spatial.data.records import read_jsonl
from phi3v_spatial.train.embedded import (
    ADAPTER_PHASES, RECORD_SETS, TOKENIZER_SKIP_TYPES, AdapterPhase, Recipe, adapter_phases, build, eval_markdown,
    training_texts,
)

TOY = dict(train_scenes=6, eval_scenes=2, image_size=(64, 48), vocab_size=500, hidden=32, layers=1, heads=2,
           intermediate=64, vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64, init_gain=1.0,
           align_steps=2, align_batch=4, base_steps=2, base_batch=4, lora_batch=4, lora_r=4, lora_alpha=8,
           lora_geometry_layers=(1, 1), data_workers=2,
           adapter_phases=[["canonical", [["spatial_canonical", 1]], 2, 1e-3],
                           ["all", [["spatial", 1], ["plan", 0.5], ["multiframe", 0.5], ["base", 0.25]], 3, 5e-4]])


def test_build_runs_every_stage_and_trains_one_adapter_through_its_phases(tmp_path):
    from safetensors.torch import load_file

    r = Recipe(**TOY)
    work = str(tmp_path / "work")
    before = torch.get_num_threads()
    build("", work, r, stages="abcde")
    assert torch.get_num_threads() == before  # the recipe's thread counts do not leak into the caller
    threads = json.load(open(os.path.join(work, "build_summary.json")))["host"]["torch_threads"]
    assert threads == {"a-d": r.threads, "e": r.lora_threads}
    index = json.load(open(os.path.join(work, "data", "index.json")))
    train = index["train"]
    canonical = list(read_jsonl(train["spatial_canonical"]))
    spatial = list(read_jsonl(train["spatial"]))
    assert canonical and all(x.relation in CANONICAL_RELATIONS for x in canonical)
    assert {x.id for x in canonical} < {x.id for x in spatial}
    # every record set holds its kinds only, and the two-image questions have two images
    for name, types in (("plan", {"plan"}), ("multiframe", {"multiframe"}), ("open", {"open"}),
                        ("quantitative", {"quantitative"}), ("refer", {"refer"}), ("base", set(r.base_types))):
        recs = list(read_jsonl(train[name]))
        assert recs and {x.type for x in recs} <= types, name
    # the tokenizer learns its merges from every training text but the refer questions'
    every = list(read_jsonl(train["records"]))
    texts = training_texts(train["records"])
    assert TOKENIZER_SKIP_TYPES == ("refer",) and any(x.type == "refer" for x in every)
    assert len(texts) == sum(x.type != "refer" for x in every) + 1
    assert not any("Which one is" in t for t in texts)
    assert all(len(x.images) == 2 for x in read_jsonl(train["multiframe"]))
    # training never sees the held-out plan templates; the held-out split has them (and no presence records)
    assert not any(x.template for x in read_jsonl(train["plan"]))
    held = list(read_jsonl(index["heldout"]["eval"]))
    assert {x.type for x in held} >= {"yesno", "plan", "multiframe", "count"} and "presence" not in {x.type for x in held}

    first, final = os.path.join(work, "lora_canonical"), os.path.join(work, "lora")
    a1 = json.load(open(os.path.join(first, "training_args.json")))
    a2 = json.load(open(os.path.join(final, "training_args.json")))
    assert a1["total_steps"] == 2 and a1["lr"] == 1e-3 and a1["init_adapter"] is None
    assert a2["total_steps"] == 3 and a2["lr"] == 5e-4 and a2["init_adapter"] == first
    assert sorted((x["weight"], x["records"]) for x in a2["sources"]) == sorted(
        [(1.0, len(spatial)), (0.5, index["train"]["n_plan"]), (0.5, index["train"]["n_multiframe"]),
         (0.25, index["train"]["n_base"])])
    # both phases share one TrainConfig but for data / out / steps / lr / init_adapter
    shared = {k for k in a1 if k not in ("data", "out", "steps", "lr", "init_adapter", "total_steps", "records",
                                          "sources")}
    assert {k: a1[k] for k in shared} == {k: a2[k] for k in shared}
    for d in (first, final):
        targs = json.load(open(os.path.join(d, "training_args.json")))
        assert targs["geometry_weight"] == r.lora_geometry_weight > 0 and list(targs["geometry_layers"]) == [1, 1]
        assert os.path.isfile(os.path.join(d, "geometry_heads.safetensors"))
    w1 = load_file(os.path.join(first, "adapter_model.safetensors"))
    w2 = load_file(os.path.join(final, "adapter_model.safetensors"))
    assert set(w1) == set(w2) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert r.lora_modules_to_save == ["vision_embed_tokens"] and r.lora_full_layers >= r.layers
    assert any(k.endswith("model.layers.0.mlp.down_proj.weight") for k in w2)
    assert any("lm_head.lora_A" in k for k in w2)

    # evaluation: base without plans, adapter with everything; the page shows the targets table and the phases
    summary = build("", work, r, stages="f")
    assert "plan" not in summary["reports"]["base"]["per_type"] and "plan" in summary["reports"]["adapter"]["per_type"]
    assert summary["times_s"]["e_lora"] > 0 and "f_eval" in summary["times_s"]
    page = eval_markdown(summary)
    assert "| target | base + adapter | goal | met |" in page
    assert "canonical: 2 steps at lr 0.001 on spatial_canonical x1" in page
    assert "auxiliary geometry loss at weight 0.5" in page


def test_adapter_phases_chain_one_adapter_and_name_their_folders():
    data = {"train": {"spatial": "s.jsonl", "spatial_canonical": "c.jsonl", "plan": "p.jsonl", "base": "b.jsonl"}}
    r = Recipe(adapter_phases=[["canonical", [["spatial_canonical", 1]], 5, 1e-3],
                               ["middle", {"spatial": 1, "plan": 0.5}, 6, 5e-4],
                               ["last", [["spatial", 1], ["base", 0.25]], 7, 2e-4]])
    phases = adapter_phases(r, data, "base", "out/lora")
    assert [p.out for p in phases] == ["out/lora_canonical", "out/lora_middle", "out/lora"]
    assert [p.init_adapter for p in phases] == [None, "out/lora_canonical", "out/lora_middle"]
    assert phases[0].data == ["c.jsonl"] and phases[1].data == ["s.jsonl:1", "p.jsonl:0.5"]
    assert [(p.steps, p.lr) for p in phases] == [(5, 1e-3), (6, 5e-4), (7, 2e-4)]
    sets = (*RECORD_SETS, "spatial_canonical")      # every record set stage a writes
    default = adapter_phases(Recipe(), {"train": {k: f"{k}.jsonl" for k in sets}}, "b", "o")
    assert len(default) == len(ADAPTER_PHASES) and all(p.geometry_weight > 0 for p in default)
    with pytest.raises(ValueError, match="unknown record set"):
        adapter_phases(Recipe(adapter_phases=[["x", [["nope", 1]], 1, 1e-3]]), data, "b", "o")
    with pytest.raises(ValueError, match="steps > 0"):
        Recipe(adapter_phases=[["x", [["spatial", 1]], 0, 1e-3]])
    assert AdapterPhase.of({"name": "a", "data": {"spatial": 2}, "steps": 3, "lr": 0.1}) == \
        AdapterPhase("a", (("spatial", 2.0),), 3, 0.1)
