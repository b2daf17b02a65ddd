"""Per-rank memory of DDP vs FSDP (dtl's sharding: `dtl.distributed.fsdp.shard`, per backbone block + root), measured
after one AdamW step on random images. Run under torchrun (gloo on CPUs, NCCL on GPUs works the same):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 4 \
        experiments/fsdp_memory.py --model vgg16 --strategy fsdp

Counted per rank: parameters, gradients and optimizer state as this rank holds them (a DTensor's local shard),
the activations autograd saved for backward (unique storages seen by a saved-tensors hook during the forward),
and under FSDP the largest block it all-gathers at once (the transient full copy of one block during its
forward/backward). Prints one JSON line per rank (rank 0 prints all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtl import models  # noqa: E402
from dtl.distributed import fsdp  # noqa: E402


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "both"], default="fsdp",
                        help="both: DDP, then FSDP, in the same processes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    for strategy in ("ddp", "fsdp") if args.strategy == "both" else (args.strategy,):
        measure(args, strategy)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure(args: argparse.Namespace, strategy: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = models.build_model(args.model, 10, "none", args.image_size)
    largest_block = 0
    if strategy == "fsdp":
        blocks = models.backbone_blocks(model, args.model)
        for prefixes in blocks:
            mods = fsdp._block_modules(model, prefixes)
            largest_block = max(largest_block, sum(p.numel() * p.element_size() for m in mods for p in m.parameters()))
        model = fsdp.shard(model, blocks, None, None, cpu_offload=False)
        root_own = sum(p.numel() * p.element_size() for p in model.parameters(recurse=False))
        largest_block = max(largest_block, root_own)
    else:
        model = DDP(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # weights (and their transposed views) are saved for backward too: not activations; under FSDP the
        # module's parameters at this moment are its all-gathered block
        weights = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
                   for p in model.parameters()}
        if not isinstance(t, DTensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.arange(args.batch_size) % 10
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    row = torch.tensor([local_bytes(params), local_bytes([p.grad for p in params if p.grad is not None]),
                        local_bytes(state), sum(seen.values()), largest_block], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        for r, v in enumerate(rows):
            names = ("params", "grads", "optimizer", "activations", "largest_gathered_block")
            print(json.dumps({"model": args.model, "strategy": strategy, "world": world, "rank": r,
                              "image_size": args.image_size, "batch": args.batch_size,
                              **{n: int(b) for n, b in zip(names, v.tolist())}}), flush=True)


if __name__ == "__main__":
    main()
