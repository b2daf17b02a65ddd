"""`dtl eval`: a trained checkpoint back as a model, measured on a test split.

`load_model` rebuilds the model from what the checkpoint itself records (``state.json``: the run's config,
class count and class names; ``model.safetensors``: the weights, checksum-verified); nothing is unpickled and
no pretrained weights are downloaded. `evaluate_checkpoint` measures it with `dtl.train.evaluate.evaluate`: top-1,
top-5, per-class accuracy and the confusion matrix (CSV + PNG) plus a JSON summary. Under torchrun/srun every
rank evaluates a contiguous shard (each image counted exactly once) and the sums are all-reduced; rank 0
writes. By default it evaluates exactly what the run evaluated (same data set, subset and split).

Under a launcher: ``torchrun --nproc_per_node=4 -m dtl.cli eval --checkpoint RUN``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from dtl import atomic_files, models
from dtl.config import Config
from dtl.data import datasets, folder, image_cache, loaders
from dtl.data.folder_split import FolderSplit
from dtl.data.preprocessing import IMAGENET, Preprocessing
from dtl.data.split_file import SPLIT_FILE
from dtl.distributed import ProcessGroups
from dtl.errors import EXIT_OK, UserError
from dtl.train.checkpoint import format as ckpt
from dtl.train.evaluate import evaluate
from dtl.train.metrics import plot_confusion
from dtl.train.optimisation.precision import resolve

log = logging.getLogger("dtl")


# ---- the model -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Loaded:
    """A checkpoint turned back into a ready-to-run model."""

    model: torch.nn.Module
    checkpoint: Path
    """The checkpoint folder used (a run folder resolves to its best, else its newest checkpoint)."""
    run_dir: Path | None
    """The run folder holding it, when it sits in one (RUN/checkpoints/step-*)."""
    meta: dict[str, Any]
    config: Config
    """The training run's config."""
    classes: list[str]
    preprocessing: Preprocessing = IMAGENET
    """The input normalisation/resampling the run trained with (recorded; else the backbone's own)."""
    memory_format: torch.memory_format = torch.contiguous_format
    """The layout of the model's weights, which its input batches take too."""


def load_model(path: str | Path, device: torch.device) -> Loaded:
    """Resolve `path` (a run folder or a checkpoint folder), rebuild the architecture from its saved config
    (random init, no download) and load the verified weights; the model is in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--checkpoint {path}: no such run or checkpoint folder")
    folder = ckpt.best_or_last(path)
    meta = ckpt.read_meta(folder)
    known = set(Config.field_names())
    saved = {k: v for k, v in meta["config"].items() if k in known}
    try:
        cfg = Config.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise UserError(f"{folder}/state.json holds an invalid config: {err}") from None
    num_classes = int(meta["num_classes"])
    classes = list((meta.get("run") or {}).get("classes") or [str(i) for i in range(num_classes)])
    if len(classes) != num_classes:
        raise UserError(f"{folder}/state.json names {len(classes)} classes for a {num_classes}-class model")
    model = models.build_model(cfg.backbone.model, num_classes, "none", cfg.data.image_size,
                               drop_path=cfg.backbone.drop_path)
    models.load_into(model, atomic_files.read_tensors(folder / "model.safetensors"), f"checkpoint {folder}")
    # the training run's memory format: the same kernels, so the same logits as the run's own evaluation
    memory_format = models.memory_format(device.type, cfg.backbone.mode)
    model = model.to(device, memory_format=memory_format).eval()
    run_dir = ckpt.run_folder_of(folder)
    prep = (Preprocessing.from_dict((meta.get("run") or {}).get("preprocessing"))
            or models.preprocessing(cfg.backbone.model).for_pipeline(loaders.resolve_pipeline(cfg)))
    return Loaded(model, folder, run_dir, meta, cfg, classes, prep, memory_format)


# ---- dtl eval ------------------------------------------------------------------------------------

def _eval_config(args: argparse.Namespace, loaded: Loaded) -> Config:
    """The run's config with the eval flags applied (and the run-only settings cleared)."""
    cfg = loaded.config
    # image folders are read from their files, not the training run's image cache (which a later change to the
    # folder would make stale mid-evaluation, and which may live on another machine)
    changes: dict[str, Any] = {"resume": None, "output_dir": None, "overwrite": False, "debug": False,
                               "device": args.device, "cache_images": None}
    if args.dataset is not None:
        changes["dataset"] = args.dataset
        if args.dataset != "cifar100":
            changes["coarse_labels"] = False
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.eval_subset is not None:
        if args.eval_subset < 0:
            raise UserError(f"--eval-subset must be >= 0 (0: all images), got {args.eval_subset}")
        changes["eval_subset"] = args.eval_subset or None
    for name in ("batch_size", "num_workers", "precision", "strict_images", "tta", "cache_images"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if changes.get("dataset", cfg.data.dataset) == "folder" and cfg.data.data_pipeline == "device" \
            and changes["cache_images"] is None:
        changes["data_pipeline"] = "workers"
    if cfg.data.data_pipeline == "decode" and (changes["cache_images"] is not None
                                                or changes.get("dataset", cfg.data.dataset) != "folder"):
        changes["data_pipeline"] = "auto"  # a cache, or a data set without files: what auto picks for them
    try:
        return cfg.replace(**changes)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid evaluation settings: {err}") from None


def _test_split(cfg: Config, loaded: Loaded, groups: ProcessGroups) -> Any:
    """The test split, labelled in the checkpoint's class order."""
    env = groups.env

    if cfg.data.dataset == "folder":
        run_cfg = loaded.config
        same_data = (run_cfg.data.dataset == "folder"
                     and Path(cfg.data.data_dir).resolve() == Path(run_cfg.data.data_dir).resolve())
        if same_data:
            saved = loaded.run_dir / SPLIT_FILE if loaded.run_dir is not None else None
            test = folder.load_folder_splits(cfg, split_file=saved, with_train=False, is_main=env.is_main).test
        else:
            test = folder.load_image_folder(folder.eval_root(Path(cfg.data.data_dir)), strict=cfg.data.strict_images,
                                            is_main=env.is_main)
            test = test.subset(cfg.data.eval_subset, cfg.data.subset_order, cfg.run.seed + 1)
        return test.with_classes(loaded.classes)
    test = datasets.load_splits_once(cfg, groups).test
    if len(test.classes) != len(loaded.classes):
        raise UserError(f"{cfg.data.dataset} has {len(test.classes)} classes but the checkpoint's model has "
                        f"{len(loaded.classes)} ({', '.join(loaded.classes[:10])}...)")
    if list(test.classes) != list(loaded.classes):
        log.warning("the class names of %s differ from the checkpoint's; labels are matched by index",
                    cfg.data.dataset)
    return test


def _default_output(loaded: Loaded) -> Path:
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval" / loaded.checkpoint.name
    return Path(f"eval-{loaded.checkpoint.name}")


def write_eval(outdir: Path, summary: dict[str, Any], confusion: torch.Tensor, classes: list[str]) -> None:
    """summary.json, per_class.csv, confusion_matrix.csv and confusion_matrix.png."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(outdir / "per_class.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "count", "correct", "accuracy"])
            for row in summary["per_class"]:
                w.writerow([row["class"], row["count"], row["correct"],
                            "" if row["accuracy"] is None else f"{row['accuracy']:.6f}"])
        with open(outdir / "confusion_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *classes])
            for name, row in zip(classes, confusion.tolist(), strict=True):
                w.writerow([name, *row])
        plot_confusion(confusion, classes, outdir / "confusion_matrix.png",
                       title=f"{summary['model']} on {summary['dataset']}: top-1 {summary['top1']:.4f}")
    except OSError as err:
        raise UserError(f"cannot write the evaluation to {outdir}: {err}") from None


def evaluate_checkpoint(args: argparse.Namespace, groups: ProcessGroups, device: torch.device) -> int:
    """`dtl eval` on this rank (under a launcher every rank runs it; rank 0 writes)."""
    env = groups.env
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
    loaded = load_model(args.checkpoint, device)
    cfg = _eval_config(args, loaded)
    if cfg.dist.device == "auto":
        cfg = cfg.replace(device=device.type)
    test = _test_split(cfg, loaded, groups)
    if cfg.data.cache_images is not None and isinstance(test, FolderSplit):
        where = image_cache.cache_folder(cfg.data.cache_images, loaded.run_dir or Path("runs") / "eval")
        size = cfg.data.cache_size or cfg.data.image_size
        test = groups.main_first(lambda first: image_cache.cached_split(test, "val", where, size, first,
                                                                         cfg.data.image_decoder, device))
    loader = loaders.eval_loader(cfg, test, env, device, channels_last=loaded.memory_format == torch.channels_last,
                                 prep=loaded.preprocessing)
    precision = resolve(cfg.run.precision, env, device)
    t0 = time.perf_counter()
    result = evaluate(loaded.model, loader, device, groups, precision, len(loaded.classes), confusion=True,
                      tta=cfg.run.tta)
    seconds = time.perf_counter() - t0
    metrics = {"loss": result.loss, "top1": result.top1, "top5": result.top5, "count": result.count}
    confusion = result.confusion if result.confusion is not None else torch.zeros(0, 0, dtype=torch.int64)
    if not env.is_main:
        return EXIT_OK
    per_row = confusion.sum(1).tolist()
    diag = confusion.diagonal().tolist()
    summary = {
        "checkpoint": str(loaded.checkpoint), "model": cfg.backbone.model, "dataset": cfg.data.dataset,
        "data_dir": cfg.data.data_dir if cfg.data.dataset not in ("synthetic",) else None,
        "eval_subset": cfg.data.eval_subset, "image_size": cfg.data.image_size,
        "count": metrics["count"], "top1": metrics["top1"],
        "top5": metrics["top5"] if len(loaded.classes) >= 5 else None, "loss": metrics["loss"],
        "correct": int(sum(diag)),
        "per_class": [{"class": name, "count": n, "correct": d, "accuracy": d / n if n else None}
                      for name, n, d in zip(loaded.classes, per_row, diag, strict=True)],
        "classes": loaded.classes, "world_size": env.world_size, "device": device.type,
        "precision": precision.name, "seconds": seconds,
        "checkpoint_epoch": (loaded.meta.get("progress") or {}).get("epoch"),
        "checkpoint_step": loaded.meta.get("global_step"), "tta": cfg.run.tta,
    }
    if result.plain is not None:  # the headline numbers (and the confusion matrix) are the TTA ones
        summary["plain"] = {"top1": result.plain.top1, "loss": result.plain.loss,
                            "top5": result.plain.top5 if len(loaded.classes) >= 5 else None}
    outdir = args.output_dir or _default_output(loaded)
    write_eval(outdir, summary, confusion, loaded.classes)
    top5 = f", top-5 {summary['top5']:.4f}" if summary["top5"] is not None else ""
    if result.plain is not None:
        plain = result.plain
        plain5 = f", top-5 {plain.top5:.4f}" if summary["top5"] is not None else ""
        print(f"{loaded.checkpoint}: plain: top-1 {plain.top1:.4f}{plain5}, loss {plain.loss:.4f}")
    tta = " with --tta flip" if result.plain is not None else ""
    print(f"{loaded.checkpoint}: top-1 {metrics['top1']:.4f} ({summary['correct']}/{metrics['count']})"
          f"{top5}, loss {metrics['loss']:.4f} on {metrics['count']} {cfg.data.dataset} images{tta}")
    print(f"wrote {outdir}/summary.json, per_class.csv, confusion_matrix.csv, confusion_matrix.png")
    return EXIT_OK
