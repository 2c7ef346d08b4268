"""The training loop: LoRA adapters (default) or full training (for the embedded base model).

A hand-written loop rather than ``transformers.Trainer`` because the things that matter here are
small and must be exact: the loss only on answer tokens (the collator's labels), weighted dataset
mixing, gradient accumulation, and checkpoints that resume bit-for-bit (optimizer, scheduler, step,
sampler and RNG states). Precision: bf16 autocast on CUDA (frozen LoRA base weights stored in bf16),
plain fp32 on CPU. Under ``torchrun`` / ``accelerate launch`` it trains data-parallel (``train.distributed``).
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from ..data.mixture import ResumableMixture
from .collator import SpatialCollator
from .loss import COUNT_KEYS, share_counts, share_loss

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    base: str
    data: list[str]
    out: str
    full: bool = False
    # LoRA (CookBook defaults: r=64, alpha=2r, dropout 0, gaussian init)
    lora_r: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    targets: list[str] | None = None
    vision_lora: bool = False
    modules_to_save: list[str] | None = None   # PEFT modules_to_save: fully trained copies inside the adapter
    init_adapter: str | None = None  # continue training this PEFT adapter (its own LoRA config) instead of a new one
    # optimisation (CookBook: lr 4e-5, wd 0.01, betas (0.9, 0.95), eps 1e-7, warmup 50, batch 16 via accumulation)
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 1
    grad_accum: int = 16
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    # >1: pack up to this many records about the same images into one multi-turn chat (collator ``turns``)
    turns: int = 1
    # > 0: the auxiliary geometry loss (``train.geometry``) at this weight, on synthetic two-object questions: a
    # linear head on hidden_states[geometry_layers[0]] at each object name regresses that object's image position,
    # apparent size and depth, one on hidden_states[geometry_layers[1]] at the answer position their difference.
    geometry_weight: float = 0.0
    geometry_layers: tuple = (2, 3)
    # > 1: compute each micro-batch as this many groups of samples of similar length, each padded to its own
    # longest (``train.loss`` weighs them so the gradient stays the whole micro-batch's, to float rounding)
    length_groups: int = 1
    # checkpoints
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    # runtime
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    num_crops: int | None = None
    gradient_checkpointing: bool = False
    save_dtype: str | None = None      # full mode: dtype of the saved checkpoint (e.g. float16 for the embedded model)
    log_every: int = 10
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------
# Data: weighted mixture of record lists (``data.mixture.ResumableMixture``)

def load_sources(specs: Sequence[str]) -> list[tuple[list, float, str]]:
    """``--data`` specs -> [(items [(record, root)], weight, name)] through ``data.mixture``."""
    from ..data.mixture import load_data_specs

    return [([(r, src.root) for r in src.records], src.weight, src.name) for src in load_data_specs(specs)]


# ----------------------------------------------------------------------------------------------------------
# Model setup

def lora_targets(cfg: TrainConfig) -> list[str]:
    """``--targets`` or the model's DEFAULT_LORA_TARGETS, plus the vision tower/projector with ``--vision-lora``."""
    from ..model.adapters import DEFAULT_LORA_TARGETS, VISION_LORA_TARGETS

    targets = list(cfg.targets) if cfg.targets else list(DEFAULT_LORA_TARGETS)
    if cfg.vision_lora:
        targets += [t for t in VISION_LORA_TARGETS if t not in targets]
    return targets


def load_base(cfg: TrainConfig, device, dtype):
    """Model + processor from ``cfg.base``; LoRA runs keep the frozen base in the compute dtype."""
    import torch

    from ..model import Phi3VForCausalLM, Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(cfg.base, num_crops=cfg.num_crops)
    load_dtype = torch.float32 if (cfg.full or device.type == "cpu") else dtype
    model = Phi3VForCausalLM.from_pretrained(cfg.base, torch_dtype=load_dtype)
    model.to(device)
    return model, processor


def wrap_lora(model, cfg: TrainConfig):
    """PEFT LoRA with the CookBook recipe (alpha 2r, gaussian init), the config the node's AdapterManager loads."""
    from peft import get_peft_model

    from ..model.adapters import lora_config

    lcfg = lora_config(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                       targets=lora_targets(cfg), include_vision=False, init_lora_weights="gaussian",
                       modules_to_save=cfg.modules_to_save)
    return get_peft_model(model, lcfg)


def continue_lora(model, adapter_dir: str):
    """An existing adapter, trainable again: a curriculum's next phase, or more steps on new data. Its saved
    LoRA config (rank, targets, modules_to_save) wins over the command line's."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"--init-adapter {adapter_dir!r}: no adapter_config.json there (a PEFT adapter folder "
                                "written by `phi3v-spatial train` is expected)")
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    import torch

    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def make_scheduler(optimizer, warmup: int, total: int):
    """Linear warmup to the peak lr, then linear decay to 0 at ``total`` steps."""
    import torch

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _geometry_setup(cfg: TrainConfig, model, device):
    """(heads, SceneGeometry) for ``cfg.geometry_weight`` > 0, else (None, None). The heads continue those saved
    beside ``cfg.init_adapter`` when that phase used the same layers."""
    if not cfg.geometry_weight or cfg.geometry_weight <= 0:
        return None, None
    from .geometry import SceneGeometry, make_geometry_heads

    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    layers = tuple(int(x) for x in cfg.geometry_layers)
    n = int(config.num_hidden_layers)
    if len(layers) != 2 or not all(0 <= x <= n for x in layers):
        raise ValueError(f"--geometry-layers {list(cfg.geometry_layers)}: need two hidden-state indices in 0..{n} "
                         f"(0 = the embeddings, {n} = the last layer's output; this model has {n} layers)")
    heads = make_geometry_heads(int(config.hidden_size), layers).to(device)
    if cfg.init_adapter and heads.load(cfg.init_adapter):
        print(f"geometry heads continued from {cfg.init_adapter}", flush=True)
    heads.train()
    return heads, SceneGeometry()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_dirs(out: str) -> list[str]:
    dirs = glob.glob(os.path.join(out, CHECKPOINT_DIR, "step-*"))
    done = [d for d in dirs if os.path.isfile(os.path.join(d, "state.json"))]
    return sorted(done, key=lambda d: int(d.rsplit("-", 1)[1]))


def _rng_state() -> dict:
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, sampler, losses: list, keep: int,
                    heads=None, rng_ranks: list | None = None) -> str:
    """Everything a resumed run needs; written to a temp dir and renamed so a crash never leaves a
    half checkpoint that ``--resume`` would pick. ``rng_ranks``: every process's RNG state (data-parallel)."""
    import torch

    final = os.path.join(out, CHECKPOINT_DIR, f"step-{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(trainable_state(model), os.path.join(tmp, "trainable.pt"))
    if heads is not None:
        torch.save(heads.state_dict(), os.path.join(tmp, "geometry_heads.pt"))
    opt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
    if rng_ranks is not None:
        opt["rng_ranks"] = rng_ranks
    torch.save(opt, os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "sampler": _jsonable(sampler.state_dict()), "losses": losses[-1000:]}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def load_checkpoint(path: str, model, optimizer, scheduler, sampler, heads=None, rank: int = 0) -> tuple[int, list]:
    import torch

    load_trainable_state(model, torch.load(os.path.join(path, "trainable.pt"), map_location="cpu"))
    if heads is not None:
        heads_path = os.path.join(path, "geometry_heads.pt")
        if not os.path.isfile(heads_path):
            raise RuntimeError(f"checkpoint {path} has no geometry heads; it was written without --geometry-weight")
        heads.load_state_dict(torch.load(heads_path, map_location="cpu"))
    opt = torch.load(os.path.join(path, "optim.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    with open(os.path.join(path, "state.json")) as f:
        st = json.load(f)
    sampler.load_state_dict(st["sampler"])
    ranks = opt.get("rng_ranks") or []
    _set_rng_state(ranks[rank] if rank < len(ranks) else opt["rng"])
    return int(st["step"]), list(st.get("losses", []))


# ----------------------------------------------------------------------------------------------------------
# Saving the result

def save_adapter(model, out: str, base_name: str | None = None) -> None:
    """PEFT adapter dir: adapter_config.json + adapter_model.safetensors."""
    model.save_pretrained(out, safe_serialization=True)
    if base_name is not None:
        path = os.path.join(out, "adapter_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = base_name
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")


def save_full(model, processor, out: str, save_dtype: str | None = None) -> None:
    """Official-layout checkpoint (config, safetensors, processor/tokenizer files)."""
    import copy

    import torch

    from ..model.runtime import resolve_dtype

    to_save = model
    if save_dtype:
        dt = resolve_dtype(save_dtype, "cpu")
        to_save = copy.deepcopy(model).to("cpu", dt)
        to_save.config.torch_dtype = dt
    to_save.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    del to_save
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The loop

def backward_micro_batch(model, heads, shares: list, geometry_weight: float, grad_accum: int, dp=None,
                         autocast=None) -> tuple[float, dict]:
    """Forward + backward of one micro-batch given as ``shares`` ((model inputs, geometry targets) per length
    group), each share's loss normalised by the whole micro-batch (``train.loss``; by every process's when ``dp``
    is given). Returns its answer-token loss and {head: mean squared error}, each / ``grad_accum`` (data-parallel:
    this process's part). ``autocast``: a factory of the context each forward pass runs in."""
    import contextlib

    counts = [share_counts(batch, targets) for batch, targets in shares]
    whole = {k: sum(c[k] for c in counts) for k in COUNT_KEYS}
    if dp is not None:
        whole = dp.whole_counts(whole)
    ce, geometry = 0.0, {}
    for (batch, targets), own in zip(shares, counts):
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model(**batch, output_hidden_states=heads is not None)
        loss, part, parts = share_loss(out, own, whole, heads, targets, geometry_weight, grad_accum)
        ce += part
        for k, v in parts.items():
            geometry[k] = geometry.get(k, 0.0) + v
        if loss is not None:
            loss.backward()
    return ce, geometry


def _to_device(batch: dict, device, dtype, use_autocast: bool) -> tuple[dict, dict]:
    """(model inputs on ``device``, geometry targets) of a collated batch."""
    import torch

    batch = {k: v.to(device) for k, v in batch.items()}
    targets = {k: batch.pop(k) for k in [k for k in batch if k.startswith("geometry_")]}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(torch.float32 if not use_autocast else dtype)
    return batch, targets


def total_steps(cfg: TrainConfig, n_records: int, processes: int = 1) -> int:
    if cfg.steps:
        return int(cfg.steps)
    return max(1, math.ceil(cfg.epochs * n_records / (cfg.batch_size * processes * cfg.grad_accum)))


def train(cfg: TrainConfig, sources: list | None = None, on_step: Callable[[int, float], None] | None = None,
          on_end: Callable | None = None) -> dict:
    """Run (or resume) a training; returns a summary dict. ``sources`` overrides ``cfg.data``;
    ``on_step(step, loss)`` runs after every optimizer step, ``on_end(model, processor)`` before saving (on the
    main process only when data-parallel)."""
    import torch

    from ..model.runtime import resolve_device, resolve_dtype
    from .distributed import DataParallel

    t0 = time.time()
    device = resolve_device(cfg.device)
    dp = DataParallel.from_env(device)   # None: one process, the loop below exactly as without a launcher
    if dp is not None:
        device = dp.device
    main = dp is None or dp.is_main
    world = dp.world if dp is not None else 1
    dtype = resolve_dtype(cfg.dtype, device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    if cfg.full and cfg.init_adapter:
        raise ValueError("--init-adapter continues a LoRA adapter; it cannot be combined with --full")
    sources = sources if sources is not None else load_sources(cfg.data)
    items = [s[0] for s in sources]
    sampler = ResumableMixture([len(i) for i in items], [s[1] for s in sources], cfg.seed)
    n_records = sum(len(i) for i in items)
    steps = total_steps(cfg, n_records, world)

    model, processor = load_base(cfg, device, dtype)
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.init_adapter:
        model = continue_lora(model, cfg.init_adapter)
    else:
        model = wrap_lora(model, cfg)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    heads, geometry = _geometry_setup(cfg, model, device)
    if heads is not None:   # a training aid, not part of the model: no weight decay, not counted as trainable
        no_decay += list(heads.parameters())
        params = params + list(heads.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-7,
    )
    scheduler = make_scheduler(optimizer, min(cfg.warmup_steps, max(0, steps - 1)), steps)
    collator = SpatialCollator(processor, turns=cfg.turns,
                               items=[it for i in items for it in i] if cfg.turns > 1 else None, geometry=geometry)
    if dp is not None:
        dp.broadcast_parameters(params)
        if dp.rank:   # each process its own dropout masks (rank 0 keeps the single-process stream)
            torch.manual_seed(cfg.seed * 1_000_003 + dp.rank)

    os.makedirs(cfg.out, exist_ok=True)
    step, losses = 0, []
    resumed_from = None
    if cfg.resume:
        ckpts = checkpoint_dirs(cfg.out)
        if ckpts:
            step, losses = load_checkpoint(ckpts[-1], model, optimizer, scheduler, sampler, heads,
                                           rank=dp.rank if dp is not None else 0)
            resumed_from = step
            if main:
                print(f"resumed from {ckpts[-1]} at step {step}/{steps}", flush=True)
        elif main:
            print(f"--resume: no checkpoint under {cfg.out}/{CHECKPOINT_DIR}; starting at step 0", flush=True)
    parallel = {"processes": world, "global_batch": cfg.batch_size * world * cfg.grad_accum} if dp is not None else {}
    if main:
        with open(os.path.join(cfg.out, "training_args.json"), "w") as f:
            json.dump({**asdict(cfg), "total_steps": steps, "records": n_records, **parallel,
                       "sources": [{"name": s[2], "records": len(s[0]), "weight": s[1]} for s in sources]}, f, indent=1)

    def checkpoint() -> None:   # a collective when data-parallel (every rank's RNG state), written by rank 0
        rng_ranks = dp.gather(_rng_state()) if dp is not None else None
        if main:
            save_checkpoint(cfg.out, step, model, optimizer, scheduler, sampler, losses, cfg.keep_checkpoints, heads,
                            rng_ranks=rng_ranks)

    use_autocast = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    bar = None
    if cfg.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc="train" + (" (full)" if cfg.full else " (lora)"), dynamic_ncols=True)
    ema = losses[-1] if losses else None

    def autocast():   # the context of each forward pass: bf16 / fp16 autocast on CUDA, plain fp32 on CPU
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=use_autocast)

    while step < steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_geometry = 0.0, {}
        for _ in range(cfg.grad_accum):
            picks = [sampler.next() for _ in range(cfg.batch_size * world)]
            if dp is not None:   # every process draws the global micro-batch and keeps its share
                picks = dp.shard(picks)
            shares = [_to_device(b, device, dtype, use_autocast)
                      for b in collator.batches([items[d][i] for d, i in picks], cfg.length_groups)]
            part, geometry_parts = backward_micro_batch(model, heads, shares, cfg.geometry_weight, cfg.grad_accum,
                                                        dp=dp, autocast=autocast)
            step_loss += part
            for k, v in geometry_parts.items():
                step_geometry[k] = step_geometry.get(k, 0.0) + v
        if dp is not None:   # the global micro-batches' gradient, and their loss for the log
            dp.reduce_gradients(params)
            keys = list(step_geometry)
            summed = dp.sum([step_loss] + [step_geometry[k] for k in keys])
            step_loss, step_geometry = summed[0], dict(zip(keys, summed[1:]))
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(step_loss)
        ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
        if on_step:
            on_step(step, step_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if main and (step % max(1, cfg.log_every) == 0 or step == steps):
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": step_loss, "loss_ema": ema,
                                    "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1),
                                    **({"geometry_mse": step_geometry} if heads is not None else {})}) + "\n")
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            checkpoint()
    if bar is not None:
        bar.close()

    model.eval()
    if main:
        if on_end:
            on_end(model, processor)
        if cfg.full:
            save_full(model, processor, cfg.out, cfg.save_dtype)
        else:
            save_adapter(model, cfg.out)
        if heads is not None:   # beside the adapter, so a next phase (--init-adapter) continues them
            heads.save(cfg.out)
    if cfg.save_every:   # the final state as a checkpoint too, so --resume with more --steps continues
        checkpoint()
    summary = {"steps": step, "total_steps": steps, "resumed_from_step": resumed_from, "final_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None, "trainable_params": n_trainable, "total_params": n_total,
               "seconds": round(time.time() - t0, 1), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               **parallel}
    if main:
        with open(os.path.join(cfg.out, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if dp is not None:   # everything is on disk before any process reports success
        dp.barrier()
        dp.close()
    return summary
