"""Train a LoRA adapter on spatial records (default), or all weights of a small base model (--full).

The loss covers only the answer tokens (answer + <|end|>\\n<|endoftext|>). Data specs mix datasets by
weight: synth:DIR[:w], vsr:JSONL:IMGDIR[:w], FILE.jsonl[:w]. Checkpoints (--save-every) hold the
optimizer, scheduler, sampler and RNG states; --resume continues from the latest one.
Under torchrun / accelerate launch it trains data-parallel (train/distributed.py): --batch-size is per process,
the gradients are those of the global batch, and rank 0 writes the checkpoints and the adapter.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base checkpoint folder (official Phi-3-vision layout)")
    p.add_argument("--data", required=True, nargs="+", metavar="SPEC", help="dataset specs, mixed by weight")
    p.add_argument("--out", required=True, help="output folder: PEFT adapter (LoRA) or full checkpoint (--full)")
    p.add_argument("--full", action="store_true", help="train all weights and save a full checkpoint (pretraining)")
    g = p.add_argument_group("LoRA (Phi-3 CookBook defaults)")
    g.add_argument("--rank", "-r", type=int, default=64, help="LoRA rank (default 64)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2*rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--targets", nargs="+", default=None,
                   help="module names to adapt (default: the model's DEFAULT_LORA_TARGETS: qkv_proj o_proj gate_up_proj down_proj ...)")
    g.add_argument("--vision-lora", action="store_true",
                   help="also adapt the vision tower (q/k/v/out_proj, fc1, fc2) and the projector (img_projection.0/.2)")
    g.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="continue training this adapter (keeps its rank/targets) instead of starting a new one")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    g.add_argument("--batch-size", type=int, default=1, help="samples per forward pass (per process under torchrun)")
    g.add_argument("--grad-accum", type=int, default=16, help="forward passes per optimizer step")
    g.add_argument("--lr", type=float, default=4e-5, help="peak learning rate (AdamW, linear warmup then decay)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=50, help="warmup steps")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--length-groups", type=int, default=1, metavar="N",
                   help="compute each forward pass's samples as N groups of similar length, each padded only to its "
                        "own longest: the same gradient with less padding (default 1: one padded batch)")
    g = p.add_argument_group("auxiliary geometry loss (synthetic data only; train.geometry)")
    g.add_argument("--geometry-weight", type=float, default=0.0, metavar="W",
                   help="weight of the loss that makes hidden states regress each named object's image position and "
                        "apparent size and depth (from the scenes.jsonl beside synthetic records); 0 = off (default)")
    g.add_argument("--geometry-layers", type=int, nargs=2, default=(2, 3), metavar=("NAME", "ANSWER"),
                   help="hidden-state indices the two heads read: at object names, at the answer position (default 2 3)")
    g = p.add_argument_group("checkpoints and runtime")
    g.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps (0: none)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    g.add_argument("--num-crops", type=int, default=None, help="HD crops per image (default: the checkpoint's)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--save-dtype", default=None, help="--full: dtype of the saved weights (e.g. float16)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    from ..train.trainer import TrainConfig

    return TrainConfig(
        base=args.base, data=list(args.data), out=args.out, full=args.full,
        lora_r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, targets=args.targets,
        vision_lora=args.vision_lora, init_adapter=args.init_adapter, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
        max_grad_norm=args.max_grad_norm, save_every=args.save_every, keep_checkpoints=args.keep,
        resume=args.resume, seed=args.seed, device=args.device, dtype=args.dtype, num_crops=args.num_crops,
        gradient_checkpointing=args.gradient_checkpointing, save_dtype=args.save_dtype, progress=not args.no_progress,
        geometry_weight=args.geometry_weight, geometry_layers=tuple(args.geometry_layers),
        length_groups=args.length_groups,
    )


def run(args) -> int:
    import json

    from ..train.trainer import train

    summary = train(config_from_args(args))
    print(json.dumps(summary, indent=1))
    return 0
