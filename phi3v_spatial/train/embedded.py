"""Rebuild the embedded demo model (``models/``) from nothing, reproducibly, on a couple of CPU cores.

Why this recipe: the embedded model must (1) load and run like the real Phi-3-vision (same layout, processor,
tokens, prompts), (2) stay a few MB, and (3) serve every interface of the node with one adapter: relation yes/no and
choices, plans checked by executing them, two-frame and two-camera questions, counting, open and metric answers.
The base is pretrained from scratch only on tasks that need no layout (listing the objects in colour order,
counting them, "Is there a red object?"), so switching the adapter off shows what the adapter adds.

Stages (each writes under ``work_dir``; ``models/`` only receives the final files):
  a. synthetic data: training scenes (seed ``train_seed``) and held-out scenes (``eval_seed``), two frames and two
     cameras each, split into record sets (``RECORD_SETS``);
  b. a small BPE tokenizer with the Phi-3 special tokens, trained on the training texts;
  c. a small Phi3V checkpoint in the official layout (``model.tiny``), initialised for training from scratch
     (``model.initialization``), then the colour/position alignment of the vision tower + projector (``train.align``);
  d. full pretraining on ``base_types`` (describe + count + presence), several questions per image in one chat;
  e. one PEFT adapter trained in ``adapter_phases`` (each a ``TrainConfig`` from ``adapter_config`` plus its own
     data, steps and learning rate, continuing the phase before it), all with the auxiliary geometry loss;
  f. held-out evaluation, base vs base + adapter, against the targets -> ``EVAL.md`` + ``eval_report.json``.

The values below are the recipe; each carries its reason in a line. The history behind them (every variant tried,
its numbers, and the diagnosis that led to the geometry loss) is in docs/EMBEDDED_MODEL.md.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace

from ..data.questions import CANONICAL_RELATIONS
from ..data.records import read_jsonl, write_jsonl
from ..engine import prompts
from ..paths import EMBEDDED_ADAPTER_NAME, EMBEDDED_MODEL_NAME

BASE_TYPES = ("describe", "count", "presence")
# Record sets of stage a: name -> the record types it holds (single-image relation records are "spatial").
RECORD_SETS = {
    "base": ("describe", "count", "presence"),
    "count": ("count",),
    "spatial": ("yesno", "choice"),
    "open": ("open",),
    "quantitative": ("quantitative",),
    "plan": ("plan",),
    "multiframe": ("multiframe",),
    "refer": ("refer",),
}
EVAL_TYPES = ("yesno", "choice", "open", "quantitative", "multiframe", "plan", "describe", "count", "refer")
# Records per scene (per camera for the single-image kinds) in the training and the held-out data.
TRAIN_COUNTS = {"yesno": 4, "choice": 2, "open": 1, "quantitative": 2, "multiframe": 4, "multicamera": 2, "plan": 3,
                "presence": 6, "refer": 4}
EVAL_COUNTS = {"yesno": 2, "choice": 1, "open": 1, "quantitative": 1, "multiframe": 4, "multicamera": 2, "plan": 3,
               "presence": 0, "refer": 1}
# Record kinds whose texts do not train the tokenizer (stage b): the refer questions' words are the other kinds'
# words, and leaving them out keeps stages b-d what they were before that kind joined the adapter's data.
TOKENIZER_SKIP_TYPES = ("refer",)


@dataclass(frozen=True)
class AdapterPhase:
    """One adapter training phase: the record sets it draws from with their weights, its steps and peak lr."""

    name: str
    data: tuple
    steps: int
    lr: float

    @classmethod
    def of(cls, value) -> "AdapterPhase":
        """From itself, or from a JSON list/dict (``--set adapter_phases=...``)."""
        if isinstance(value, cls):
            return value
        d = dict(value) if isinstance(value, dict) else dict(zip(("name", "data", "steps", "lr"), value))
        data = d["data"].items() if isinstance(d["data"], dict) else d["data"]
        return cls(str(d["name"]), tuple((str(k), float(w)) for k, w in data), int(d["steps"]), float(d["lr"]))


ADAPTER_PHASES = (
    # One direction of each relation pair first: with both directions asked equally the answer is (direction word)
    # XOR (geometry), which training from scratch is slow to start on (data/questions.py, docs/EMBEDDED_MODEL.md).
    AdapterPhase("canonical", (("spatial_canonical", 1.0),), 2000, 1e-3),
    # Then every interface at once, the canonical records mixed back in (going straight to the full set at the
    # first lr made the adapter forget the canonical phase) and the base's records rehearsed (the adapter's full
    # layer copies otherwise forget counting: 95% -> 0%). Weights: plans and two-image questions are the new skills;
    # counts get their own share besides the base's (with only the base's, one record in eight, counting fell from
    # 95% to 75%), and plans and open answers more than in runs/S13 (their targets were missed the most). Refer
    # questions ask the grounding step of a refer plan alone (runs/S20-S22: resolved alone 78-80% of the time);
    # multi-frame at 1.0, not 0.8, with them beside it (runs/S21, S22).
    AdapterPhase("all", (("spatial", 1.0), ("spatial_canonical", 0.5), ("plan", 1.0), ("multiframe", 1.0),
                         ("open", 0.5), ("quantitative", 0.3), ("base", 0.3), ("count", 0.3), ("refer", 0.6)),
                 6000, 5e-4),
)


@dataclass
class Recipe:
    # a. data: two frames (motion) and two cameras per scene, so every record kind is there; the images of
    # camera 1's and of frame 1 are what the two-image questions need.
    train_seed: int = 1
    eval_seed: int = 90_001
    train_scenes: int = 5000
    eval_scenes: int = 250
    image_size: tuple = (160, 120)
    frames: int = 2
    cameras: int = 2
    data_workers: int = 2          # processes rendering scenes in stage a (the output does not depend on it)
    base_types: tuple = BASE_TYPES   # record kinds of base pretraining (opt-in extra: "locate")
    # b. tokenizer: 1k BPE tokens keep the embeddings small; the training texts decide the merges.
    vocab_size: int = 1024
    # c. model: 112 px crops, CLIP 3x96, LM 4x128 -- a few MB in float16, ~10 ms per query on a CPU core.
    crop_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 384
    layer_idx: int = -1
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    num_crops: int = 1
    init_seed: int = 0
    # Every Linear ~ N(0, init_gain^2 / fan_in), embeddings ~ N(0, embed_std^2): at width 128 the config's 0.02 leaves
    # the network almost linear and it never leaves the plateau of question x image interactions. None = keep 0.02.
    init_gain: float | None = 1.0
    embed_std: float = 1.0
    init_vision: bool = False
    colour_patch_init: bool = True   # 12 patch filters = mean colour per quadrant: colours (the objects' names) at step 0
    sincos_positions: bool = True    # 2D sine-cosine position table: x and y linearly readable from the first step
    sincos_scale: float = 0.5
    # c2. colour/position/shape alignment of the vision tower + projector (``train.align``); 0 = skip. Without it the
    # tiny model learns nothing that depends on the question and the image together; the shape objective needs the
    # steps (shape accuracy of object tokens 0.3 after 400, 0.6-0.7 after 1500-2000; 2000 cost ~600 s on 1 thread).
    align_steps: int = 2000
    align_batch: int = 32
    align_lr: float = 2e-3
    align_position_weight: float = 1.0  # > 0: tokens also keep their (x, y) place linearly readable
    # > 0: object tokens also score as their shape word (ground truth from scenes.jsonl). Without it open answers got
    # the colour right and the shape wrong (open 36%); at weight 3: open 61% after 1500 steps (runs/S15), 86% after
    # 2000 (runs/S16, which also had the varied plan phrasings).
    align_shape_weight: float = 3.0
    # d. pretraining (full): describe + count + presence, several questions about one image per chat.
    base_steps: int = 800
    base_batch: int = 16
    base_lr: float = 1e-3
    base_warmup: int = 50
    base_turns: int = 6
    # e. adapter: the phases above; the settings every phase shares.
    adapter_phases: tuple = ADAPTER_PHASES
    lora_batch: int = 16
    lora_warmup: int = 50
    lora_turns: int = 3              # records about the same images per chat (never two about the same pair)
    # Each micro-batch computed as 2 groups of similar length (``TrainConfig.length_groups``): the "all" phase's
    # batches mix one-turn-long questions with three-turn plan chats, and padded to their longest, 45% of their
    # positions were padding; in 2 groups its steps took 0.38 s instead of 0.47 s (runs/S23 against S22), with the
    # same gradient.
    lora_length_groups: int = 2
    # The auxiliary geometry loss (``train.geometry``): heads make the hidden states at object names hold the
    # object's image position and size (and its motion between two frames), and the answer positions the objects
    # the answer is about. Without it the adapter never learned to fetch a named object's place: relations sat at
    # 75% yes/no, answered from one shared score; with it 95% (docs/EMBEDDED_MODEL.md).
    lora_geometry_weight: float = 0.5
    lora_geometry_layers: tuple = (2, 3)
    lora_r: int = 16
    lora_alpha: float = 32
    # lm_head gets LoRA (as in the CookBook): the base never emitted "yes"/"no" and cannot raise them otherwise.
    lora_extra_targets: list = field(default_factory=lambda: ["lm_head"])
    # Fully trained copies inside the adapter (PEFT modules_to_save): the whole tiny vision tower + projector, and
    # the last ``lora_full_layers`` decoder layers (LoRA in the LM did not learn the converse flip: choices 48%).
    lora_modules_to_save: list = field(default_factory=lambda: ["vision_embed_tokens"])
    lora_full_layers: int = 4
    # f. evaluation (None = every held-out record)
    eval_limit: int | None = None
    seed: int = 0
    # torch CPU threads of stages a-d (1: they repeat bit for bit on one machine, not across machines) and of stage
    # e (2 threads: 0.20 s a step against 0.30 s with 1 on 2 cores; stage e does not repeat bit for bit anyway).
    threads: int = 1
    lora_threads: int | None = 2
    save_dtype: str = "float16"

    def __post_init__(self):
        self.adapter_phases = tuple(AdapterPhase.of(p) for p in self.adapter_phases)
        if not self.adapter_phases or any(p.steps <= 0 for p in self.adapter_phases):
            raise ValueError("every adapter phase needs steps > 0 (drop a phase instead of giving it 0 steps)")


def _log(msg: str) -> None:
    print(f"[build-embedded {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(work: str, r: Recipe) -> dict:
    """Stage a: synthetic scenes + per-set record files (same folder, so image paths resolve). The held-out split
    also uses the instruction templates that training never sees."""
    from ..data.synth import generate_dataset

    out = {}
    kinds = list(dict.fromkeys(tuple(r.base_types) + EVAL_TYPES))
    for split, seed, n, counts, templates in (("train", r.train_seed, r.train_scenes, TRAIN_COUNTS, "train"),
                                              ("heldout", r.eval_seed, r.eval_scenes, EVAL_COUNTS, "all")):
        d = os.path.join(work, "data", split)
        path = generate_dataset(d, n, seed, frames=r.frames, cameras=r.cameras, size=tuple(r.image_size),
                                kinds=kinds if split == "train" else list(EVAL_TYPES), counts=counts,
                                plan_templates=templates, workers=r.data_workers)
        out[split] = {"dir": d, "records": path}
        for name, recs in record_sets(list(read_jsonl(path)), tuple(r.base_types)).items():
            p = os.path.join(d, f"{name}.jsonl")
            out[split][name] = p
            out[split][f"n_{name}"] = write_jsonl(p, recs)
    return out


def record_sets(recs: list, base_types: tuple = BASE_TYPES) -> dict[str, list]:
    """Stage a's record sets of ``recs``: ``RECORD_SETS`` (the base set with ``base_types``), "eval" (every kind
    the evaluation scores) and "spatial_canonical" (the spatial records of one direction per relation pair)."""
    sets = {**RECORD_SETS, "base": tuple(base_types), "eval": EVAL_TYPES}
    out = {name: [x for x in recs if x.type in types] for name, types in sets.items()}
    out["spatial_canonical"] = [x for x in out["spatial"] if x.relation in CANONICAL_RELATIONS]
    return out


def training_texts(records_path: str, skip_types: tuple = TOKENIZER_SKIP_TYPES) -> list[str]:
    """Every prompt + target of the training split (but ``skip_types``), plus fixed prompt texts the engine uses."""
    texts = [prompts.chat_prompt(x.question, len(x.images)) + prompts.answer_target(x.answer)
             for x in read_jsonl(records_path) if x.type not in skip_types]
    texts.append(prompts.plan_request("Put the red cube left of the blue sphere."))
    return texts


def training_images(records_path: str) -> list[str]:
    """Absolute paths of the distinct images of a records file (file order)."""
    root = os.path.dirname(os.path.abspath(records_path))
    seen: dict[str, None] = {}
    for x in read_jsonl(records_path):
        for p in x.image_paths(root):
            seen.setdefault(p, None)
    return list(seen)


def make_base_checkpoint(out: str, tokenizer_dir: str, r: Recipe, align_images: list[str] | None = None) -> str:
    """Stage c: official-layout files from ``model.tiny``, weights re-initialised the way the model
    initialises itself (std 0.02, unit norms) — better for training from scratch than test weights."""
    import torch

    from ..model import Phi3VForCausalLM
    from ..model.initialization import quadrant_colour_filters, sincos_2d, width_aware_init
    from ..model.tiny import save_random_checkpoint
    from .tokenizer_training import load_fast_tokenizer

    tok = load_fast_tokenizer(tokenizer_dir)
    save_random_checkpoint(
        out, tokenizer_dir, seed=r.init_seed, num_crops=r.num_crops, n_shards=1,
        crop_size=r.crop_size, patch_size=r.patch_size, vision_hidden_size=r.vision_hidden,
        vision_layers=r.vision_layers, vision_heads=r.vision_heads, vision_intermediate_size=r.vision_intermediate,
        layer_idx=r.layer_idx, hidden_size=r.hidden, num_hidden_layers=r.layers, num_attention_heads=r.heads,
        num_key_value_heads=r.heads, intermediate_size=r.intermediate, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("</s>"), pad_token_id=tok.pad_token_id,
        _name_or_path=EMBEDDED_MODEL_NAME, _attn_implementation="sdpa",
    )
    torch.manual_seed(r.init_seed)
    model = Phi3VForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    model.apply(model._init_weights)
    if r.init_gain is not None:
        width_aware_init(model, r.init_gain, r.embed_std, r.init_vision)
    vm = model.model.vision_embed_tokens.img_processor.vision_model
    if r.colour_patch_init:
        with torch.no_grad():
            w = vm.embeddings.patch_embedding.weight          # (hidden, 3, patch, patch)
            w[: 12].copy_(quadrant_colour_filters(w.shape[-1]))
    if r.sincos_positions:
        emb = vm.embeddings.position_embedding
        with torch.no_grad():
            emb.weight.copy_(sincos_2d(emb.weight.shape[0] - 1, emb.weight.shape[1]) * r.sincos_scale)
    if r.align_steps > 0 and align_images:
        from ..model import Phi3VProcessor
        from .align import align_vision

        processor = Phi3VProcessor.from_pretrained(out, num_crops=r.num_crops)
        s = align_vision(model, processor, align_images, r.align_steps, batch_size=r.align_batch, lr=r.align_lr,
                         seed=r.init_seed, position_weight=r.align_position_weight,
                         shape_weight=r.align_shape_weight)
        scale = (f", image-token RMS {s['token_rms_before']:.3f} -> {s['token_rms_after']:.3f} (words)"
                 if "token_rms_after" in s else "")
        shape = f", object-token shape accuracy {s['shape_acc']:.2f}" if "shape_acc" in s else ""
        _log(f"colour alignment: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}{shape}{scale} ({s['seconds']:.0f}s)")
    for f in os.listdir(out):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".index.json")):
            os.remove(os.path.join(out, f))
    model.save_pretrained(out)
    return out


def cast_adapter(adapter_dir: str, dtype: str) -> None:
    """Rewrite a PEFT adapter's floating-point weights in ``dtype`` (e.g. float16: half the committed size; PEFT
    casts them back to the model's dtype when it loads them). A no-op when they already are."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    dt = getattr(torch, dtype)
    weights = load_file(path)
    if all(w.dtype == dt or not w.is_floating_point() for w in weights.values()):
        return
    save_file({k: w.to(dt) if w.is_floating_point() else w for k, w in weights.items()}, path,
              metadata={"format": "pt"})


def _copy_model_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in sorted(os.listdir(src)):
        p = os.path.join(src, f)
        if os.path.isfile(p) and (f.endswith(".json") or f.endswith(".safetensors")) and not f.startswith(("train", "training")):
            shutil.copyfile(p, os.path.join(dst, f))


def _eval(model_dir: str, adapter: str | None, records: str, r: Recipe, out_json: str, title: str,
          types: tuple = EVAL_TYPES) -> dict:
    from .evaluate import evaluate_records, format_table, load_scorer, select_items, write_report
    from .trainer import load_sources

    items = [it for it in select_items(load_sources([records]), r.eval_limit, r.seed) if it[0].type in types]
    scorer = load_scorer(model_dir, adapter, device="cpu", num_crops=r.num_crops)
    report, preds = evaluate_records(scorer, items, progress=False)
    write_report(out_json, report, preds, model=model_dir, adapter=adapter, data=[records])
    _log("\n" + format_table(report, title=title))
    return report


def build(out_models: str, work: str, r: Recipe | None = None, stages: str = "abcdef") -> dict:
    """Run the recipe; returns timings + evaluation summary. ``stages`` lets a rerun skip finished ones."""
    import torch

    caller_threads = torch.get_num_threads()
    try:
        return _build(out_models, work, r or Recipe(), stages)
    finally:  # the recipe's thread counts are its own; the calling process keeps its setting
        torch.set_num_threads(caller_threads)


def _threads(n: int) -> int:
    return n if n > 0 else max(1, os.cpu_count() or 1)


def _build(out_models: str, work: str, r: Recipe, stages: str) -> dict:
    import torch

    from .tokenizer_training import train_tokenizer
    from .trainer import TrainConfig, train

    torch.set_num_threads(_threads(r.threads))
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "recipe.json"), "w") as f:
        json.dump(asdict(r), f, indent=1)
    times: dict[str, float] = {}
    threads = {"a-d": torch.get_num_threads()}
    t_all = time.time()
    tok_dir = os.path.join(work, "tokenizer")
    init_dir = os.path.join(work, "init")
    base_dir = os.path.join(work, "base")
    lora_dir = os.path.join(work, "lora")
    data_index = os.path.join(work, "data", "index.json")

    if "a" in stages:
        t = time.time()
        data = make_data(work, r)
        with open(data_index, "w") as f:
            json.dump(data, f, indent=1)
        times["a_data"] = time.time() - t
        sizes = ", ".join(f"{k[2:]} {v}" for k, v in data["train"].items() if k.startswith("n_"))
        _log(f"data: training records {sizes}; {data['heldout']['n_eval']} held-out ({times['a_data']:.0f}s)")
    with open(data_index) as f:
        data = json.load(f)
    if "b" in stages:
        t = time.time()
        train_tokenizer(training_texts(data["train"]["records"]), tok_dir, vocab_size=r.vocab_size)
        times["b_tokenizer"] = time.time() - t
    if "c" in stages:
        t = time.time()
        shutil.rmtree(init_dir, ignore_errors=True)
        make_base_checkpoint(init_dir, tok_dir, r,
                             align_images=training_images(data["train"]["records"]) if r.align_steps > 0 else None)
        times["c_init"] = time.time() - t
    if "d" in stages:
        t = time.time()
        shutil.rmtree(base_dir, ignore_errors=True)
        s = train(TrainConfig(base=init_dir, data=[data["train"]["base"]], out=base_dir, full=True, steps=r.base_steps,
                              batch_size=r.base_batch, grad_accum=1, lr=r.base_lr, warmup_steps=r.base_warmup,
                              weight_decay=0.01, seed=r.seed, device="cpu", num_crops=r.num_crops,
                              save_dtype=r.save_dtype, log_every=10, turns=r.base_turns))
        times["d_pretrain"] = time.time() - t
        _log(f"pretrain: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} ({times['d_pretrain']:.0f}s)")
    if "e" in stages:
        t = time.time()
        if r.lora_threads is not None:
            torch.set_num_threads(_threads(r.lora_threads))
        threads["e"] = torch.get_num_threads()
        for cfg in adapter_phases(r, data, base_dir, lora_dir):
            shutil.rmtree(cfg.out, ignore_errors=True)
            s = train(cfg)
            _log(f"lora ({os.path.basename(cfg.out)}): loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")
        times["e_lora"] = time.time() - t
        _log(f"lora: {times['e_lora']:.0f}s")
    reports = {}
    if "f" in stages:
        t = time.time()
        held = data["heldout"]["eval"]
        if r.save_dtype:  # stored like the base; the evaluation below reads the stored (rounded) weights
            cast_adapter(lora_dir, r.save_dtype)
        # The base is not asked for plans: it was never trained to write them, and generating them is most of the cost.
        reports["base"] = _eval(base_dir, None, held, r, os.path.join(work, "eval_base.json"), "base model (no adapter)",
                                types=tuple(t for t in EVAL_TYPES if t != "plan"))
        reports["adapter"] = _eval(base_dir, lora_dir, held, r, os.path.join(work, "eval_adapter.json"),
                                   "base model + spatial adapter")
        times["f_eval"] = time.time() - t
    # A partial rerun (e.g. --stages f) keeps the timings measured for the stages it skipped.
    # Its ``notes`` (e.g. where the kept timings were measured) are kept too.
    prev_path = os.path.join(work, "build_summary.json")
    notes: list = []
    if stages != "abcdef" and os.path.isfile(prev_path):
        with open(prev_path) as f:
            prev_summary = json.load(f)
        prev, notes = prev_summary.get("times_s", {}), list(prev_summary.get("notes", []))
        times = {**{k: v for k, v in prev.items() if k != "total"}, **times}
        times["total"] = sum(v for k, v in times.items() if k != "total")
    else:
        times["total"] = time.time() - t_all
    summary = {"recipe": asdict(r), "times_s": {k: round(v, 1) for k, v in times.items()}, "reports": reports,
               "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch_threads": threads}}
    if notes:
        summary["notes"] = notes
    with open(os.path.join(work, "build_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if "f" in stages and out_models:
        publish(out_models, work, base_dir, lora_dir, summary)
    return summary


def adapter_config(r: Recipe, base_dir: str):
    """The ``TrainConfig`` every adapter phase shares (a phase replaces data, out, steps, lr and init_adapter)."""
    from .trainer import TrainConfig

    saved, targets = lora_modules(r)
    return TrainConfig(base=base_dir, data=[], out="", full=False, batch_size=r.lora_batch, grad_accum=1,
                       warmup_steps=r.lora_warmup, lora_r=r.lora_r, lora_alpha=r.lora_alpha,
                       modules_to_save=saved or None, targets=targets, weight_decay=0.0, seed=r.seed, device="cpu",
                       num_crops=r.num_crops, log_every=10, turns=r.lora_turns, length_groups=r.lora_length_groups,
                       geometry_weight=r.lora_geometry_weight, geometry_layers=tuple(r.lora_geometry_layers))


def adapter_phases(r: Recipe, data: dict, base_dir: str, lora_dir: str) -> list:
    """Stage e's training runs, one per ``r.adapter_phases``, each continuing the adapter (and geometry heads) of
    the one before; every phase but the last writes ``lora_dir + "_" + name``, the last ``lora_dir``."""
    shared = adapter_config(r, base_dir)
    train = data["train"]
    out, previous = [], None
    for k, phase in enumerate(r.adapter_phases):
        unknown = [name for name, _ in phase.data if name not in train]
        if unknown:
            raise ValueError(f"adapter phase {phase.name!r}: unknown record set(s) {unknown}; known: "
                             f"{', '.join(sorted(x for x in train if not x.startswith('n_') and x not in ('dir', 'records')))}")
        specs = [train[name] if len(phase.data) == 1 else f"{train[name]}:{w:g}" for name, w in phase.data]
        folder = lora_dir if k == len(r.adapter_phases) - 1 else f"{lora_dir}_{phase.name}"
        cfg = replace(shared, data=specs, out=folder, steps=phase.steps, lr=phase.lr, init_adapter=previous)
        out.append(cfg)
        previous = folder
    return out


def lora_modules(r: Recipe) -> tuple[list[str], list[str]]:
    """(modules_to_save, LoRA targets) of the adapter: the recipe's full copies plus the last ``lora_full_layers``
    decoder layers; LoRA on the default targets of the other layers (and the extra targets)."""
    from ..model.adapters import DEFAULT_LORA_TARGETS

    n_full = max(0, min(r.lora_full_layers, r.layers))
    saved = list(r.lora_modules_to_save) + [f"model.layers.{i}" for i in range(r.layers - n_full, r.layers)]
    if n_full == 0:
        targets = list(DEFAULT_LORA_TARGETS)
    else:  # full paths, so the LoRA stays out of the fully trained layers
        targets = [f"model.layers.{i}.{_LAYER_PATHS[t]}" for i in range(r.layers - n_full) for t in DEFAULT_LORA_TARGETS]
    return saved, targets + [t for t in r.lora_extra_targets if t not in targets]


_LAYER_PATHS = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
                "gate_up_proj": "mlp.gate_up_proj", "down_proj": "mlp.down_proj"}


def publish(out_models: str, work: str, base_dir: str, lora_dir: str, summary: dict) -> None:
    """Copy the final files into ``models/`` and write EVAL.md + eval_report.json."""
    model_out = os.path.join(out_models, EMBEDDED_MODEL_NAME)
    adapter_out = os.path.join(out_models, f"{EMBEDDED_MODEL_NAME}-lora-{EMBEDDED_ADAPTER_NAME}")
    for d in (model_out, adapter_out):
        shutil.rmtree(d, ignore_errors=True)
    _copy_model_files(base_dir, model_out)
    os.makedirs(adapter_out, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(os.path.join(lora_dir, f), os.path.join(adapter_out, f))
    cfg_path = os.path.join(adapter_out, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = EMBEDDED_MODEL_NAME   # not the build machine's temp path
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_models, "eval_report.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(out_models, "EVAL.md"), "w") as f:
        f.write(eval_markdown(summary))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _phase_words(r: dict) -> str:
    phases = [AdapterPhase.of(p) for p in r.get("adapter_phases", ())]
    return "; ".join(f"{p.name}: {p.steps} steps at lr {p.lr:g} on " + ", ".join(f"{n} x{w:g}" for n, w in p.data)
                     for p in phases)


def _geometry_words(r: dict) -> str:
    if not r.get("lora_geometry_weight"):
        return ""
    layers = r.get("lora_geometry_layers") or (2, 3)
    return (f"; every phase with the auxiliary geometry loss at weight {r['lora_geometry_weight']:g} (hidden states "
            f"{layers[0]} at object names, {layers[1]} at answer positions)")


_BASE_TASK_WORDS = {"describe": "object listing", "count": "counting", "presence": "colour presence",
                    "locate": "object locating"}


def _base_task_words(kinds) -> str:
    return " + ".join(_BASE_TASK_WORDS.get(k, k) for k in kinds)


def _adapter_shape_words(r: dict) -> str:
    """What the adapter carries: LoRA only, or fully trained copies too (``lora_modules``)."""
    kw = {k: v for k, v in r.items() if k in Recipe.__dataclass_fields__}
    saved, targets = lora_modules(Recipe(**kw))
    if not saved:
        return ": LoRA"
    return f": full copies of {', '.join(saved)}; LoRA on {', '.join(targets) or 'nothing else'}"


def target_rows(summary: dict) -> list[dict]:
    """The acceptance rows (issue 20's table) as the adapter's evaluation measured them."""
    return list((summary["reports"].get("adapter") or {}).get("targets") or [])


def target_status(summary: dict) -> str:
    rows = target_rows(summary)
    missed = [row for row in rows if not row.get("met")]
    if not rows:
        return "**Targets:** not evaluated."
    if not missed:
        return f"**All {len(rows)} targets met** with the adapter."
    return (f"**{len(rows) - len(missed)} of {len(rows)} targets met** with the adapter; not met: "
            + ", ".join(f"{row['name']} {_pct(row.get('value'))} (target {_pct(row.get('target'))})" for row in missed)
            + ".")


def eval_markdown(summary: dict) -> str:
    """The human-readable evaluation page committed next to the model."""
    from .evaluate import format_table

    rep = summary["reports"]
    base, ada = rep.get("base", {}), rep.get("adapter", {})
    r = summary["recipe"]
    lines = [
        "# Embedded model: held-out evaluation",
        "",
        f"`{EMBEDDED_MODEL_NAME}` (base, pretrained from scratch only on {_base_task_words(r.get('base_types', BASE_TYPES))}) "
        f"and `{EMBEDDED_MODEL_NAME}-lora-{EMBEDDED_ADAPTER_NAME}` (one PEFT adapter for every interface"
        + _adapter_shape_words(r) + _geometry_words(r) + "; phases: " + _phase_words(r) + "), "
        f"evaluated on {r['eval_scenes']} held-out synthetic scenes (seed {r['eval_seed']}; training seed "
        f"{r['train_seed']}; {r.get('frames', 1)} frames and {r.get('cameras', 1)} cameras per scene; plan "
        "instructions also in templates training never saw).",
        "yes/no: P(yes) vs P(no) of the first answer token; choice: highest answer likelihood; plans: greedy "
        "generation, parsed, executed on the scene's 3D ground truth (`data.executor`), goal checked with "
        "`relation_holds`; open / count / describe: greedy exact match; metric: within the record's tolerance.",
        "",
        target_status(summary),
        "",
        "| target | base + adapter | goal | met |",
        "|---|---:|---:|:---:|",
    ]
    for row in target_rows(summary):
        lines.append(f"| {row['name']} | {_pct(row.get('value'))} | {row.get('goal', _pct(row.get('target')))} | "
                     f"{'yes' if row.get('met') else 'no'} |")
    lines += ["", "| metric | n | base | base + adapter |", "|---|---:|---:|---:|"]

    def row(name, b, a):
        lines.append(f"| {name} | {(a or b or {}).get('n', '-')} | {_pct((b or {}).get('accuracy'))} | "
                     f"{_pct((a or {}).get('accuracy'))} |")

    row("overall", base.get("overall"), ada.get("overall"))
    for t in sorted(set(base.get("per_type", {})) | set(ada.get("per_type", {}))):
        row(f"type: {t}", base.get("per_type", {}).get(t), ada.get("per_type", {}).get(t))
    for rel in ada.get("per_relation", {}):
        row(f"relation: {rel}", base.get("per_relation", {}).get(rel), ada.get("per_relation", {}).get(rel))
    if "yesno_predicted_yes_rate" in ada:
        lines.append(f"| yes/no: share answered yes | | {_pct(base.get('yesno_predicted_yes_rate'))} | "
                     f"{_pct(ada.get('yesno_predicted_yes_rate'))} |")
    if ada:
        lines += ["", "Full report of base + adapter (`phi3v-spatial eval` prints the same):", "", "```",
                  format_table(ada), "```"]
    t = summary["times_s"]
    lines += [
        "",
        "Rebuild: `make embedded` (= `phi3v-spatial build-embedded --out models`). Build times on "
        f"{summary['host']['cpus']} CPU cores ({summary['host']['machine']}): "
        + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()) + ".",
        "",
    ]
    if summary.get("notes"):
        lines += [" ".join(summary["notes"]), ""]
    lines += ["Recipe: " + ", ".join(f"{k}={v}" for k, v in r.items()) + ".", ""]
    return "\n".join(lines)
