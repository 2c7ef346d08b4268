"""The embedded-model recipe end to end at toy size: the canonical-first adapter curriculum and the scale fix."""
import json
import os

import torch

from phi3v_spatial.data.questions import CANONICAL_RELATIONS
from phi3v_spatial.data.records import read_jsonl
from phi3v_spatial.train.embedded import LATERAL_RELATIONS, Recipe, adapter_phases, build, eval_markdown


def test_build_runs_canonical_then_left_right_phases_then_all_relations_then_the_polish_on_one_adapter(tmp_path):
    from safetensors.torch import load_file

    r = Recipe(train_scenes=8, eval_scenes=2, image_size=(64, 48), vocab_size=400, hidden=32, layers=1, heads=2,
               intermediate=64, vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
               init_gain=1.0, align_steps=2, align_batch=4, base_steps=2, base_batch=4, lora_steps=3, lora_batch=4,
               lora_canonical_steps=2, lora_canonical_mix=0.5, lora_second_lr=1e-3, lora_r=4, lora_alpha=8,
               lora_lateral_steps=2, lora_lateral_mix_steps=1, lora_lateral_polish_steps=1,
               base_types=("describe", "count", "presence"), lora_geometry_layers=(1, 1))
    work = str(tmp_path / "work")
    before = torch.get_num_threads()
    build("", work, r, stages="abcde")
    assert torch.get_num_threads() == before  # the recipe's thread counts do not leak into the caller
    threads = json.load(open(os.path.join(work, "build_summary.json")))["host"]["torch_threads"]
    assert threads == {"a-d": r.threads, "e": r.lora_threads}
    index = json.load(open(os.path.join(work, "data", "index.json")))
    canonical = list(read_jsonl(index["train"]["spatial_canonical"]))
    spatial = list(read_jsonl(index["train"]["spatial"]))
    assert canonical and all(x.relation in CANONICAL_RELATIONS for x in canonical)
    assert len(canonical) < len(spatial) and {x.id for x in canonical} <= {x.id for x in spatial}
    assert any(x.relation not in CANONICAL_RELATIONS for x in spatial)

    lateral = list(read_jsonl(index["train"]["spatial_lateral"]))
    assert lateral and {x.relation for x in lateral} <= LATERAL_RELATIONS
    assert {x.id for x in lateral} == {x.id for x in spatial if x.relation in LATERAL_RELATIONS}

    phase1, final = os.path.join(work, "lora_canonical"), os.path.join(work, "lora")
    assert json.load(open(os.path.join(phase1, "training_args.json")))["total_steps"] == 2
    # left/right alone, then left/right mixed into the full set, each continuing the adapter before it
    lat = json.load(open(os.path.join(work, "lora_lateral", "training_args.json")))
    assert lat["init_adapter"] == phase1 and lat["total_steps"] == 2 and lat["lr"] == 1e-3
    assert [(x["weight"], x["records"]) for x in lat["sources"]] == [(1.0, len(lateral))]
    mix = json.load(open(os.path.join(work, "lora_lateral_mix", "training_args.json")))
    assert mix["init_adapter"] == os.path.join(work, "lora_lateral") and mix["total_steps"] == 1
    assert sorted(x["records"] for x in mix["sources"]) == sorted([len(spatial), len(canonical), len(lateral)])
    assert {x["weight"] for x in mix["sources"]} == {1.0}
    args = json.load(open(os.path.join(work, "lora_relations", "training_args.json")))
    assert args["init_adapter"] == os.path.join(work, "lora_lateral_mix") and args["total_steps"] == 3
    assert args["lr"] == 1e-3
    # the phase on all relations: the full set, with the canonical records mixed back in at the recipe's weight
    assert sorted((x["weight"], x["records"]) for x in args["sources"]) == [(0.5, len(canonical)), (1.0, len(spatial))]
    # the polish: that mix plus the left/right records, continuing it, written where the adapter goes
    pol = json.load(open(os.path.join(final, "training_args.json")))
    assert pol["init_adapter"] == os.path.join(work, "lora_relations") and pol["total_steps"] == 1
    assert sorted((x["weight"], x["records"]) for x in pol["sources"]) == sorted(
        [(0.5, len(canonical)), (1.0, len(spatial)), (1.0, len(lateral))])
    assert json.load(open(os.path.join(phase1, "training_args.json")))["lr"] == r.lora_lr
    # every phase trains with the auxiliary geometry loss and hands its heads to the next one
    for d in ("lora_canonical", "lora_lateral", "lora_lateral_mix", "lora_relations", "lora"):
        targs = json.load(open(os.path.join(work, d, "training_args.json")))
        assert targs["geometry_weight"] == r.lora_geometry_weight > 0 and list(targs["geometry_layers"]) == [1, 1]
        assert os.path.isfile(os.path.join(work, d, "geometry_heads.safetensors"))
        assert "geometry_mse" in json.loads(open(os.path.join(work, d, "train_log.jsonl")).readline())
    w1 = load_file(os.path.join(phase1, "adapter_model.safetensors"))
    w2 = load_file(os.path.join(final, "adapter_model.safetensors"))
    assert set(w1) == set(w2) and any(not torch.equal(w1[k], w2[k]) for k in w1)
    # the recipe's adapter shape: full copies of the vision tower and the decoder layer, LoRA on lm_head
    assert r.lora_modules_to_save == ["vision_embed_tokens"] and r.lora_full_layers >= r.layers
    assert any(k.endswith("model.layers.0.mlp.down_proj.weight") for k in w2)
    assert any(k.endswith("vision_embed_tokens.img_projection.2.weight") for k in w2)
    assert any("lm_head.lora_A" in k for k in w2) and not any("layers.0.self_attn.qkv_proj.lora" in k for k in w2)

    # a partial rerun (evaluation only) keeps the earlier stages' timings and the build's notes, and the page shows both
    summary_path = os.path.join(work, "build_summary.json")
    summary = json.load(open(summary_path))
    summary["notes"] = ["Stage e ran on another machine."]
    json.dump(summary, open(summary_path, "w"))
    rerun = build("", work, r, stages="f")
    assert rerun["notes"] == ["Stage e ran on another machine."]
    assert rerun["times_s"]["e_lora"] == summary["times_s"]["e_lora"] and "f_eval" in rerun["times_s"]
    page = eval_markdown(rerun)
    assert "Stage e ran on another machine." in page
    assert "then all, 3 steps, then with the left/right records mixed in once more, 1 steps" in page
    assert "auxiliary geometry loss at weight 0.5 (hidden states 1 at object names, 1 at the answer)" in page


def test_adapter_phases_without_left_right_phases_are_canonical_then_all():
    """The left/right phases are optional; off, the canonical phase hands over to the last one directly."""
    data = {"train": {"spatial": "s.jsonl", "spatial_canonical": "c.jsonl", "spatial_lateral": "l.jsonl"}}
    phases = adapter_phases(Recipe(lora_lateral_steps=0, lora_lateral_mix_steps=0, lora_lateral_polish_steps=0),
                            data, "base", "out/lora")
    assert [p.out for p in phases] == ["out/lora_canonical", "out/lora"]
    assert phases[1].init_adapter == "out/lora_canonical" and phases[1].data == ["s.jsonl:1", "c.jsonl:1"]
    only_mix = adapter_phases(Recipe(lora_lateral_steps=0, lora_lateral_mix_steps=5, lora_lateral_polish_steps=0),
                              data, "base", "out/lora")
    assert [p.out for p in only_mix] == ["out/lora_canonical", "out/lora_lateral_mix", "out/lora"]
    assert only_mix[1].data == ["s.jsonl:1", "c.jsonl:1", "l.jsonl:1"] and only_mix[1].steps == 5
    assert adapter_phases(Recipe(lora_canonical_steps=0, lora_lateral_steps=9), data, "b", "o")[0].data == ["s.jsonl"]


def test_rehearsal_phase_continues_the_relations_adapter_with_the_base_records_mixed_in():
    """Off by default; on, the phase on all relations writes its own folder and the rehearsal phase writes lora_dir."""
    data = {"train": {"spatial": "s.jsonl", "spatial_canonical": "c.jsonl", "spatial_lateral": "l.jsonl",
                      "base": "b.jsonl"}}
    assert adapter_phases(Recipe(), data, "base", "out/lora")[-1].out == "out/lora"
    assert all("b.jsonl" not in spec for p in adapter_phases(Recipe(), data, "base", "out/lora") for spec in p.data)
    r = Recipe(lora_rehearsal_steps=7, lora_rehearsal_weight=0.25, lora_second_lr=3e-4, lora_lateral_polish_steps=0)
    phases = adapter_phases(r, data, "base", "out/lora")
    assert [p.out for p in phases] == ["out/lora_canonical", "out/lora_relations", "out/lora"]
    last = phases[-1]
    assert last.init_adapter == "out/lora_relations" and last.steps == 7 and last.lr == 3e-4
    assert last.data == ["s.jsonl:1", "c.jsonl:1", "b.jsonl:0.25"]
    assert phases[1].data == ["s.jsonl:1", "c.jsonl:1"] and phases[1].steps == r.lora_steps
    no_mix = adapter_phases(Recipe(lora_rehearsal_steps=7, lora_canonical_mix=0, lora_lateral_polish_steps=0),
                            data, "base", "out/lora")
    assert no_mix[-1].data == ["s.jsonl:1", "b.jsonl:0.5"] and no_mix[1].data == ["s.jsonl"]


def test_left_right_polish_follows_the_relations_phase_and_precedes_the_rehearsal():
    """Off by default since the geometry loss (the default stage e: canonical phase, then all relations into
    lora_dir, both with the loss). When on, the phase on all relations hands over to the polish (its mix + the
    left/right records), which writes lora_dir; with the rehearsal on too, the polish gets its own folder and the
    rehearsal comes last."""
    data = {"train": {"spatial": "s.jsonl", "spatial_canonical": "c.jsonl", "spatial_lateral": "l.jsonl",
                      "base": "b.jsonl"}}
    default = adapter_phases(Recipe(), data, "base", "out/lora")
    assert [p.out for p in default] == ["out/lora_canonical", "out/lora"]
    assert default[1].init_adapter == "out/lora_canonical" and default[1].data == ["s.jsonl:1", "c.jsonl:1"]
    assert all(p.geometry_weight == Recipe().lora_geometry_weight > 0 for p in default)
    r = Recipe(lora_second_lr=3e-4, lora_lateral_polish_steps=1000)
    phases = adapter_phases(r, data, "base", "out/lora")
    assert [p.out for p in phases] == ["out/lora_canonical", "out/lora_relations", "out/lora"]
    polish = phases[-1]
    assert polish.init_adapter == "out/lora_relations" and polish.steps == r.lora_lateral_polish_steps
    assert polish.data == ["s.jsonl:1", "c.jsonl:1", "l.jsonl:1"] and polish.lr == 3e-4
    both = adapter_phases(Recipe(lora_rehearsal_steps=7, lora_lateral_polish_steps=1000), data, "base", "out/lora")
    assert [p.out for p in both] == ["out/lora_canonical", "out/lora_relations", "out/lora_polish", "out/lora"]
    assert both[-1].init_adapter == "out/lora_polish" and both[-1].data == ["s.jsonl:1", "c.jsonl:1", "b.jsonl:0.5"]
    assert [p.out for p in adapter_phases(Recipe(lora_canonical_steps=0), data, "b", "o")] == ["o"]
