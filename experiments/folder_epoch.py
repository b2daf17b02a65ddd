"""One CPU epoch of an image folder of real photos: `train.py --dataset folder` against the ImageFolder +
DataLoader loop a user would write, in wall time, measured from outside.

    python experiments/folder_epoch.py /tmp/photos500 --make          # 400 + 100 real photos of 500x375 px
    python experiments/folder_epoch.py /tmp/photos500 --rounds 3 --json folder-epoch.json
    python experiments/folder_epoch.py /tmp/photos500 --rounds 3 --side loop --side dtl \
        --side "dtl:--data-pipeline workers"

Photos: random 500x375 crops (375x500 for portrait photographs; a photograph smaller than that is resized up
first) of the photographs `experiments/photo_folder.py` uses (scikit-image's and scikit-learn's), one class per
photograph, JPEG quality 90: OUT/train/<class>/*.jpg (40 per class) and OUT/val/<class>/*.jpg (10 per class).

Both sides train ResNet-18 from scratch at 224 px for one epoch (SGD, lr 1e-3, momentum 0.9, batch 32,
RandomResizedCrop(224, scale 0.5-1) + flip; --num-workers 2) and then evaluate the val/ split once (Resize(224) +
CenterCrop(224)); the wall time of each process is taken, imports and start-up included, as a user sees it.
Rounds are interleaved (every round runs every side once, the order rotating); medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LOOP = r'''
import sys, time, torch, torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2
root, workers, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224, scale=(0.5, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), *norm])
eval_tf = v2.Compose([v2.ToImage(), v2.Resize(224, antialias=True), v2.CenterCrop(224), *norm])
train = DataLoader(ImageFolder(root + "/train", train_tf), batch_size=batch, shuffle=True, num_workers=workers)
val = DataLoader(ImageFolder(root + "/val", eval_tf), batch_size=batch, num_workers=workers)
model = torchvision.models.resnet18(num_classes=len(train.dataset.classes))
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
t0 = time.perf_counter()
model.train()
for x, y in train:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
model.eval()
correct = 0
with torch.no_grad():
    for x, y in val:
        correct += int((model(x).argmax(1) == y).sum())
print(f"epoch+eval {time.perf_counter() - t0:.2f} s, val acc {correct / len(val.dataset):.3f}")
'''


def make_photos(out: Path, per_class: int, val_per_class: int, seed: int) -> None:
    sys.path.insert(0, str(REPO / "experiments"))
    import numpy as np
    from photo_folder import photos
    from PIL import Image

    rng = random.Random(seed)
    for name, photo in photos().items():
        img = Image.fromarray(photo)
        w, h = img.size
        cw, ch = (500, 375) if w >= h else (375, 500)
        if w < cw or h < ch:
            scale = max(cw / w, ch / h)
            img = img.resize((round(w * scale + 0.5), round(h * scale + 0.5)), Image.BICUBIC)
        arr = np.asarray(img)
        for split, n in (("train", per_class), ("val", val_per_class)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                top, left = rng.randint(0, arr.shape[0] - ch), rng.randint(0, arr.shape[1] - cw)
                crop = np.ascontiguousarray(arr[top:top + ch, left:left + cw])
                Image.fromarray(crop).save(folder / f"{i:04d}.jpg", quality=90)


def side_command(side: str, root: Path, workers: int, batch: int, outdir: Path) -> list[str]:
    if side == "loop":
        return [sys.executable, "-c", LOOP, str(root), str(workers), str(batch)]
    extra = side.split(":", 1)[1].split() if ":" in side else []
    return [sys.executable, str(REPO / "train.py"), "--dataset", "folder", "--data-dir", str(root), "--model",
            "resnet18", "--mode", "scratch", "--image-size", "224", "--batch-size", str(batch), "--epochs", "1",
            "--num-workers", str(workers), "--lr", "1e-3", "--device", "cpu", "--output-dir", str(outdir),
            "--overwrite", "--progress-every", "60", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--make", action="store_true", help="write the photo folder first")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side", action="append", help="loop | dtl | 'dtl:EXTRA FLAGS' (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.make:
        make_photos(args.root, args.per_class, args.val_per_class, args.seed)
        print(f"{args.root}: {sum(1 for _ in args.root.rglob('*.jpg'))} JPEGs")
    sides = args.side or ["loop", "dtl"]
    times: dict[str, list[float]] = {s: [] for s in sides}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="dtl-folder-epoch-") as tmp:
        for r in range(args.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                cmd = side_command(side, args.root, args.num_workers, args.batch_size, Path(tmp) / "run")
                begin = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                took = time.perf_counter() - begin
                if done.returncode:
                    sys.exit(f"{side} failed ({done.returncode}):\n{done.stderr[-3000:]}")
                times[side].append(took)
                tail = (done.stdout.strip().splitlines() or [""])[-1][:100]
                print(f"round {r + 1}/{args.rounds} {side:<40} {took:7.2f} s  {tail}", flush=True)
    medians = {s: statistics.median(t) for s, t in times.items()}
    base = medians[sides[0]]
    for s in sides:
        print(f"| {s} | {medians[s]:.2f} s | {base / medians[s]:.3f}x of {sides[0]}'s speed | "
              f"{' / '.join(f'{t:.2f}' for t in times[s])} |")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "medians": medians, "load": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
