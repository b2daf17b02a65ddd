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
3. Fine-tune on the few 5-9 images, every config for every seed, each for --ft-epochs epochs, in
   `OUT/runs/<config>/seed<N>` (a run that completed with the same arguments is not run again), then read final
   and best `test_acc` (and `test_acc_ema`) from each run's metrics.jsonl and write `OUT/results.json` and
   `OUT/results.md` (mean ± std over seeds, per seed; difference to `plain`): `experiments/harness.py`,
   shared with `experiments/cifar_photos.py`. `OUT/data/ft-probe` holds the same training images and
   --val-per-class other images per class, for choosing settings without looking at the tables' images
   (`--eval-on probe`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import harness
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

PRE_CLASSES = (0, 1, 2, 3, 4)
FT_CLASSES = (5, 6, 7, 8, 9)

FT = harness.FT
#: the single-feature rows of issues #12, #13 and #22 (beside harness.RECIPE_STUDY and harness.HEAVY)
LEGACY: dict[str, list[str]] = {
    # the file's (pretraining's) 5-class head kept: what every run did before the fresh-head fix (#22)
    "transfer, --keep-head": ["--mode", "transfer", "--keep-head"],
    "plain, --keep-head": [*FT, "--keep-head"],
    "+layer-decay 0.75": [*FT, "--layer-decay", "0.75"],
    "+head-lr-mult 10": [*FT, "--head-lr-mult", "10"],
    "+ema-decay 0.998": [*FT, "--ema-decay", "0.998"],
    "+label-smoothing 0.1": [*FT, "--label-smoothing", "0.1"],
    "+clip-grad-norm 1.0": [*FT, "--clip-grad-norm", "1.0"],
    "+adamw cosine": [*FT, "--optimizer", "adamw", "--lr", "5e-4", "--weight-decay", "0.05", "--lr-schedule",
                      "cosine", "--warmup-epochs", "1"],
    # lp-ft as #12 ran it (its BatchNorm statistics updated after the switch; kept by default since #23)
    "lp-ft (2 lp epochs)": ["--mode", "lp-ft", "--lp-epochs", "2", "--no-freeze-bn-stats"],
    "+auto-augment randaugment": [*FT, "--auto-augment", "randaugment"],
    "+crop pad": [*FT, "--crop", "pad"],
    "+mixup 0.2": [*FT, "--mixup", "0.2"],
    "+cutmix 1.0": [*FT, "--cutmix", "1.0"],
    "+tta flip": [*FT, "--tta", "flip"],
    "all augmentations": [*FT, "--auto-augment", "ta_wide", "--random-erasing", "0.25", "--mixup", "0.2",
                          "--cutmix", "1.0", "--tta", "flip"],
}


def to_png(img8: np.ndarray) -> Image.Image:
    """An 8x8 image with values 0-16 -> a 32x32 RGB image, bilinear, 0-255."""
    small = Image.fromarray(img8.astype(np.float32), mode="F")
    big = np.asarray(small.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    grey = np.clip(np.rint(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def make_data(out: Path, k: int, val_per_class: int | None, data_seed: int) -> dict[str, dict[str, int]]:
    """Write what is missing of OUT/data/pre, OUT/data/ft and OUT/data/ft-probe (all again when the settings
    changed); returns the image counts per split."""
    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(data_seed)
    marker = out / "data" / "done.json"
    settings = {"k": k, "val_per_class": val_per_class, "data_seed": data_seed}
    if marker.is_file() and json.loads(marker.read_text())["settings"] != settings:
        shutil.rmtree(out / "data")
    counts: dict[str, dict[str, int]] = {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if c in PRE_CLASSES:
            n_val = round(0.2 * len(idx))
            parts = {("pre", "train"): idx[n_val:], ("pre", "val"): idx[:n_val]}
        else:
            n_val = len(idx) - k if val_per_class is None else val_per_class
            rest = idx[k + n_val:]
            # the probe set: other images of 5-9 (when all are evaluated, the probe shares them)
            parts = {("ft", "train"): idx[:k], ("ft", "val"): idx[k:k + n_val],
                     ("ft-probe", "train"): idx[:k], ("ft-probe", "val"): rest[:n_val] if len(rest) else idx[k:]}
        for (key, split), index in parts.items():
            counts.setdefault(key, {"train": 0, "val": 0})[split] += len(index)
            folder = out / "data" / key / split / str(c)
            if not folder.is_dir():
                folder.mkdir(parents=True)
                for i in index:
                    to_png(images[i]).save(folder / f"{int(i):04d}.png")
    marker.write_text(json.dumps({"settings": settings, "counts": counts}) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="labelled training images per class (5-9)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="evaluation images per class (5-9); default: all the images not used for training")
    parser.add_argument("--pre-epochs", type=int, default=10)
    parser.add_argument("--pre-lr", type=float, default=0.05, help="SGD lr of the pretraining (cosine)")
    parser.add_argument("--pre-batch-size", type=int, default=32,
                        help="pretraining batch size (721 training images)")
    harness.add_grid_args(parser, ft_epochs=10, batch_size=16, extra_configs=LEGACY)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = make_data(out, args.k, args.val_per_class, args.data_seed)
    harness.run_grid(args, out, counts, pre_extra=["--epochs", str(args.pre_epochs), "--lr", str(args.pre_lr),
                                                   "--batch-size", str(args.pre_batch_size)],
                     extra_configs=LEGACY)


if __name__ == "__main__":
    main()
