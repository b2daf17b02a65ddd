"""What the transfer experiments share: running train.py, reading metrics.jsonl, the tables, the configs.

`experiments/digits.py` (scikit-learn's digits) and `experiments/cifar_photos.py` (real CIFAR-10 photos) make
their data and pretrain once; everything after that -- the fine-tuning grid, the aggregation and the
results.md/json -- is `run_grid` here, so both tasks are run and tabled the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dtl.cli import build_parser  # noqa: E402  (the repository's dtl, not an installed one)
from dtl.config import RECIPES, OptimConfig  # noqa: E402
from dtl.config.loading import config_from_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: written into each run folder the harness completed: the arguments and what they resolved to
MARKER = "run_args.json"

FT = ["--mode", "finetune"]
#: the `--recipe strong` of issue #12, spelled out (the recipe itself changed in #23)
OLD_STRONG = ["--optimizer", "adamw", "--lr", "5e-4", "--weight-decay", "0.05", "--lr-schedule", "cosine",
              "--warmup-epochs", "1", "--layer-decay", "0.75", "--head-lr-mult", "10", "--label-smoothing", "0.1",
              "--clip-grad-norm", "1.0", "--ema-decay", "0.998"]
#: issue #23's study: the baselines, the recipe, both under LP-FT (which keeps the BatchNorm statistics as
#: loaded since #23's second round; the "BN stats updated" rows are lp-ft as it was before)
LPFT = ["--mode", "lp-ft", "--lp-epochs", "2"]
RECIPE_STUDY: dict[str, list[str]] = {
    "plain": [*FT],
    "transfer (head only)": ["--mode", "transfer"],
    "lp-ft": [*LPFT],
    "lp-ft, BN stats updated": [*LPFT, "--no-freeze-bn-stats"],
    "lp-ft, probe lr x10": [*LPFT, "--lp-lr-mult", "10"],
    "strong (#12, old)": [*FT, *OLD_STRONG],
    "strong": [*FT, "--recipe", "strong"],
    "strong, lp-ft": [*LPFT, "--recipe", "strong"],
    "strong, lp-ft, BN stats updated": [*LPFT, "--recipe", "strong", "--no-freeze-bn-stats"],
}
WD = ["--weight-decay", "0.05"]
COSINE = ["--lr-schedule", "cosine", "--warmup-epochs", "1"]
#: what was measured and left out of the recipe, each added back on top of it (the first #23 candidate was
#: `strong +wd +cosine+warmup +label-smoothing 0.1`)
ADDED_BACK: dict[str, list[str]] = {
    "strong +weight-decay 0.05": [*FT, "--recipe", "strong", *WD],
    "strong +cosine+warmup": [*FT, "--recipe", "strong", *COSINE],
    "strong +wd +cosine+warmup": [*FT, "--recipe", "strong", *WD, *COSINE],
    "strong +wd +label-smoothing 0.1": [*FT, "--recipe", "strong", *WD, "--label-smoothing", "0.1"],
    "strong +wd +cosine+warmup +label-smoothing 0.1": [*FT, "--recipe", "strong", *WD, *COSINE,
                                                       "--label-smoothing", "0.1"],
    "strong +frozen BN stats": [*FT, "--recipe", "strong", "--freeze-bn-stats"],
    "strong +wd +cosine+warmup +frozen BN stats": [*FT, "--recipe", "strong", *WD, *COSINE, "--freeze-bn-stats"],
    "plain +frozen BN stats": [*FT, "--freeze-bn-stats"],
}
#: the recipe's components, as removed one at a time by the ablation rows (keys of RECIPES["strong"]); a row
#: that would remove all of the recipe is `plain` and is not made
COMPONENTS: dict[str, tuple[str, ...]] = {
    "adamw": ("optimizer", "lr", "weight_decay"),
    "weight-decay": ("weight_decay",),
    "cosine+warmup": ("lr_schedule", "warmup_epochs"),
    "layer-decay": ("layer_decay",),
    "head-lr-mult": ("head_lr_mult",),
    "label-smoothing": ("label_smoothing",),
    "ema": ("ema_decay",),
}  # (--clip-grad-norm has no flag value meaning "off": a recipe that clips needs its own ablation row)
#: plain's value of each optimizer setting (what an ablation row sets back)
PLAIN_VALUES: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(OptimConfig)}

#: the candidates for the new `strong`, compared on the probe images (`--eval-on probe`) before any test
#: table was made: AdamW + cosine (what helped on digits in #12) with label smoothing, then one change each
CANDIDATE = ["--optimizer", "adamw", "--lr", "5e-4", "--weight-decay", "0.05", "--lr-schedule", "cosine",
             "--warmup-epochs", "1", "--label-smoothing", "0.1"]
CANDIDATES: dict[str, list[str]] = {
    "cand adamw cos ls": [*FT, *CANDIDATE],
    "cand +layer-decay 0.75": [*FT, *CANDIDATE, "--layer-decay", "0.75"],
    "cand lr 1e-3": [*FT, *CANDIDATE, "--lr", "1e-3"],
    "cand +ema 0.99": [*FT, *CANDIDATE, "--ema-decay", "0.99"],
    # AdamW + weight decay, which the first round of the ablation of the first candidate left (the second
    # round dropped the weight decay too: `strong` is AdamW lr 1e-3)
    "cand adamw 1e-3 alone": [*FT, "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05"],
}

#: lp-ft's probe phase (#23, second round), on the probe images: plain's `lp-ft` trained the head for 2 epochs
#: at fine-tuning's lr (8 SGD steps at 1e-3 on the digits), which barely moves it, so longer probes and a
#: higher probe lr were tried first (with the statistics updated after the switch, as lp-ft then did); its
#: final-epoch collapses (seed 1: 35 % -> 16 % in one epoch of 4 SGD steps at 1e-3, the weights barely
#: moved) turned out to be the BatchNorm statistics re-estimated from 16-image batches of the new classes
LPFT_CANDIDATES: dict[str, list[str]] = {
    "lp-ft, BN stats updated, 5 probe epochs": ["--mode", "lp-ft", "--lp-epochs", "5", "--no-freeze-bn-stats"],
    "lp-ft, BN stats updated, probe lr x10": [*LPFT, "--lp-lr-mult", "10", "--no-freeze-bn-stats"],
    "lp-ft, BN stats updated, probe lr x30": [*LPFT, "--lp-lr-mult", "30", "--no-freeze-bn-stats"],
    "lp-ft, BN stats updated, 5 probe epochs, probe lr x10": ["--mode", "lp-ft", "--lp-epochs", "5",
                                                              "--lp-lr-mult", "10", "--no-freeze-bn-stats"],
}

#: configs whose optimizer settings are their own (the plain --lr is not passed to them)
OWN_LR_PREFIXES = ("strong", "+adamw", "cand")

#: the heavy regularisation options (issue #13's), each on its own and all together
TA, ERASING, MIXCUT = ["--auto-augment", "ta_wide"], ["--random-erasing", "0.25"], ["--mixup", "0.2", "--cutmix", "1.0"]
ALL_HEAVY = [*TA, *ERASING, *MIXCUT]
#: on top of plain, for the first round's "when does it pay off" table
HEAVY: dict[str, list[str]] = {
    "+auto-augment ta_wide": [*FT, *TA],
    "+random-erasing 0.25": [*FT, *ERASING],
    "+mixup 0.2 cutmix 1.0": [*FT, *MIXCUT],
    "all heavy": [*FT, *ALL_HEAVY],
}
#: on top of `--recipe strong` (what a user would add them to), by name suffix
HEAVY_OPTIONS: dict[str, list[str]] = {
    "": [], " +ta_wide": TA, " +erasing 0.25": ERASING, " +mixup/cutmix": MIXCUT, " +all heavy": ALL_HEAVY,
}
#: fine-tuning lengths of the "when does heavy regularisation pay off" rows (the row's --epochs overrides the
#: task's --ft-epochs)
HEAVY_LENGTHS = (10, 15, 40, 100)


def heavy_by_length() -> dict[str, list[str]]:
    """`strong, N epochs` and `strong +<heavy option>, N epochs` for each length of HEAVY_LENGTHS."""
    return {f"strong{suffix}, {n} epochs": [*FT, "--recipe", "strong", *flags, "--epochs", str(n)]
            for n in HEAVY_LENGTHS for suffix, flags in HEAVY_OPTIONS.items()}


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
    return "_".join(part for part in keep.split("_") if part)


#: settings that name where a run goes or what it is called, not what it computes
NOT_COMPUTED = ("output_dir", "overwrite", "resume", "recipe")


def resolved(args: list[str]) -> dict[str, Any]:
    """What train.py computes from `args`: dtl's resolved settings (a --recipe spelled out), without where the
    run goes. Two configs that resolve alike are the same run, whatever their names."""
    config = config_from_args(build_parser().parse_args(["train", *args]))
    # through JSON, as the markers hold it (tuples become lists)
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in NOT_COMPUTED}))


def completed(outdir: Path, want: dict[str, Any] | None = None) -> bool:
    """The run in `outdir` completed (and, given `want`, computed those resolved settings)."""
    status, used = outdir / "status.json", outdir / MARKER
    if not status.is_file() or json.loads(status.read_text()).get("state") != "completed":
        return False
    return want is None or (used.is_file() and json.loads(used.read_text())["resolved"] == want)


def reuse(args: list[str], want: dict[str, Any], outdir: Path) -> bool:
    """Copy a completed run of the resolved settings `want` (another config's name, or a recipe that has
    changed since) into `outdir`; True when there was one."""
    for marker in outdir.parent.parent.glob(f"*/*/{MARKER}"):
        if marker.parent != outdir and json.loads(marker.read_text())["resolved"] == want \
                and completed(marker.parent):
            if outdir.exists():
                shutil.rmtree(outdir)
            shutil.copytree(marker.parent, outdir)
            (outdir / MARKER).write_text(json.dumps({"args": args, "resolved": want}) + "\n")
            return True
    return False


def done(args: list[str], outdir: Path) -> bool:
    """`outdir` holds a completed run of what `args` compute: its own, or one copied from another config's."""
    want = resolved(args)
    return completed(outdir, want) or reuse(args, want, outdir)


def train(args: list[str], outdir: Path, log: Path) -> float:
    """Run train.py with `args` into `outdir` (skipped when it, or a run of the same settings, already
    completed); returns seconds taken."""
    want = resolved(args)
    if completed(outdir, want) or reuse(args, want, outdir):
        return 0.0
    cmd = [sys.executable, "train.py", *args, "--output-dir", str(outdir), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write(shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not completed(outdir):
        raise SystemExit(f"train.py failed (exit {proc.returncode}); see {log}")
    # the tables read metrics.jsonl and the final weights; a grid's checkpoints (one per epoch and run) filled
    # tens of GB of /tmp in #23's second round
    shutil.rmtree(outdir / "checkpoints", ignore_errors=True)
    (outdir / MARKER).write_text(json.dumps({"args": args, "resolved": want}) + "\n")
    return time.monotonic() - start


def read_metrics(outdir: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "test_acc" in r]
    ema = [r["test_acc_ema"] for r in rows if r.get("test_acc_ema") is not None]
    return {"first": rows[0]["test_acc"], "final": rows[-1]["test_acc"], "best": max(r["test_acc"] for r in rows),
            "final_ema": ema[-1] if ema else None, "best_ema": max(ema) if ema else None,
            "epochs": len(rows)}


def common_args(model: str) -> list[str]:
    # --data-pipeline workers: the pipeline these tables were measured with (issue #20 made `auto` pick the
    # decode pipeline for folders, whose crops are drawn differently; pinned so the commands redo the tables)
    return ["--dataset", "folder", "--model", model, "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--data-pipeline", "workers"]


def pretrain_args(model: str, data: Path, pre_extra: list[str]) -> list[str]:
    """From scratch on the pretraining classes: SGD, cosine, weight decay 5e-4, seed 0."""
    return [*common_args(model), "--data-dir", str(data), "--mode", "scratch", "--weights", "none", *pre_extra,
            "--lr-schedule", "cosine", "--weight-decay", "5e-4", "--seed", "0"]


def ablations() -> dict[str, list[str]]:
    """`--recipe strong` with one of its components set back to plain's values, one row per component."""
    rows = {}
    for component, keys in COMPONENTS.items():
        if not any(key in RECIPES["strong"] for key in keys) or set(RECIPES["strong"]) <= set(keys):
            continue
        flags = []
        for key in keys:
            value = PLAIN_VALUES[key]
            flags += ["--" + key.replace("_", "-"), "0" if value is None else str(value)]
        rows[f"strong -{component}"] = [*FT, "--recipe", "strong", *flags]
    return rows


def add_grid_args(parser: argparse.ArgumentParser, *, ft_epochs: int, batch_size: int,
                  extra_configs: dict[str, list[str]] | None = None) -> None:
    """The options every task shares: where, which seeds and configs, the fine-tuning schedule."""
    configs = all_configs(extra_configs)
    parser.add_argument("--out", type=Path, required=True, help="output folder (data, runs, results)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the fine-tunes")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data selection")
    parser.add_argument("--model", default="resnet18", help="torchvision model (pretraining and fine-tuning)")
    parser.add_argument("--ft-epochs", type=int, default=ft_epochs)
    parser.add_argument("--lr", type=float, default=1e-3, help="plain recipe's lr for the fine-tunes")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="fine-tuning batch size")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunes run at the same time")
    parser.add_argument("--eval-on", choices=("test", "probe"), default="test",
                        help="test: the held-out evaluation images of the tables; probe: other labelled images "
                        "of the same classes, disjoint from train and test, for choosing settings")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: table the runs that completed with these settings (missing: -)")
    parser.add_argument("--configs", nargs="+", choices=list(configs),
                        default=[*RECIPE_STUDY, *ablations(), *ADDED_BACK], metavar="CONFIG",
                        help=f"subset of: {', '.join(configs)}")


def all_configs(extra: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    return {**RECIPE_STUDY, **ablations(), **ADDED_BACK, **HEAVY, **heavy_by_length(), **CANDIDATES, **LPFT_CANDIDATES,
            **(extra or {})}


def run_grid(args: argparse.Namespace, out: Path, counts: dict[str, Any], pre_extra: list[str],
             extra_configs: dict[str, list[str]] | None = None) -> dict[str, list[dict[str, Any] | None]]:
    """Pretrain once, fine-tune every config for every seed (args.jobs at a time), write results.json/md."""
    t0 = time.monotonic()
    configs = all_configs(extra_configs)
    print(f"data: {json.dumps(counts)}", flush=True)
    pre_run = out / "runs" / "pretrain"
    pre_args = pretrain_args(args.model, out / "data" / "pre", pre_extra)
    secs = 0.0 if args.report_only else train(pre_args, pre_run, out / "logs" / "pretrain.log")
    pre = read_metrics(pre_run)
    print(f"pretrain: {secs:.0f}s, test_acc {pre['final']:.4f} (best {pre['best']:.4f})", flush=True)
    data = out / "data" / ("ft" if args.eval_on == "test" else "ft-probe")
    runs = out / ("runs" if args.eval_on == "test" else "runs-probe")
    ft_common = [*common_args(args.model), "--batch-size", str(args.batch_size), "--data-dir", str(data),
                 "--weights", str(pre_run / "model.safetensors"), "--epochs", str(args.ft_epochs)]
    jobs = []
    for name in args.configs:
        lr = [] if name.startswith(OWN_LR_PREFIXES) else ["--lr", str(args.lr)]
        for seed in args.seeds:
            jobs.append((name, seed, [*ft_common, *configs[name], *lr, "--seed", str(seed)],
                         runs / slug(name) / f"seed{seed}"))

    def one(job: tuple) -> tuple[str, int, float, Path]:
        name, seed, run_args, outdir = job
        return name, seed, train(run_args, outdir, out / "logs" / f"{runs.name}-{slug(name)}-seed{seed}.log"), outdir

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, seed, secs, outdir in pool.map(one, [] if args.report_only else jobs):
            m = read_metrics(outdir)
            print(f"{name} seed {seed}: {secs:.0f}s, final {m['final']:.4f} best {m['best']:.4f}"
                  + (f" ema {m['final_ema']:.4f}" if m["final_ema"] is not None else ""), flush=True)

    results: dict[str, list[dict[str, Any] | None]] = {name: [] for name in args.configs}
    for name, _, run_args, outdir in jobs:
        # with --report-only too: a renamed config tables the runs of the same settings
        results[name].append(read_metrics(outdir) if done(run_args, outdir) else None)
    commands = {"pretrain": shlex.join(["python", "train.py", *pre_args, "--output-dir", str(pre_run)])}
    commands.update({f"{name} seed {seed}": shlex.join(["python", "train.py", *run_args, "--output-dir", str(d)])
                     for name, seed, run_args, d in jobs})
    invocation = shlex.join(["python", *sys.argv])
    (out / f"results{'' if args.eval_on == 'test' else '-probe'}.json").write_text(json.dumps(
        {"invocation": invocation, "data": counts, "pretrain": pre, "results": results, "commands": commands,
         "args": vars(args) | {"out": str(out)}}, indent=1, default=str) + "\n")
    steps_per_epoch = -(-counts["ft"]["train"] // args.batch_size)
    text = (f"`{invocation}`\n\n{table(results, args.seeds)}\n{per_seed_table(results, args.seeds)}"
            f"\n{heavy_table(results, steps_per_epoch)}")
    (out / f"results{'' if args.eval_on == 'test' else '-probe'}.md").write_text(text)
    print(text)
    print(f"total {time.monotonic() - t0:.0f}s", flush=True)
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def table(results: dict[str, list[dict[str, Any] | None]], seeds: list[int]) -> str:
    """Mean ± std over the seeds; the difference to `plain`, and on how many seeds the config beat it."""
    lines = ["| config | final test acc % | best test acc % | EMA final % | vs plain (final) | seeds above plain |",
             "|---|---|---|---|---|---|"]
    plain = results.get("plain")
    for name, all_runs in results.items():
        runs = [r for r in all_runs if r is not None]
        if not runs:
            continue
        finals = [r["final"] for r in runs]
        emas = [r["final_ema"] for r in runs if r["final_ema"] is not None]
        delta = above = ""
        if plain is not None and name != "plain":
            pairs = [(r["final"], p["final"]) for r, p in zip(all_runs, plain) if r is not None and p is not None]
            delta = f"{100 * (statistics.fmean(finals) - statistics.fmean(r['final'] for r in plain if r)):+.1f}"
            above = f"{sum(f > p for f, p in pairs)}/{len(pairs)}"
        n = "" if len(runs) == len(seeds) else f" (n={len(runs)})"
        lines.append(f"| {name} | {pct(finals)}{n} | {pct([r['best'] for r in runs])} "
                     f"| {pct(emas) if emas else ''} | {delta} | {above} |")
    return "\n".join(lines) + "\n"


def heavy_table(results: dict[str, list[dict[str, Any] | None]], steps_per_epoch: int) -> str:
    """The heavy_by_length rows as one table: a line per length, a column per heavy option, each cell the mean
    final accuracy and (after the recipe's own column) the difference to it and on how many seeds it won."""
    rows = []
    for n in HEAVY_LENGTHS:
        base = results.get(f"strong, {n} epochs")
        cells = []
        for suffix in HEAVY_OPTIONS:
            runs = results.get(f"strong{suffix}, {n} epochs")
            done = [r for r in runs or [] if r is not None]
            if not done:
                cells.append("-")
                continue
            cell = pct([r["final"] for r in done])
            if suffix and base and all(b is not None for b in base) and len(done) == len(runs):
                pairs = [(r["final"], b["final"]) for r, b in zip(runs, base)]
                delta = 100 * statistics.fmean(r - b for r, b in pairs)
                cell += f" ({delta:+.1f}, {sum(r > b for r, b in pairs)}/{len(pairs)})"
            cells.append(cell)
        if any(c != "-" for c in cells):
            rows.append(f"| {n} epochs = {n * steps_per_epoch} steps | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    names = ["strong", *(s.strip() for s in HEAVY_OPTIONS if s)]
    return ("| fine-tuning length | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
            + "\n".join(rows) + "\n")


def per_seed_table(results: dict[str, list[dict[str, Any] | None]], seeds: list[int]) -> str:
    lines = [f"| config | final, seeds {' / '.join(map(str, seeds))} | EMA final |", "|---|---|---|"]
    for name, runs in results.items():
        emas = [r["final_ema"] for r in runs if r is not None and r["final_ema"] is not None]
        finals = " / ".join("-" if r is None else f"{100 * r['final']:.1f}" for r in runs)
        lines.append(f"| {name} | {finals} "
                     f"| {' / '.join(f'{100 * e:.1f}' for e in emas)} |")
    return "\n".join(lines) + "\n"
