"""Data-parallel training: ``phi3v-spatial train`` under ``torchrun`` or ``accelerate launch --multi_gpu``.

The launcher's environment (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
turns it on; gloo on CPU, nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). Every process draws the
same global micro-batch from the shared, identically seeded ``ResumableMixture`` (``--batch-size`` per
process x processes) and keeps its own contiguous share, so the processes together see exactly the batch
one process would draw with the whole global batch size, and the sampler state is the same everywhere.

Losses are normalised by the global micro-batch (``train.loss``): each process weighs its mean answer-token loss
by its share of the micro-batch's answer tokens, and each geometry head's mean squared error by its share of that
head's rows, then the gradients are summed across processes (one all-reduce per optimizer step, after
gradient accumulation). The result is the gradient of the global micro-batch's loss, as one process
computes it, to float rounding; gradient clipping and the optimizer step then run identically everywhere,
so the replicas stay equal. (Not DistributedDataParallel: the geometry heads live beside the model, and
DDP's plain average of per-process means would weigh a process's tokens by how many its share happens to
hold.) Checkpoints, the adapter or full model, the geometry heads and the logs are written by rank 0 only;
each checkpoint keeps every rank's RNG state, so a resumed run continues each process's dropout exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# Gradients go through the all-reduce in flat buckets of at most this many elements.
BUCKET_ELEMENTS = 1 << 24


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class DataParallel:
    rank: int
    world: int
    local_rank: int
    device: object          # where this process computes (and nccl communicates)
    owns_group: bool = False

    @classmethod
    def from_env(cls, device) -> "DataParallel | None":
        """The process group of a multi-process launch (None for a single process); on CUDA each process uses
        ``cuda:LOCAL_RANK`` (the launcher's one GPU per process), whatever index ``device`` names."""
        world = launched_world_size()
        if world <= 1:
            return None
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
        if dist.get_world_size() != world:
            raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
        return cls(dist.get_rank(), world, local_rank, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def sum(self, values) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (a small picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, params) -> None:
        """Rank 0's values everywhere (seeded inits already agree; this makes it a fact, not an assumption)."""
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    def reduce_gradients(self, params) -> None:
        """Sum every gradient across processes. A parameter without a gradient on any process keeps none (so
        AdamW skips it, as one process would); one with a gradient elsewhere gets zeros here first."""
        import torch
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list = []
        size = 0
        for p in live + [None]:
            if p is not None and (not bucket or (p.grad.dtype == bucket[0].grad.dtype and size + p.numel() <= BUCKET_ELEMENTS)):
                bucket.append(p)
                size += p.numel()
                continue
            if bucket:
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                offset = 0
                for q in bucket:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                    offset += q.numel()
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ the global micro-batch
    def shard(self, picks: list) -> list:
        """This process's contiguous share of a global micro-batch (``len(picks)`` = batch size x processes)."""
        per = len(picks) // self.world
        return picks[self.rank * per:(self.rank + 1) * per]

    def whole_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """This process's share counts (``train.loss.share_counts``) summed over the processes."""
        keys = list(counts)
        return {k: int(v) for k, v in zip(keys, self.sum([counts[k] for k in keys]))}
