"""Pretrain on real digits 0-4, fine-tune on a few labelled digits 5-9: dtl's fine-tuning features compared.

    OMP_NUM_THREADS=1 python experiments/digits.py --out /tmp/digits --seeds 0 1 2 --val-per-class 50 --jobs 2
    OMP_NUM_THREADS=1 python experiments/digits.py --out /tmp/digits --seeds 0 1 2   # all 846 eval images, serially

Run from the repository root (it calls `train.py` there with the same Python). What it does:

1. Data: `sklearn.datasets.load_digits()` (1,797 real 8x8 greyscale handwritten digits, values 0-16), each image
   upsampled to 32x32 (bilinear), scaled to 0-255 and written as an RGB PNG into two image-folder data sets in
   dtl's `--dataset folder` layout (DATA/train/<class>/*.png, DATA/val/<class>/*.png):
   `OUT/data/pre` (digits 0-4, a per-class 80/20 split seeded by --data-seed) and `OUT/data/ft` (digits 5-9,
   --k images per class for training, all the other 5-9 images, or --val-per-class of them, for evaluation).
   The data is the same for every training seed; --seeds varies the training (head init, data order,
   augmentation).
2. Pretrain once from scratch on 0-4 (`--mode scratch`); its `model.safetensors` is the fine-tuning's
   `--weights FILE` as it is (dtl starts every run from a new head, though the file's also has 5 classes).
3. Fine-tune on the few 5-9 images, every config in CONFIGS for every seed, each for --ft-epochs epochs,
   in `OUT/runs/<config>/seed<N>` (a run that completed with the same arguments is not run again).
4. Read final and best `test_acc` (and `test_acc_ema`) from each run's metrics.jsonl and write
   `OUT/results.json` and `OUT/results.md` (mean ± std over seeds; difference to `plain`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parent.parent
PRE_CLASSES = (0, 1, 2, 3, 4)
FT_CLASSES = (5, 6, 7, 8, 9)

#: config name -> flags added to the common fine-tuning command (every config but `transfer` and `strong`
#: is `--mode finetune` with the plain recipe plus one feature).
FT = ["--mode", "finetune"]
CONFIGS: dict[str, list[str]] = {
    "transfer (head only)": ["--mode", "transfer"],
    "plain": [*FT],
    # the file's (pretraining's) 5-class head kept: what every run did before the fresh-head fix (#22)
    "transfer, --keep-head": ["--mode", "transfer", "--keep-head"],
    "plain, --keep-head": [*FT, "--keep-head"],
    "strong": [*FT, "--recipe", "strong"],
    "+layer-decay 0.75": [*FT, "--layer-decay", "0.75"],
    "+head-lr-mult 10": [*FT, "--head-lr-mult", "10"],
    "+ema-decay 0.998": [*FT, "--ema-decay", "0.998"],
    "+label-smoothing 0.1": [*FT, "--label-smoothing", "0.1"],
    "+clip-grad-norm 1.0": [*FT, "--clip-grad-norm", "1.0"],
    "+adamw cosine": [*FT, "--optimizer", "adamw", "--lr", "5e-4", "--weight-decay", "0.05", "--lr-schedule",
                      "cosine", "--warmup-epochs", "1"],
    "lp-ft (2 lp epochs)": ["--mode", "lp-ft", "--lp-epochs", "2"],
    # issue #13: the augmentations, each on top of `plain` (whose default crop + flip stays on), then together
    "+auto-augment ta_wide": [*FT, "--auto-augment", "ta_wide"],
    "+auto-augment randaugment": [*FT, "--auto-augment", "randaugment"],
    "+crop pad": [*FT, "--crop", "pad"],
    "+random-erasing 0.25": [*FT, "--random-erasing", "0.25"],
    "+mixup 0.2": [*FT, "--mixup", "0.2"],
    "+cutmix 1.0": [*FT, "--cutmix", "1.0"],
    "+tta flip": [*FT, "--tta", "flip"],
    "all augmentations": [*FT, "--auto-augment", "ta_wide", "--random-erasing", "0.25", "--mixup", "0.2",
                          "--cutmix", "1.0", "--tta", "flip"],
}
#: configs whose --lr is their own (the plain --lr is not passed to them)
OWN_LR = ("strong", "+adamw cosine")


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
    return "_".join(part for part in keep.split("_") if part)


def to_png(img8: np.ndarray) -> Image.Image:
    """An 8x8 image with values 0-16 -> a 32x32 RGB image, bilinear, 0-255."""
    small = Image.fromarray(img8.astype(np.float32), mode="F")
    big = np.asarray(small.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    grey = np.clip(np.rint(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
    for i in index:
        folder = root / split / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        to_png(images[i]).save(folder / f"{int(i):04d}.png")


def make_data(out: Path, k: int, val_per_class: int | None, data_seed: int) -> dict[str, dict[str, int]]:
    """Write OUT/data/pre and OUT/data/ft (once); returns the image counts per split."""
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(data_seed)
    pre, ft = out / "data" / "pre", out / "data" / "ft"
    marker = out / "data" / "done.json"
    settings = {"k": k, "val_per_class": val_per_class, "data_seed": data_seed}
    fresh = not marker.is_file() or json.loads(marker.read_text())["settings"] != settings
    if fresh and (out / "data").is_dir():
        shutil.rmtree(out / "data")
    counts: dict[str, dict[str, int]] = {"pre": {"train": 0, "val": 0}, "ft": {"train": 0, "val": 0}}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if c in PRE_CLASSES:
            n_val = round(0.2 * len(idx))
            parts = {"train": idx[n_val:], "val": idx[:n_val]}
            root, key = pre, "pre"
        else:
            parts = {"train": idx[:k], "val": idx[k:] if val_per_class is None else idx[k:k + val_per_class]}
            root, key = ft, "ft"
        for split, index in parts.items():
            counts[key][split] += len(index)
            if fresh:
                write_split(root, split, images, labels, index)
    marker.write_text(json.dumps({"settings": settings, "counts": counts}) + "\n")
    return counts


def completed(outdir: Path, args: list[str] | None = None) -> bool:
    """The run in `outdir` completed (and, given `args`, was started with those arguments by this script)."""
    status, used = outdir / "status.json", outdir / "digits_args.json"
    if not status.is_file() or json.loads(status.read_text()).get("state") != "completed":
        return False
    return args is None or (used.is_file() and json.loads(used.read_text()) == args)


def train(args: list[str], outdir: Path, log: Path) -> float:
    """Run train.py with `args` into `outdir` (skipped when it already completed); returns seconds taken."""
    if completed(outdir, args):
        return 0.0
    cmd = [sys.executable, "train.py", *args, "--output-dir", str(outdir), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.monotonic()
    with log.open("w") as fh:
        fh.write(shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not completed(outdir):
        raise SystemExit(f"train.py failed (exit {proc.returncode}); see {log}")
    (outdir / "digits_args.json").write_text(json.dumps(args) + "\n")
    return time.monotonic() - start


def read_metrics(outdir: Path) -> dict[str, float | None]:
    rows = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "test_acc" in r]
    ema = [r["test_acc_ema"] for r in rows if r.get("test_acc_ema") is not None]
    return {"first": rows[0]["test_acc"], "final": rows[-1]["test_acc"], "best": max(r["test_acc"] for r in rows),
            "final_ema": ema[-1] if ema else None, "best_ema": max(ema) if ema else None,
            "epochs": len(rows)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| config | epoch-1 test acc % | final test acc % | best test acc % | EMA final / best % "
             "| vs plain (final) |",
             "|---|---|---|---|---|---|"]
    plain = statistics.fmean(r["final"] for r in results["plain"]) if "plain" in results else None
    for name, runs in results.items():
        finals = [r["final"] for r in runs]
        emas = [r for r in runs if r["final_ema"] is not None]
        ema = (f"{pct([r['final_ema'] for r in emas])} / {pct([r['best_ema'] for r in emas])}" if emas else "")
        delta = "" if plain is None or name == "plain" else f"{100 * (statistics.fmean(finals) - plain):+.1f}"
        lines.append(f"| {name} | {pct([r['first'] for r in runs])} | {pct(finals)} | {pct([r['best'] for r in runs])} "
                     f"| {ema} | {delta} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (data, runs, results)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the fine-tunes")
    parser.add_argument("--k", type=int, default=10, help="labelled training images per class (5-9)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="evaluation images per class (5-9); default: all the images not used for training")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data splits")
    parser.add_argument("--model", default="resnet18", help="torchvision model (pretraining and fine-tuning)")
    parser.add_argument("--pre-epochs", type=int, default=10)
    parser.add_argument("--pre-lr", type=float, default=0.05, help="SGD lr of the pretraining (cosine)")
    parser.add_argument("--pre-batch-size", type=int, default=32,
                        help="pretraining batch size (721 training images: 16 would leave a last batch of one, "
                        "which BatchNorm refuses at 32 px)")
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="plain recipe's lr for the fine-tunes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes run at the same time")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="CONFIG",
                        help=f"subset of: {', '.join(CONFIGS)}")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    t0 = time.monotonic()

    counts = make_data(out, args.k, args.val_per_class, args.data_seed)
    print(f"data: {json.dumps(counts)}", flush=True)
    common = ["--dataset", "folder", "--model", args.model, "--image-size", "32", "--num-workers", "0",
              "--device", "cpu"]

    pre_run = out / "runs" / "pretrain"
    pre_args = [*common, "--batch-size", str(args.pre_batch_size), "--data-dir", str(out / "data" / "pre"),
                "--mode", "scratch", "--weights", "none",
                "--epochs", str(args.pre_epochs), "--lr", str(args.pre_lr), "--lr-schedule", "cosine",
                "--weight-decay", "5e-4", "--seed", "0"]
    secs = train(pre_args, pre_run, out / "logs" / "pretrain.log")
    pre = read_metrics(pre_run)
    print(f"pretrain: {secs:.0f}s, test_acc {pre['final']:.4f} (best {pre['best']:.4f})", flush=True)
    weights = pre_run / "model.safetensors"  # its 5-class head is replaced by a new one (dtl's default)

    ft_common = [*common, "--batch-size", str(args.batch_size), "--data-dir", str(out / "data" / "ft"),
                 "--weights", str(weights),
                 "--epochs", str(args.ft_epochs)]
    jobs = []
    for name in args.configs:
        lr = [] if name in OWN_LR else ["--lr", str(args.lr)]
        for seed in args.seeds:
            run_args = [*ft_common, *CONFIGS[name], *lr, "--seed", str(seed)]
            jobs.append((name, seed, run_args, out / "runs" / slug(name) / f"seed{seed}"))

    def one(job: tuple) -> tuple[str, int, float]:
        name, seed, run_args, outdir = job
        return name, seed, train(run_args, outdir, out / "logs" / f"{slug(name)}-seed{seed}.log")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, seed, secs in pool.map(one, jobs):
            m = read_metrics(out / "runs" / slug(name) / f"seed{seed}")
            print(f"{name} seed {seed}: {secs:.0f}s, final {m['final']:.4f} best {m['best']:.4f}"
                  + (f" ema {m['final_ema']:.4f}" if m["final_ema"] is not None else ""), flush=True)

    results = {name: [read_metrics(out / "runs" / slug(name) / f"seed{s}") for s in args.seeds]
               for name in args.configs}
    commands = {"pretrain": shlex.join(["python", "train.py", *pre_args, "--output-dir", str(pre_run)])}
    commands.update({f"{name} seed {seed}": shlex.join(["python", "train.py", *run_args, "--output-dir", str(d)])
                     for name, seed, run_args, d in jobs})
    (out / "results.json").write_text(json.dumps({"data": counts, "pretrain": pre, "results": results,
                                                  "commands": commands, "args": vars(args) | {"out": str(out)}},
                                                 indent=1, default=str) + "\n")
    (out / "results.md").write_text(table(results))
    print(table(results))
    print(f"total {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
