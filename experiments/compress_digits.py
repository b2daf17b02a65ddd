"""Accuracy of compressed gradients against plain DDP on real data: scikit-learn's digits 0-4 (the pretraining
task of experiments/digits.py: 721 training / 180 validation images, 8x8 upsampled to 32 px), ResNet-18 from
scratch, 2 gloo processes under torchrun, --grad-compress none | bf16 | powersgd with the same seeds.

    OMP_NUM_THREADS=1 python experiments/compress_digits.py --out /tmp/compress_digits --seeds 0 1

Each run: 10 epochs, SGD lr 0.05 momentum 0.9, cosine, weight decay 5e-4, batch 16 per process (global 32,
as the single-process pretraining in RESULTS.md), PowerSGD rank 4 after 2 plain steps. Prints a Markdown table:
final validation accuracy per seed, its mean, and the bytes each process all-reduced per step (last epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import digits  # noqa: E402  (experiments/digits.py: the data set writer)
import harness  # noqa: E402  (experiments/harness.py: which runs completed)

from dtl import models  # noqa: E402
from dtl.distributed.compress import step_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KINDS = ("none", "bf16", "powersgd")


def run(out: Path, data: Path, kind: str, seed: int, port: int) -> dict:
    outdir = out / "runs" / kind / f"seed{seed}"
    if not harness.completed(outdir):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "train.py", "--dataset", "folder", "--data-dir", str(data), "--model", "resnet18", "--mode", "scratch",
               "--weights", "none", "--image-size", "32", "--num-workers", "0", "--data-pipeline", "workers",
               "--device", "cpu", "--batch-size", "16", "--epochs", "10", "--lr", "0.05", "--lr-schedule", "cosine",
               "--weight-decay", "5e-4",
               "--seed", str(seed), "--grad-compress", kind, "--powersgd-rank", "4", "--output-dir", str(outdir),
               "--overwrite", "--progress-every", "0"]
        start = time.monotonic()
        log = out / f"{kind}-seed{seed}.log"
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=fh,
                                  stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} seed {seed} failed; see {log}")
        print(f"{kind} seed {seed}: {time.monotonic() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]
    return {"final": rows[-1]["test_acc"], "bytes": rows[-1].get("comm_bytes_per_step")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/compress_digits"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--port", type=int, default=29611)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    digits.make_data(args.out, k=10, val_per_class=50, data_seed=0)
    results = {kind: [run(args.out, args.out / "data" / "pre", kind, s, args.port) for s in args.seeds]
               for kind in KINDS}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    base = statistics.mean(r["final"] for r in results["none"])
    print("| --grad-compress | final val acc per seed | mean | vs none | bytes per step per process |")
    print("|---|---|---:|---:|---:|")
    plain = step_bytes([tuple(p.shape) for p in models.build_model("resnet18", 5, "none", 32).parameters()], "none")
    for kind, rs in results.items():
        mean = statistics.mean(r["final"] for r in rs)
        sent = rs[-1]["bytes"] if rs[-1]["bytes"] is not None else plain  # plain DDP: every fp32 gradient
        accs = ", ".join(f"{100 * r['final']:.1f}%" for r in rs)
        print(f"| {kind} | {accs} | {100 * mean:.1f}% | {100 * (mean - base):+.1f} pt | {sent:,.0f} |")


if __name__ == "__main__":
    main()
