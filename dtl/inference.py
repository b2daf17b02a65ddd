"""`dtl eval` and `dtl predict`: use a trained checkpoint.

Both rebuild the model from what the checkpoint itself records (``state.json``: the run's config, class
count and class names; ``model.safetensors``: the weights, checksum-verified); nothing is unpickled and no
pretrained weights are downloaded.

- `dtl eval` measures a checkpoint on a test split: top-1, top-5, per-class accuracy and the confusion
  matrix (CSV + PNG) plus a JSON summary. Under torchrun/srun every rank evaluates a contiguous shard
  (`dtl.data.EvalShardSampler`: each image counted exactly once) and the sums are all-reduced; rank 0
  writes. By default it evaluates exactly what the run evaluated (same data set, subset and split).
- `dtl predict` gives the top-k classes of image files and folders with their probabilities, with the
  eval preprocessing: Resize(image size) + CenterCrop + ImageNet normalisation. Output rows have the
  columns ``path, rank, class, probability`` (one row per image and rank, rank 1 = the most likely class),
  printed as a table or written as CSV (`.csv`) or JSON lines (`.jsonl`, one object per row).

Under a launcher: ``torchrun --nproc_per_node=4 -m dtl.cli eval --checkpoint RUN``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from dtl import data as dtl_data
from dtl import models
from dtl.errors import EXIT_OK, UserError

log = logging.getLogger("dtl")

EVAL_EXAMPLES = ("dtl eval --checkpoint runs/exp1\n"
                 "  dtl eval --checkpoint runs/exp1/checkpoints/step-00000420 --eval-subset 0 -o ev\n"
                 "  torchrun --standalone --nproc_per_node=4 -m dtl.cli eval --checkpoint runs/exp1")
PREDICT_EXAMPLES = ("dtl predict --checkpoint runs/exp1 cat.jpg photos/ --top-k 3\n"
                    "  dtl predict --checkpoint runs/exp1 photos/ --output preds.csv --device cpu")
_RAW = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


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
    config: Any  # dtl.config.Config of the training run
    classes: list[str]


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, format-checked (the optimizer and RNG files are not read)."""
    from dtl import checkpoint as ckpt

    state = checkpoint / "state.json"
    try:
        meta = json.loads(state.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{state} is missing or corrupt ({err})") from None
    if meta.get("format_version") != ckpt.FORMAT_VERSION:
        raise UserError(f"{checkpoint} has checkpoint format version {meta.get('format_version')!r}; "
                        f"this dtl reads version {ckpt.FORMAT_VERSION}")
    for key in ("config", "num_classes"):
        if key not in meta:
            raise UserError(f"{state} lacks {key!r}: not a checkpoint written by `dtl train`")
    return meta


def load_model(path: str | Path, device: torch.device) -> Loaded:
    """Resolve `path` (a run folder or a checkpoint folder), rebuild the architecture from its saved config
    (random init, no download) and load the verified weights; the model is in eval mode on `device`."""
    from dtl import checkpoint as ckpt
    from dtl.config import Config

    path = Path(path)
    if not path.exists():
        raise UserError(f"--checkpoint {path}: no such run or checkpoint folder")
    folder = ckpt.best_or_last(path)
    meta = read_meta(folder)
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in meta["config"].items() if k in known}
    try:
        cfg = Config.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise UserError(f"{folder}/state.json holds an invalid config: {err}") from None
    num_classes = int(meta["num_classes"])
    classes = list((meta.get("run") or {}).get("classes") or [str(i) for i in range(num_classes)])
    if len(classes) != num_classes:
        raise UserError(f"{folder}/state.json names {len(classes)} classes for a {num_classes}-class model")
    model = models.build_model(cfg.model, num_classes, "none", cfg.image_size)
    models.load_into(model, ckpt.read_tensors(folder / "model.safetensors"), f"checkpoint {folder}")
    # the training run's memory format: the same kernels, so the same logits as the run's own evaluation
    model = model.to(device, memory_format=models.memory_format(device.type, cfg.mode)).eval()
    run_dir = folder.parent.parent if folder.parent.name == ckpt.CKPT_DIR else None
    return Loaded(model, folder, run_dir, meta, cfg, classes)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---- dtl eval ------------------------------------------------------------------------------------

def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="measure a checkpoint: top-1/top-5, per-class accuracy, confusion matrix",
        description=_wrap("Evaluate a trained checkpoint on a test split: top-1, top-5 (with 5 or more classes), "
                    "per-class accuracy, the confusion matrix (CSV and PNG) and a JSON summary. By default "
                    "the data set, data folder, subset and held-out split of the training run are used, so "
                    "top-1 equals the run's own test accuracy of that checkpoint. Runs distributed under "
                    "torchrun/srun (each test image counted once); rank 0 writes."),
        epilog=f"examples:\n  {EVAL_EXAMPLES}", formatter_class=_RAW)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run folder (its best checkpoint, else its newest) or a checkpoint folder")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "synthetic", "folder"), default=None,
                   help="data set to evaluate on (default: the run's)")
    p.add_argument("--data-dir", default=None,
                   help="data folder (default: the run's). For --dataset folder, a folder other than the "
                        "run's is evaluated on its val/ (or validation/, valid/, test/) folder when it has "
                        "one, else on all its images (DATA_DIR/<class>/...)")
    p.add_argument("--eval-subset", type=int, default=None, metavar="N",
                   help="evaluate the first N test images (default: the run's --eval-subset; 0: all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per process per step (default: the run's)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="DataLoader workers for image folders (default: the run's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else CPU")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help="default: the run's (auto: bf16/fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--output-dir", "-o", type=Path, default=None, metavar="DIR",
                   help="where to write summary.json, per_class.csv, confusion_matrix.csv/.png "
                        "(default: RUN/eval/<checkpoint name>)")
    p.add_argument("--strict-images", action=argparse.BooleanOptionalAction, default=None,
                   help="image folders: refuse unreadable images instead of skipping them "
                        "(default: the run's)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds a collective may wait before the job is declared dead")
    return p


def _eval_config(args: argparse.Namespace, loaded: Loaded) -> Any:
    """The run's config with the eval flags applied (and the run-only settings cleared)."""
    cfg = loaded.config
    changes: dict[str, Any] = {"resume": None, "output_dir": None, "overwrite": False, "debug": False,
                               "device": args.device}
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
    for name in ("batch_size", "num_workers", "precision", "strict_images"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if changes.get("dataset", cfg.dataset) == "folder" and cfg.data_pipeline == "device":
        changes["data_pipeline"] = "workers"
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid evaluation settings: {err}") from None


def _test_split(cfg: Any, loaded: Loaded, env: Any) -> Any:
    """The test split, labelled in the checkpoint's class order."""

    if cfg.dataset == "folder":
        from dtl import folder

        run_cfg = loaded.config
        same_data = (run_cfg.dataset == "folder"
                     and Path(cfg.data_dir).resolve() == Path(run_cfg.data_dir).resolve())
        if same_data:
            saved = loaded.run_dir / folder.SPLIT_FILE if loaded.run_dir is not None else None
            test = folder.load_folder_splits(cfg, split_file=saved, with_train=False).test
        else:
            test = folder.load_image_folder(folder.eval_root(Path(cfg.data_dir)), strict=cfg.strict_images)
            test = test.subset(cfg.eval_subset, cfg.subset_order, cfg.seed + 1)
        return test.with_classes(loaded.classes)
    test = dtl_data.load_splits_once(cfg, env).test
    if len(test.classes) != len(loaded.classes):
        raise UserError(f"{cfg.dataset} has {len(test.classes)} classes but the checkpoint's model has "
                        f"{len(loaded.classes)} ({', '.join(loaded.classes[:10])}...)")
    if list(test.classes) != list(loaded.classes):
        log.warning("the class names of %s differ from the checkpoint's; labels are matched by index",
                    cfg.dataset)
    return test


@torch.no_grad()
def evaluate_confusion(model: torch.nn.Module, loader: Any, num_classes: int, device: torch.device, env: Any,
                       precision: str) -> tuple[dict[str, float], torch.Tensor]:
    """({'loss', 'top1', 'top5', 'count'} summed over ranks, the C x C confusion matrix summed over ranks;
    rows are true classes, columns predictions)."""
    from tqdm import tqdm

    from dtl.dist import all_reduce_sum

    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, count
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    classes = torch.arange(num_classes, device=device)
    for images, labels in tqdm(loader, desc="eval", disable=not env.is_main, leave=False, dynamic_ncols=True):
        with _autocast(precision, device):
            logits = model(images)
        logits = logits.float()
        pred = logits.argmax(1)
        hit1 = pred == labels
        hitk = (logits.topk(k, dim=1).indices == labels[:, None]).any(1) | hit1
        totals[:3] += torch.stack([criterion(logits, labels).double(), hit1.sum().double(), hitk.sum().double()])
        totals[3] += labels.shape[0]  # a Python number: a kernel argument, not a host-to-device copy
        # a product of one-hot matrices instead of bincount, whose output size depends on the data (a host sync
        # per batch); exact in float32 (0/1 inputs, sums below 2**24)
        true_1hot = (labels[:, None] == classes).float()
        confusion += (true_1hot.T @ (pred[:, None] == classes).float()).long()
    all_reduce_sum(totals, env)
    all_reduce_sum(confusion, env)
    loss, top1, topk, count = totals.tolist()
    n = max(count, 1)
    return ({"loss": loss / n, "top1": top1 / n, "top5": topk / n, "count": int(count)},
            confusion.cpu())


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


def plot_confusion(confusion: torch.Tensor, classes: list[str], output: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as an image (counts written in the cells when there are few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(classes)
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(4 + 0.45 * c, 30)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(c), classes, fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _evaluate(args: argparse.Namespace, env: Any, device: torch.device) -> int:
    from dtl.engine import resolve_precision

    loaded = load_model(args.checkpoint, device)
    cfg = _eval_config(args, loaded)
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=device.type)
    test = _test_split(cfg, loaded, env)
    fmt = models.memory_format(device.type, loaded.config.mode)
    loader = dtl_data.eval_loader(cfg, test, env, device, channels_last=fmt == torch.channels_last)
    precision, _ = resolve_precision(cfg, env, device)
    t0 = time.perf_counter()
    metrics, confusion = evaluate_confusion(loaded.model, loader, len(loaded.classes), device, env, precision)
    seconds = time.perf_counter() - t0
    if not env.is_main:
        return EXIT_OK
    per_row = confusion.sum(1).tolist()
    diag = confusion.diagonal().tolist()
    summary = {
        "checkpoint": str(loaded.checkpoint), "model": cfg.model, "dataset": cfg.dataset,
        "data_dir": cfg.data_dir if cfg.dataset not in ("synthetic",) else None,
        "eval_subset": cfg.eval_subset, "image_size": cfg.image_size,
        "count": metrics["count"], "top1": metrics["top1"],
        "top5": metrics["top5"] if len(loaded.classes) >= 5 else None, "loss": metrics["loss"],
        "correct": int(sum(diag)),
        "per_class": [{"class": name, "count": n, "correct": d, "accuracy": d / n if n else None}
                      for name, n, d in zip(loaded.classes, per_row, diag, strict=True)],
        "classes": loaded.classes, "world_size": env.world_size, "device": device.type,
        "precision": precision, "seconds": seconds,
        "checkpoint_epoch": (loaded.meta.get("progress") or {}).get("epoch"),
        "checkpoint_step": loaded.meta.get("global_step"),
    }
    outdir = args.output_dir or _default_output(loaded)
    write_eval(outdir, summary, confusion, loaded.classes)
    top5 = f", top-5 {summary['top5']:.4f}" if summary["top5"] is not None else ""
    print(f"{loaded.checkpoint}: top-1 {metrics['top1']:.4f} ({summary['correct']}/{metrics['count']})"
          f"{top5}, loss {metrics['loss']:.4f} on {metrics['count']} {cfg.dataset} images")
    print(f"wrote {outdir}/summary.json, per_class.csv, confusion_matrix.csv, confusion_matrix.png")
    return EXIT_OK


def run_eval(args: argparse.Namespace) -> int:
    """`dtl eval`: the exit code (0 done, 2 bad input, 1 a peer died). A UserError is one line on rank 0."""
    from dtl import dist

    env = dist.detect()
    dist.setup_logging(env)
    def body(device: torch.device) -> int:
        if args.batch_size is not None and args.batch_size <= 0:
            raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
        return _evaluate(args, env, device)

    return dist.run_guarded(env, args.device, args.dist_timeout, body)


def eval_entry(args: argparse.Namespace) -> None:
    """Run `dtl eval` and leave the process through `dist.exit_process` (never returns)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from dtl import dist

    code = record(run_eval)(args)
    dist.exit_process(code, dist.detect())


# ---- dtl predict ---------------------------------------------------------------------------------

def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="top-k classes of image files/folders with a trained checkpoint",
        description=_wrap("Classify image files (and every image under folders given, recursively) with a trained "
                    "checkpoint: its class names and its eval preprocessing (Resize + CenterCrop to the "
                    "run's image size, ImageNet normalisation). Output rows have the columns "
                    "path, rank, class, probability (one row per image and rank; rank 1 is the most likely "
                    "class): a table on stdout, or --output FILE.csv / FILE.jsonl. Unreadable images are "
                    "reported by path on stderr and skipped."),
        epilog=f"examples:\n  {PREDICT_EXAMPLES}", formatter_class=_RAW)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run folder (its best checkpoint, else its newest) or a checkpoint folder")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="classes per image (at most the number of classes; default 5)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write FILE.csv or FILE.jsonl instead of printing a table")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (32)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes decoding images (default 0: in this process)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the first GPU when CUDA is available, else CPU")
    return p


class _PredictImages(torch.utils.data.Dataset):
    """(index, preprocessed image or None, error or None) per file: a bad file never stops the batch."""

    def __init__(self, paths: list[Path], size: int) -> None:
        from dtl.folder import eval_transform

        self.paths, self.transform = paths, eval_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        from dtl.folder import decode

        try:
            return i, self.transform(decode(self.paths[i])), None
        except Exception as err:  # noqa: BLE001 - any failure: report this file, go on with the others
            return i, None, f"{type(err).__name__}: {str(err).splitlines()[-1][-200:] if str(err) else ''}"


def _as_list(batch: list) -> list:
    return batch


def predict(loaded: Loaded, paths: list[Path], top_k: int, batch_size: int, num_workers: int,
            device: torch.device) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(rows {path, rank, class, probability}, {path: why it was skipped})."""
    dataset = _PredictImages(paths, loaded.config.image_size)
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
            fmt = models.memory_format(device.type, loaded.config.mode)
            x = torch.stack([t for _, t in good]).to(device).contiguous(memory_format=fmt)
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
    from dtl import dist

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--output {args.output}: use a .csv or .jsonl file name")
    env = dist.DistEnv()  # one process, whatever launched it
    dist.setup_logging(env)
    from dtl.folder import find_images

    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f"no image files in {' '.join(map(str, args.inputs))}")
    device = dist.pick_device(env, args.device)
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
