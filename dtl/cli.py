"""The `dtl` command: train, data synth/info, models, plot, eval, predict, bench.

Error policy: a `UserError` (bad flag, missing data, wrong checkpoint) is one line on rank 0 and exit code 2;
an unexpected exception is a traceback from the rank where it happened (recorded for torchrun's summary)
and exit code 1; a peer's collective failing because another rank died is one line, not a second traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dtl import dist, signals
from dtl.config import Config, add_config_arguments, config_from_args
from dtl.errors import EXIT_USAGE, UserError

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
}


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

    data = sub.add_parser("data", help="write or inspect CIFAR-format data",
                          epilog=f"example:\n  {EXAMPLES['data']}")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    synth = dsub.add_parser("synth", help="write a small learnable CIFAR-10-format data set")
    synth.add_argument("--out", required=True, help="folder to write cifar-10-batches-py/ (or -bin/) into")
    synth.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument("--test", type=int, default=500, help="test images (default 500)")
    synth.add_argument("--format", choices=("py", "bin"), default="py", help="python pickles or binary records")
    synth.add_argument("--seed", type=int, default=0)
    info = dsub.add_parser("info", help="counts per class and per-channel mean/std of each split")
    info.add_argument("--data-dir", required=True)
    info.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")

    models = sub.add_parser("models", help="list torchvision classification models and their weights",
                            epilog=f"example:\n  {EXAMPLES['models']}")
    models.add_argument("--filter", default="", help="only names containing this text")

    plot = sub.add_parser("plot", help="plot loss/accuracy/lr/throughput of one or more runs",
                          epilog=f"example:\n  {EXAMPLES['plot']}")
    plot.add_argument("runs", nargs="+", type=Path, help="run folders (with metrics.jsonl)")
    plot.add_argument("--output", type=Path, default=Path("curves.png"))

    from dtl.bench import add_arguments as add_bench_arguments
    from dtl.inference import add_eval_parser, add_predict_parser

    bench = sub.add_parser("bench", help="time dtl's loop against the reference recipe's (images/s, peak memory)",
                           description="Time the reference recipe's loop and dtl's on the same device, model, mode, "
                                       "image size and batch size, interleaved after a warm-up: input pipeline, "
                                       "train step, eval step (images/s), peak memory, and dtl / reference.",
                           epilog=f"example:\n  {EXAMPLES['bench']}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)

    add_eval_parser(sub)
    add_predict_parser(sub)
    return parser


# ---- train -------------------------------------------------------------------------------------

def run_train(cfg: Config) -> int:
    """Launcher-independent entry: read the environment, set up the group, train, tear down."""
    from dtl.engine import train

    env = dist.detect(debug=cfg.debug)
    dist.setup_logging(env)
    signals.install()
    if cfg.deterministic:
        dist.prepare_determinism()
    return dist.run_guarded(env, cfg.device, cfg.dist_timeout, lambda device: train(cfg, env, device))


def _train_entry(cfg: Config) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    env = dist.detect(debug=cfg.debug)
    code = record(run_train)(cfg)
    dist.exit_process(code, env)


# ---- small commands ----------------------------------------------------------------------------

def run_data(args: argparse.Namespace) -> int:
    from dtl import cifar

    if args.data_command == "synth":
        if args.train <= 0 or args.test <= 0:
            raise UserError(f"--train and --test must be > 0, got {args.train} and {args.test}")
        train = cifar.make_synthetic(args.train, seed=args.seed)
        test = cifar.make_synthetic(args.test, seed=args.seed + 1_000_003)
        folder = cifar.write_cifar10(args.out, train, test, args.format)
        print(f"wrote {args.train} train + {args.test} test images to {folder}")
        return 0
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


def run_models(args: argparse.Namespace) -> int:
    import torchvision

    from dtl.models import classification_models

    print(f"{'model':<28} {'params':>12}  pretrained weights")
    for name in classification_models():
        if args.filter not in name:
            continue
        weights = torchvision.models.get_model_weights(name)
        params = next(iter(weights)).meta.get("num_params") if len(weights) else None
        names = ", ".join(w.name + (" (default)" if w is weights.DEFAULT else "") for w in weights)
        print(f"{name:<28} {params or 0:>12,}  {names}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from dtl import bench

    return bench.run(args)


def run_plot(args: argparse.Namespace) -> int:
    from dtl.metrics import plot_runs, read_metrics

    for run in args.runs:
        if not read_metrics(run):
            raise UserError(f"{run} has no {run / 'metrics.jsonl'}: not a run folder, or no epoch finished yet")
    print(plot_runs(list(args.runs), args.output))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        try:
            cfg = config_from_args(args)
        except UserError as err:
            if dist.detect(debug=bool(args.debug)).is_main:  # one message, not one per rank
                print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        _train_entry(cfg)
        return
    if args.command == "eval":
        from dtl.inference import eval_entry

        eval_entry(args)  # distributed like train: leaves through dist.exit_process
        return
    from dtl.inference import run_predict

    handlers = {"data": run_data, "models": run_models, "plot": run_plot, "predict": run_predict,
                "bench": run_bench}
    try:
        code = handlers[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)


if __name__ == "__main__":
    main()
