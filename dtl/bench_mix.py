"""`dtl bench --mixup A` / `--cutmix A`: the mixing step alone, dtl's batched `Mixer` against a per-image
reference (timm's ``Mixup(mode="elem")`` algorithm: a draw and a mix per image in a Python loop, the way a
per-sample collate function mixes), on the same batches already on the device, timed interleaved; the
median of ``--repeats`` measurements, in images/s, and their ratio (dtl / reference). The batches are made
beforehand, so only the mixing (images and soft targets) is timed.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dtl import data, mix
from dtl.bench_report import Options
from dtl.config import Config
from dtl.dist import DistEnv
from dtl.reference import endless

Batch = tuple[torch.Tensor, torch.Tensor]


def per_image_mix(images: torch.Tensor, labels: torch.Tensor, cfg: Config, num_classes: int,
                  rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one draw and one mix per image, each with its reverse partner (timm's `_mix_elem`)."""
    o = cfg.optim
    out, lams = images.clone(), []
    n, (h, w) = images.shape[0], images.shape[-2:]
    for i in range(n):
        d = mix.draw(rng, o.mixup, o.cutmix, o.mix_prob, o.mix_switch_prob, h, w)
        j = n - 1 - i
        if d.box is not None:
            y0, y1, x0, x1 = d.box
            out[i, :, y0:y1, x0:x1] = images[j, :, y0:y1, x0:x1]
        elif d.lam != 1.0:
            out[i] = images[i] * d.lam + images[j] * (1 - d.lam)
        lams.append(d.lam)
    lam = torch.tensor(lams, device=images.device)[:, None]
    smooth = mix.mix_targets(labels, num_classes, 1.0, o.label_smoothing)
    return out, smooth * lam + smooth.flip(0) * (1 - lam)


def _rate(fn: Callable[[int, Batch], Any], batches: list[Batch], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        fn(b, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(int(y.shape[0]) for _, y in batches) / max(time.perf_counter() - start, 1e-9)


def measure_mix(cfg: Config, device: torch.device, opts: Options) -> dict[str, float] | None:
    """{reference, dtl, ratio}: images/s of mixing --input-steps of dtl's training batches, the median of
    --repeats interleaved measurements; None when mixing is off."""
    if not mix.enabled(cfg.optim):
        return None
    steps, warmup, repeats = opts.input_steps, opts.warmup, opts.repeats
    splits = data.load_splits(cfg, allow_download=False)
    num_classes = len(splits.classes)
    loader, _ = data.build_loaders(cfg, splits, DistEnv(), device, torch.float32, channels_last=device.type == "cuda")
    source = endless(loader)
    batches = [next(source) for _ in range(steps)]
    mixer = mix.Mixer(cfg.optim, num_classes, cfg.run.seed, 0)
    rng = np.random.RandomState(cfg.run.seed)
    sides: dict[str, Callable[[int, Batch], Any]] = {
        "reference": lambda b, batch: per_image_mix(*batch, cfg, num_classes, rng),
        "dtl": lambda b, batch: mixer(*batch, 0, b),
    }
    for fn in sides.values():
        for _ in range(warmup):
            _rate(fn, batches[:1], device)
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            rates[side].append(_rate(sides[side], batches, device))
            print(f"  round {r + 1}/{repeats} mix_input  {side:<9} {rates[side][-1]:10.1f} img/s",
                  file=sys.stderr, flush=True)
    result = {side: statistics.median(v) for side, v in rates.items()}
    result["ratio"] = result["dtl"] / result["reference"] if result["reference"] > 0 else math.inf
    return result


def format_mix(result: dict[str, float]) -> str:
    return (f"mix_input (--mixup/--cutmix alone): reference (per image) {result['reference']:.1f} img/s, "
            f"dtl (batched) {result['dtl']:.1f} img/s, ratio {result['ratio']:.2f}x")
