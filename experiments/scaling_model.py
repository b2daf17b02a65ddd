"""A scaling model for data-parallel training: time per step from compute time, bytes per step and link
bandwidths, for 1 -> 8 GPUs in a node and 1 -> 8 nodes, with and without gradient compression and under FSDP.
Every input is a flag (defaults: the H200 numbers measured in this repository and a 25 GB/s-per-node network);
the bytes come from the model's gradient shapes (`dtl.distributed.compress.step_bytes`), so anyone can redo it for
their model and cluster:

    python experiments/scaling_model.py --model vgg16 --compute-ms 19.9 --intra-gbs 400 --inter-gbs 25

Model (bandwidth-only, no latency term): a ring all-reduce of S bytes over N peers moves 2 (N-1)/N x S
through each link; hierarchically, within a node over G GPUs at --intra-gbs, then across M nodes at
--inter-gbs per node. FSDP moves 3 (N-1)/N x S (all-gather for forward, again for backward, reduce-scatter of
the gradients) instead of 2. PowerSGD runs two all-reduces (P, then Q) of its much smaller payload. Time per
step: compute + communication (no overlap: the pessimistic bound) and max(compute, communication - the part
hidden behind backward) with backward = 2/3 of compute (the optimistic bound). Efficiency = compute / step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtl import models  # noqa: E402
from dtl.distributed.compress import step_bytes  # noqa: E402


def comm_seconds(payload: float, gpus: int, nodes: int, intra: float, inter: float, factor: float = 2.0) -> float:
    """Seconds to move `payload` bytes by ring collectives moving factor x (N-1)/N x payload per link."""
    within = factor * (gpus - 1) / gpus * payload / intra if gpus > 1 else 0.0
    across = factor * (nodes - 1) / nodes * payload / inter if nodes > 1 else 0.0
    return within + across


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="dtl model name (its gradient shapes set the bytes)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--compute-ms", type=float, default=19.9,
                        help="forward+backward+step of one GPU's batch (default: VGG16 finetune 224 px b64 on an "
                             "H200, 3,220 img/s measured in BENCHMARKS.md)")
    parser.add_argument("--intra-gbs", type=float, default=400.0, help="all-reduce bus bandwidth in a node, GB/s")
    parser.add_argument("--inter-gbs", type=float, default=25.0, help="network bandwidth per node, GB/s")
    parser.add_argument("--powersgd-rank", type=int, default=4)
    args = parser.parse_args()
    with torch.device("meta"):
        model = models.build_model(args.model, args.num_classes, "none", 224)
    shapes = [tuple(p.shape) for p in model.parameters()]
    plain = step_bytes(shapes, "none")
    payloads = {"ddp": (plain, 2.0), "ddp+bf16": (step_bytes(shapes, "bf16"), 2.0),
                "ddp+powersgd": (step_bytes(shapes, "powersgd", rank=args.powersgd_rank), 2.0),
                "fsdp": (plain, 3.0)}
    compute = args.compute_ms / 1000
    intra, inter = args.intra_gbs * 1e9, args.inter_gbs * 1e9
    print(f"{args.model}: {plain / 1e6:.1f} MB of fp32 gradients per step; bf16 {payloads['ddp+bf16'][0] / 1e6:.1f} "
          f"MB; PowerSGD rank {args.powersgd_rank} {payloads['ddp+powersgd'][0] / 1e6:.2f} MB; compute "
          f"{args.compute_ms} ms; {args.intra_gbs:g} GB/s in a node, {args.inter_gbs:g} GB/s per node\n")
    print("| GPUs | nodes | strategy | bytes/step per GPU | comm ms | efficiency (no overlap) | "
          "efficiency (overlap with backward) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    layouts = [(g, 1) for g in (1, 2, 4, 8)] + [(8, m) for m in (2, 4, 8)]
    for gpus, nodes in layouts:
        for name, (payload, factor) in payloads.items():
            comm = comm_seconds(payload, gpus, nodes, intra, inter, factor)
            exposed = max(0.0, comm - compute * 2 / 3)
            print(f"| {gpus * nodes} | {nodes} | {name} | {payload / 1e6:,.2f} MB | {comm * 1000:.2f} | "
                  f"{compute / (compute + comm):.0%} | {compute / (compute + exposed):.0%} |")


if __name__ == "__main__":
    main()
