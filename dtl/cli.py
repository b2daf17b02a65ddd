"""The `dtl` command: every parser and the one distributed entry.

    dtl train ...     (= python train.py ...; torchrun/accelerate/srun start it the same way)
    dtl eval | predict | bench | data | models | plot | doctor ...
    python -m dtl.cli ...   (torchrun -m dtl.cli ...: the same command as a module)

`entry(argv)` is the one way into a process -- the `dtl` console script, `train.py` and `python -m dtl.cli`:
it runs the command, then leaves the process the way multi-process runs need (`distributed.exit_process`:
flushed, and without interpreter finalisers that abort now and then after gloo runs). `main(argv)` runs a
command in this process and returns the exit code (tests, notebooks). Error policy, in one place (`guarded`): a
`UserError` (bad flag, missing data, wrong checkpoint) is one line from the rank whose input failed (tagged with
its rank and host) and exit code 2; every other rank says which ranks and hosts failed and their messages, one
line per distinct error (learnt at an agreement point, `ProcessGroups.agree`, or, when its collective broke,
from the messages the failed ranks left in the store, `distributed.posted_failures`), and exits 2 too when all
of them were user errors; a non-finite loss under `--nan-policy abort` is one line and exit 1; anything else
is a traceback from the rank where it happened (recorded for torchrun's summary) and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from dtl import distributed
from dtl.config import DEVICES, PRECISIONS, Config
from dtl.config.loading import add_config_arguments, config_from_args
from dtl.data import cifar, shards
from dtl.distributed import signals
from dtl.errors import EXIT_FAILURE, EXIT_USAGE, NonFiniteLossError, PeerError, UserError
from dtl.models import classification_models, timm_backbones
from dtl.tools import doctor, eval_run, export, predict
from dtl.tools.bench import settings as bench_settings
from dtl.tools.bench import side_by_side
from dtl.train import trainer
from dtl.train.metrics import plot_runs, read_metrics

log = logging.getLogger("dtl")

EXAMPLES = {
    "train": "dtl train --dataset cifar10 --mode transfer --epochs 3      "
             "(or: torchrun --nproc_per_node=4 train.py ...)",
    "data": "dtl data synth --out data/synth --train 2000 --test 500 && dtl data info --data-dir data/synth",
    "models": "dtl models --filter resnet",
    "plot": "dtl plot runs/a runs/b --output compare.png",
    "bench": "dtl bench --model vgg16 --mode transfer --weights vgg16.pth --image-size 32 --batch-size 32 "
             "--json bench.json",
    "eval": "dtl eval --checkpoint runs/exp1      (or: torchrun --nproc_per_node=4 -m dtl.cli eval ...)",
    "predict": "dtl predict --checkpoint runs/exp1 photos/ --top-k 3 --output preds.csv",
    "export": "dtl export --checkpoint runs/exp1 --format onnx --output exported/model.onnx",
}


EVAL_EXAMPLES = ("dtl eval --checkpoint runs/exp1\n"
                 "  dtl eval --checkpoint runs/exp1/checkpoints/step-00000420 --eval-subset 0 -o ev\n"
                 "  torchrun --standalone --nproc_per_node=4 -m dtl.cli eval --checkpoint runs/exp1")
PREDICT_EXAMPLES = ("dtl predict --checkpoint runs/exp1 cat.jpg photos/ --top-k 3\n"
                    "  dtl predict --checkpoint runs/exp1 photos/ --output preds.csv --device cpu")
_RAW = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # bad flag: one line + usage, exit 2 (argparse's convention)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtl", description="Distributed transfer learning of torchvision backbones.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (the same under python, torchrun, accelerate, srun)",
                           description="Train a torchvision backbone in transfer, finetune or scratch mode.",
                           epilog=f"example:\n  {EXAMPLES['train']}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(train)

    data = sub.add_parser("data", help="write or inspect CIFAR-format data; write WebDataset shards",
                          epilog=f"example:\n  {EXAMPLES['data']}")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    synth = dsub.add_parser("synth", help="write a small learnable CIFAR-10-format data set")
    synth.add_argument("--out", required=True, help="folder to write cifar-10-batches-py/ (or -bin/) into")
    synth.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument("--test", type=int, default=500, help="test images (default 500)")
    synth.add_argument("--format", choices=("py", "bin"), default="py",
                       help="python pickles or binary records")
    synth.add_argument("--seed", type=int, default=0)
    add_shards_parser(dsub)
    info = dsub.add_parser("info", help="counts per class and per-channel mean/std of each split")
    info.add_argument("--data-dir", required=True)
    info.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")

    models = sub.add_parser("models", help="list torchvision (or timm) classification models and their weights",
                            epilog=f"example:\n  {EXAMPLES['models']}")
    models.add_argument("--filter", default="", help="only names containing this text")
    models.add_argument("--source", choices=("torchvision", "timm"), default="torchvision",
                        help="torchvision (default) or timm (use as --model timm/NAME; needs dtl[timm])")

    plot = sub.add_parser("plot", help="plot loss/accuracy/lr/throughput of one or more runs",
                          epilog=f"example:\n  {EXAMPLES['plot']}")
    plot.add_argument("runs", nargs="+", type=Path, help="run folders (with metrics.jsonl)")
    plot.add_argument("--output", type=Path, default=Path("curves.png"))

    bench_parser = sub.add_parser(
        "bench",
        help="time dtl's loop against the reference notebook loop and a strong hand-written one (images/s, memory)",
        description=_wrap("Time the reference notebook loop, a strong hand-written loop and dtl's on the same device, "
                          "model, mode, image size and batch size, interleaved after a warm-up: input pipeline, "
                          "train step, eval step (images/s), peak memory, and dtl / each of them."),
        epilog=f"example:\n  {EXAMPLES['bench']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_settings.add_bench_arguments(bench_parser)

    add_eval_parser(sub)
    add_predict_parser(sub)
    add_export_parser(sub)
    doctor.add_parser(sub)
    return parser


def add_shards_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "shards", help="write CIFAR, an image folder or an HF data set as WebDataset tar shards with a manifest",
        description=_wrap("Write a data set's train and held-out splits (as a training run reads them) as WebDataset "
                          "tar shards, OUT/train-000000.tar ... and OUT/val-000000.tar ..., with OUT/manifest.json "
                          "(classes, every sample's label, counts per class, sizes), for --dataset webdataset "
                          "--data-dir OUT. Samples are shuffled (seeded) before writing; every image is checked."),
        epilog="example:\n  dtl data shards --dataset folder --data-dir photos/ --val-split 0.1 --out shards/ "
               "--shard-size 1000", formatter_class=_RAW)
    p.add_argument("--out", required=True, type=Path, help="a new folder for the shards and manifest.json")
    p.add_argument("--shard-size", required=True, type=int, metavar="N", help="samples per shard")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "folder", "hf"), default="folder")
    p.add_argument("--data-dir", default="./data", help="as for training (hf: a folder, or hf://NAME)")
    for flag in ("--hf-name", "--hf-config", "--hf-revision", "--hf-eval-split", "--image-column", "--label-column"):
        p.add_argument(flag, default=None, help="as for training")
    p.add_argument("--hf-train-split", default="train", help="as for training")
    p.add_argument("--val-split", type=float, default=0.0, help="as for training (a seeded, stratified held-out part)")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out part and the order of the samples")
    p.add_argument("--no-shuffle", action="store_true", help="write the samples in the data set's order")
    p.add_argument("--encoding", choices=shards.ENCODINGS, default="png",
                   help="how CIFAR's pixels are encoded (png: lossless); encoded images are copied as they are")
    p.add_argument("--quality", type=int, default=95, help="--encoding jpg: JPEG quality")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (counted)")
    return p


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as ONNX, TorchScript or safetensors, checked against PyTorch",
        description=_wrap(f"Export a trained checkpoint: ONNX (torch.onnx dynamo exporter, opset {export.OPSET}, "
                          "dynamic batch axis, checked with onnxruntime), TorchScript (torch.jit.trace, deprecated by "
                          "PyTorch but working) or a plain safetensors state dict. Each file is written to a "
                          "temporary name, checked against the PyTorch model on the run's first test images "
                          f"(max |logit difference| <= {export.TOLERANCE:g} x max(1, max |logit|)), then renamed "
                          "into place; a failed check exits 1 and leaves nothing. preprocessing.json and a model "
                          "card README.md are written next to it."),
        epilog=f"example:\n  {EXAMPLES['export']}", formatter_class=_RAW)
    add_checkpoint_argument(p)
    p.add_argument("--format", required=True, choices=export.FORMATS,
                   help=f"onnx (opset {export.OPSET}, dynamic batch; needs dtl[onnx]), torchscript (traced), or "
                        "safetensors (the plain state dict)")
    p.add_argument("--output", required=True, type=Path, metavar="FILE",
                   help="the file to write; preprocessing.json and README.md go next to it")
    p.add_argument("--ema", action="store_true",
                   help="export the EMA weights (the run folder's model_ema.safetensors, or the checkpoint's "
                        "ema.safetensors)")
    return p


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:  # eval, predict, export
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run folder (its best checkpoint, else its newest) or a checkpoint folder")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="measure a checkpoint: top-1/top-5, per-class accuracy, confusion matrix",
        description=_wrap("Evaluate a trained checkpoint on a test split: top-1, top-5 (with 5 or more classes), "
                    "per-class accuracy, the confusion matrix (CSV and PNG) and a JSON summary. By default "
                    "the data set, data folder, subset and held-out split of the training run are used, so "
                    "top-1 equals the run's own test accuracy of that checkpoint. Runs distributed under "
                    "torchrun/srun (each test image counted once); rank 0 writes."),
        epilog=f"examples:\n  {EVAL_EXAMPLES}", formatter_class=_RAW)
    add_checkpoint_argument(p)
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
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: the run's (auto: bf16/fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--output-dir", "-o", type=Path, default=None, metavar="DIR",
                   help="where to write summary.json, per_class.csv, confusion_matrix.csv/.png "
                        "(default: RUN/eval/<checkpoint name>)")
    p.add_argument("--strict-images", action=argparse.BooleanOptionalAction, default=None,
                   help="image folders: refuse unreadable images instead of skipping them "
                        "(default: the run's)")
    p.add_argument("--tta", choices=("none", "flip"), default=None,
                   help="test-time augmentation: flip = the mean of the logits of each image and its mirror; "
                        "both the plain and the TTA numbers are printed (default: the run's --tta)")
    p.add_argument("--cache-images", nargs="?", const="auto", default=None, metavar="DIR",
                   help="image folders: evaluate from the decoded-image cache (alone: image-cache/ beside the "
                        "run folder, where the training run's --cache-images put it; or DIR), checked against "
                        "the files and rebuilt if stale, at the run's --cache-size. Default: read the files")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds a collective may wait before the job is declared dead")
    return p


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="top-k classes of image files/folders with a trained checkpoint",
        description=_wrap("Classify image files (and every image under folders given, recursively) with a trained "
                    "checkpoint: its class names and its eval preprocessing (Resize + CenterCrop to the "
                    "run's image size, the model's normalisation as recorded by the run). Output rows have the columns "
                    "path, rank, class, probability (one row per image and rank; rank 1 is the most likely "
                    "class): a table on stdout, or --output FILE.csv / FILE.jsonl. Unreadable images are "
                    "reported by path on stderr and skipped."),
        epilog=f"examples:\n  {PREDICT_EXAMPLES}", formatter_class=_RAW)
    add_checkpoint_argument(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="classes per image (at most the number of classes; default 5)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write FILE.csv or FILE.jsonl instead of printing a table")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (32)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes decoding images (default 0: in this process)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: the first GPU when CUDA is available, else CPU")
    return p


# ---- small commands ----------------------------------------------------------------------------

def run_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        if args.train <= 0 or args.test <= 0:
            raise UserError(f"--train and --test must be > 0, got {args.train} and {args.test}")
        train = cifar.make_synthetic(args.train, seed=args.seed)
        test = cifar.make_synthetic(args.test, seed=args.seed + 1_000_003)
        folder = cifar.write_cifar10(args.out, train, test, args.format)
        print(f"wrote {args.train} train + {args.test} test images to {folder}")
        return 0
    if args.data_command == "shards":
        return run_shards(args)
    train, test = cifar.load_cifar(args.data_dir, args.dataset)
    for name, split in (("train", train), ("test", test)):
        x = split.images.float() / 255
        mean = x.mean(dim=(0, 2, 3)).tolist()
        std = x.std(dim=(0, 2, 3)).tolist()
        counts = torch.bincount(split.labels, minlength=len(split.classes)).tolist()
        print(f"{name}: {len(split)} images, {len(split.classes)} classes")
        print("  per class: " + ", ".join(f"{c}={n}" for c, n in zip(split.classes, counts)))
        print("  mean (R,G,B): " + ", ".join(f"{m:.4f}" for m in mean))
        print("  std  (R,G,B): " + ", ".join(f"{s:.4f}" for s in std))
    return 0


def run_shards(args: argparse.Namespace) -> int:
    names = ("dataset", "data_dir", "hf_name", "hf_config", "hf_revision", "hf_train_split", "hf_eval_split",
             "image_column", "label_column", "val_split", "seed", "skip_bad_images")
    try:
        cfg = Config(**{n: getattr(args, n) for n in names}, download=False)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid settings: {err}") from None
    path = shards.shards_of(cfg, args.out, args.shard_size, args.seed, not args.no_shuffle, args.encoding,
                            args.quality)
    print(f"wrote {path.parent}: {shards.summary(path)}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    import torchvision

    if args.source == "timm":
        rows = timm_backbones.list_models(args.filter)
        print(f"{'model':<44} {'params':>12}  pretrained tags (the first is --weights imagenet)")
        for name, count, tags in rows:
            print(f"{name:<44} {'-' if count is None else f'{count:,}':>12}  {', '.join(tags) or '-'}")
        if rows and all(count is None for _, count, _ in rows):
            print(f"({len(rows)} models: parameter counts only for a narrower --filter)")
        return 0
    print(f"{'model':<28} {'params':>12}  pretrained weights")
    for name in classification_models():
        if args.filter not in name:
            continue
        weights = torchvision.models.get_model_weights(name)
        params = next(iter(weights)).meta.get("num_params") if len(weights) else None
        names = ", ".join(w.name + (" (default)" if w is weights.DEFAULT else "") for w in weights)
        print(f"{name:<28} {params or 0:>12,}  {names}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    for run in args.runs:
        if not read_metrics(run):
            raise UserError(f"{run} has no {run / 'metrics.jsonl'}: not a run folder, or no epoch finished "
                            "yet")
    print(plot_runs(list(args.runs), args.output))
    return 0


# ---- the one error policy and the one distributed entry -------------------------------------------

def guarded(env: distributed.DistEnv, body: Callable[[], int]) -> int:
    """Run a command's body; turn the errors people can act on into one message and an exit code."""
    try:
        return body()
    except PeerError as err:  # another rank failed: it said why, here is what it said
        for line in str(err).splitlines():
            log.error("stopping: %s", line)
        return err.exit_code
    except UserError as err:
        distributed.post_failure(env, err)
        log.error("error: %s", err)  # every rank whose own input failed: its own message
        return EXIT_USAGE
    except NonFiniteLossError as err:
        distributed.post_failure(env, err)
        if env.is_main:  # every rank sees the same all-reduced loss
            log.error("error: %s", err)
        return EXIT_FAILURE
    except RuntimeError as err:
        if distributed.DETERMINISM_HINT in str(err):
            if env.is_main:
                log.error("error: --deterministic: %s. This model needs an operation that has no deterministic "
                          "kernel on this device; run without --deterministic (README: GPUs)",
                          str(err).splitlines()[0].split(", but you set")[0])
            return EXIT_USAGE
        if not (env.distributed and distributed.peer_failure(err)):
            _failed_here(env, err)
            raise
        failures = distributed.posted_failures(env)
        if not failures:
            log.error("stopping: a collective failed because another rank died (%s)",
                      str(err).splitlines()[0][:200])
            return EXIT_FAILURE
        peers = distributed.summary(failures)
        for line in str(peers).splitlines():
            log.error("stopping: a collective failed: %s", line)
        return peers.exit_code
    except Exception as err:
        _failed_here(env, err)
        raise
    except BaseException as err:  # Ctrl-C, sys.exit: no line of ours, but the other ranks learn of it
        distributed.post_failure(env, err)
        raise


def _failed_here(env: distributed.DistEnv, err: Exception) -> None:
    """A bug's exception: the other ranks learn its one line; in a multi-process run this rank says it too,
    tagged with its rank and host, above the traceback (whose last line only names the process id)."""
    distributed.post_failure(env, err)
    if env.distributed:
        log.error("failed: %s (traceback below)", distributed.failure_of(env.rank, err).message)


@record  # only what `guarded` lets through (a bug's traceback) reaches torchrun's error file and summary
def run_guarded(env: distributed.DistEnv, body: Callable[[], int]) -> int:
    return guarded(env, body)


def in_process_group(env: distributed.DistEnv, device_preference: str, timeout_s: float,
                     body: Callable[[distributed.ProcessGroups, torch.device], int], cpu_tensors: bool = False) -> int:
    """Pick this process's device, create the process groups, run `body(groups, device)` (train, eval);
    `cpu_tensors`: a GPU run's collectives also see CPU tensors (see `distributed.backend_for`)."""
    device = distributed.pick_device(env, device_preference)
    return body(distributed.setup(env, device, timeout_s, cpu_tensors), device)


# ---- commands ----------------------------------------------------------------------------------

def run_train(args: argparse.Namespace, env: distributed.DistEnv) -> int:
    cfg = config_from_args(args)
    signals.install()
    if cfg.run.deterministic:
        distributed.prepare_determinism()
    return in_process_group(env, cfg.dist.device, cfg.dist.dist_timeout,
                            lambda groups, device: trainer.train(cfg, groups, device),
                            cpu_tensors=cfg.dist.fsdp_cpu_offload)


def run_eval(args: argparse.Namespace, env: distributed.DistEnv) -> int:
    return in_process_group(env, args.device, args.dist_timeout,
                            lambda groups, device: eval_run.evaluate_checkpoint(args, groups, device))


#: the commands that run on every rank of a launch (the rest run in one process, whatever launched them)
DISTRIBUTED = ("train", "eval", "doctor")


def execute(argv: list[str] | None = None) -> tuple[int, distributed.DistEnv]:
    """Parse and run one `dtl` command: (exit code, the process's place in the job). The launcher's
    environment is read here, once, and handed to the command."""
    args = build_parser().parse_args(argv)
    if args.command in DISTRIBUTED:
        try:
            env = distributed.detect(debug=bool(getattr(args, "debug", False)))
        except UserError as err:  # the launch itself is wrong (--debug under torchrun): every process says so
            distributed.setup_logging(distributed.DistEnv())
            log.error("error: %s", err)
            return EXIT_USAGE, distributed.DistEnv()
    else:
        env = distributed.DistEnv()  # one process, whatever launched it
    distributed.setup_logging(env)
    handlers: dict[str, Callable[[argparse.Namespace, distributed.DistEnv], int]] = {
        "train": run_train,
        "eval": run_eval,
        "doctor": doctor.run,
        "data": lambda a, _: run_data(a),
        "models": lambda a, _: run_models(a),
        "plot": lambda a, _: run_plot(a),
        "predict": lambda a, _: predict.run_predict(a),
        "export": lambda a, _: export.run_export(a),
        "bench": lambda a, _: side_by_side.run(a, side_by_side.command_line(argv[1:] if argv else None)),
    }
    return run_guarded(env, lambda: handlers[args.command](args, env)), env


def main(argv: list[str] | None = None) -> int:
    """Parse and run one `dtl` command in this process; the exit code."""
    return execute(argv)[0]


def entry(argv: list[str] | None = None) -> None:
    """Run one `dtl` command (default: this process's arguments), then leave the process with its exit code."""
    distributed.exit_process(*execute(argv))


if __name__ == "__main__":
    entry()
