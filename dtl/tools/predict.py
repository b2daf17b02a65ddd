"""`dtl predict`: the top-k classes of image files and folders with a trained checkpoint.

The run's eval preprocessing (Resize(image size) + CenterCrop + the model's normalisation, as recorded).
Output rows have the columns ``path, rank, class, probability`` (one row per image and rank, rank 1 = the
most likely class), printed as a table or written as CSV (`.csv`) or JSON lines (`.jsonl`, one object per row).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from dtl import distributed
from dtl.data.images import decode, find_images
from dtl.data.preprocessing import Preprocessing, eval_transform
from dtl.errors import EXIT_OK, UserError
from dtl.tools.eval_run import Loaded, load_model

log = logging.getLogger("dtl")

class _PredictImages(torch.utils.data.Dataset):
    """(index, preprocessed image or None, error or None) per file: a bad file never stops the batch."""

    def __init__(self, paths: list[Path], size: int, prep: Preprocessing) -> None:
        self.paths, self.transform = paths, eval_transform(size, prep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(decode(self.paths[i])), None
        except Exception as err:  # noqa: BLE001 - any failure: report this file, go on with the others
            return i, None, f"{type(err).__name__}: {str(err).splitlines()[-1][-200:] if str(err) else ''}"


def _as_list(batch: list) -> list:
    return batch


def predict(loaded: Loaded, paths: list[Path], top_k: int, batch_size: int, num_workers: int,
            device: torch.device) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(rows {path, rank, class, probability}, {path: why it was skipped})."""
    dataset = _PredictImages(paths, loaded.config.data.image_size, loaded.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_as_list)
    k = min(top_k, len(loaded.classes))
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with torch.inference_mode():
        for batch in loader:
            good = [(i, x) for i, x, _ in batch if x is not None]
            for i, _, err in batch:
                if err is not None:
                    skipped[str(paths[i])] = err
                    log.warning("skipped unreadable image %s (%s)", paths[i], err)
            if not good:
                continue
            x = torch.stack([t for _, t in good]).to(device).contiguous(memory_format=loaded.memory_format)
            probs = torch.softmax(loaded.model(x).float(), dim=1)
            top = probs.topk(k, dim=1)
            for (i, _), p_row, c_row in zip(good, top.values.tolist(), top.indices.tolist(), strict=True):
                for rank, (p, c) in enumerate(zip(p_row, c_row, strict=True), start=1):
                    rows.append({"path": str(paths[i]), "rank": rank, "class": loaded.classes[c],
                                 "probability": p})
    return rows, skipped


COLUMNS = ("path", "rank", "class", "probability")


def write_predictions(rows: list[dict[str, Any]], output: Path) -> None:
    suffix = output.suffix.lower()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", newline="") as f:
            if suffix == ".csv":
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows([r["path"], r["rank"], r["class"], f"{r['probability']:.6f}"] for r in rows)
            else:
                f.writelines(json.dumps({c: r[c] for c in COLUMNS}) + "\n" for r in rows)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err}") from None


def print_table(rows: list[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout
    width = max([len("path"), *(len(r["path"]) for r in rows)])
    cwidth = max([len("class"), *(len(r["class"]) for r in rows)])
    print(f"{'path':<{width}}  rank  {'class':<{cwidth}}  probability", file=out)
    for r in rows:
        print(f"{r['path']:<{width}}  {r['rank']:>4}  {r['class']:<{cwidth}}  {r['probability']:.4f}",
              file=out)


def run_predict(args: argparse.Namespace) -> int:
    """`dtl predict`: the exit code. Raises UserError for bad input (the cli prints it, exit 2)."""
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {args.output}: use a .csv or .jsonl file name")
    env = distributed.DistEnv()  # one process, whatever launched it
    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f"no image files in {' '.join(map(str, args.inputs))}")
    device = distributed.pick_device(env, args.device)
    loaded = load_model(args.checkpoint, device)
    if args.top_k > len(loaded.classes):
        log.warning("--top-k %d is more than the model's %d classes: giving all of them", args.top_k,
                    len(loaded.classes))
    rows, skipped = predict(loaded, paths, args.top_k, args.batch_size, args.num_workers, device)
    if skipped:
        log.warning("skipped %d of %d image(s) that could not be read", len(skipped), len(paths))
    if len(skipped) == len(paths):
        raise UserError(f"none of the {len(paths)} image(s) could be read")
    if args.output is not None:
        write_predictions(rows, args.output)
        k = min(args.top_k, len(loaded.classes))
        print(f"wrote {len(rows)} rows ({len(paths) - len(skipped)} images x top-{k}) to {args.output}")
    else:
        print_table(rows)
    return EXIT_OK
