"""The check's ten steps (`STEPS`, in the order they run). Each runs dtl's commands on the check's own inputs
and judges what the runs wrote to their run folders (`tests.gpu_check.runfiles`): a step ends as PASS, raises
`StepFailed` (FAIL) or `StepSkipped` (SKIP), and puts what it measured into its `Outcome`'s figures.

A log is read only for a human message (`error_line`), for torch's own recompile report (`recompiles`), for
the moment to send the preemption signal (`wait_for_progress`: the live position of epoch 1, which no run
file holds while the epoch runs), and for pytest's junit XML.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.gpu_check import runfiles
from tests.gpu_check.processes import Processes, TimedOut, read_log, signal_children
from tests.gpu_check.profiles import SPEED_TRAIN_IMAGES, Profile, speed_goals_missed
from tests.gpu_check.report import Outcome, fmt

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
EXIT_PREEMPTED = 75
MAX_RECOMPILES = 2
FORCE_DIST = {"DTL_FORCE_DISTRIBUTED": "1"}


class StepFailed(Exception):
    """A check did not hold: the step is FAIL with this reason."""


class StepSkipped(Exception):
    """The step cannot run here: SKIP with this reason."""


class Context:
    """What the steps share: the profile, the steps this check runs, the scratch folder (data, weights, runs,
    logs) and the processes of the step that runs."""

    def __init__(self, profile: Profile, scratch: Path, steps: list[str] | None = None) -> None:
        self.profile = profile
        self.scratch = scratch
        self.steps = steps if steps is not None else [name for name, _, _ in STEPS]
        """The steps this check runs (the inputs step makes weights for their models only)."""
        self.data = scratch / "data"
        self.weights: dict[str, Path] = {}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if profile.threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(profile.threads))
        self.procs = Processes(scratch / "logs", ROOT, env)

    @property
    def logs(self) -> Path:
        return self.procs.logs

    def train(self, *flags: str, torchrun: bool = False) -> list[str]:
        """A `train.py` command line on the check's data (32 px unless flags say otherwise)."""
        head = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [PY]
        return [*head, str(ROOT / "train.py"), "--dataset", "cifar10", "--data-dir", str(self.data),
                "--no-download", "--image-size", "32", *self.profile.device, *flags]

    def weights_flags(self, flags: tuple[str, ...]) -> list[str]:
        """flags + `--weights FILE` for the model they name."""
        model = flags[flags.index("--model") + 1]
        return [*flags, "--weights", str(self.weights[model])]

    def run_dir(self, name: str) -> Path:
        """A fresh run folder (a reused GPU_CHECK_DIR must not turn 'computed' into 'reused')."""
        path = self.scratch / "runs" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# ---- judging ---------------------------------------------------------------------------------------

def error_line(log: str) -> str:
    """The most telling line of a failed run's log, for the reason: its last `error` line or exception."""
    lines = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    for pattern in (r"^error:|\berror:", r"^\w+(Error|Exception)\b", r"exitcode\s*:"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "(empty log)"


def require_ok(code: int, log: str, what: str) -> None:
    if code != 0:
        raise StepFailed(f"{what} exited {code}: {error_line(log)}")


def check_backend(ctx: Context, run: Path, figures: dict[str, Any]) -> None:
    """The run's process group (config.json run.backend) is the profile's (nccl on a GPU)."""
    figures["backend"] = runfiles.run_info(run).get("backend") or "none"
    if figures["backend"] != ctx.profile.backend:
        raise StepFailed(f"expected a {ctx.profile.backend} process group at world size 1 with "
                         f"DTL_FORCE_DISTRIBUTED=1, {run / 'config.json'} says {figures['backend']} "
                         "(dtl/distributed/env.py not honouring DTL_FORCE_DISTRIBUTED?)")


def resumed_from(run: Path) -> str:
    """The checkpoint this start of the run resumed from (config.json resumed_from); StepFailed if none."""
    found = runfiles.config(run).get("resumed_from")
    if not found:
        raise StepFailed(f"the --resume auto run did not resume ({run / 'config.json'} has no resumed_from)")
    return Path(found).name


def check_same_weights(a: Path, b: Path, figures: dict[str, Any], what: str) -> None:
    """B's final model.safetensors equals A's tensor by tensor."""
    try:
        figures |= runfiles.compare_weights(a / "model.safetensors", b / "model.safetensors")
    except ValueError as err:
        raise StepFailed(str(err)) from None
    if figures["unequal_tensors"]:
        raise StepFailed(f"{what} weights differ from the uninterrupted run's in {figures['unequal_tensors']} of "
                         f"{figures['tensors']} tensors (max abs diff {figures['max_abs_diff']:.3g})")
    if not figures["first_unequal"]:
        del figures["first_unequal"]


def recompiles(log: str) -> tuple[int, list[str]]:
    """torch's recompile report (TORCH_LOGS=recompiles): how many recompiles, and the distinct guard failures
    that caused them (the first 100 characters of each)."""
    count = len(re.findall(r"Recompiling function", log))
    reasons: list[str] = []
    for line in log.splitlines():
        found = re.search(r"\[__recompiles\]\s+- \d+/\d+: (.*)", line)
        if found and found.group(1)[:100] not in reasons:
            reasons.append(found.group(1)[:100])
    return count, reasons


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """pytest's junit XML: the counts (tests, failures, errors, skipped, passed) and the failed test ids."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}, []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts, failed


# ---- the steps -------------------------------------------------------------------------------------

def step_inputs(ctx: Context, out: Outcome) -> None:
    """Random weights (seed 0) for every model the check's steps use, and the synthetic CIFAR-10-format data
    set (written by `dtl data synth` while the weights are made)."""
    n_train, n_test = ctx.profile.synth
    shutil.rmtree(ctx.data, ignore_errors=True)
    synth, synth_log = ctx.procs.start("inputs-synth", [PY, "-m", "dtl.cli", "data", "synth", "--out", str(ctx.data),
                                                        "--train", str(n_train), "--test", str(n_test)])
    t0 = time.monotonic()
    import torchvision

    models = ctx.profile.models(ctx.steps)
    folder = ctx.scratch / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        torch.manual_seed(0)
        path = folder / f"{model}-random-seed0.pth"
        torch.save(torchvision.models.get_model(model).state_dict(), path)
        ctx.weights[model] = path
    out.figures["weights"] = ", ".join(f"{m} {ctx.weights[m].stat().st_size / 2**20:.0f} MiB" for m in models)
    out.figures["weights_s"] = time.monotonic() - t0
    code = ctx.procs.wait(synth)
    require_ok(code, read_log(synth_log), "dtl data synth")
    out.figures["synth_images"] = f"{n_train}+{n_test}"
    out.figures["synth_s"] = time.monotonic() - t0


def step_bf16(ctx: Context, out: Outcome) -> None:
    """VGG16 transfer in bf16 under torchrun at world size 1 with DTL_FORCE_DISTRIBUTED=1: a process group on
    the profile's backend, precision bf16, one epoch in metrics.jsonl."""
    run = ctx.run_dir("bf16_nccl_transfer")
    code, log = ctx.procs.run("bf16_nccl_transfer", ctx.train(
        *ctx.weights_flags(ctx.profile.bf16), "--mode", "transfer", "--precision", "bf16", "--epochs", "1",
        "--output-dir", str(run), torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "torchrun train.py")
    check_backend(ctx, run, out.figures)
    precision = out.figures["precision"] = runfiles.run_info(run).get("precision")
    if precision != "bf16":
        raise StepFailed(f"expected precision bf16 in config.json, got {precision!r}")
    rows = runfiles.metrics(run)
    out.figures["epochs"] = len(rows)
    if len(rows) != 1:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs, expected 1")
    out.figures |= runfiles.last_epoch_figures(rows, ("images_per_sec", "epoch_seconds", "test_acc"))


def step_fp16(ctx: Context, out: Outcome) -> None:
    """fp16 with --fp16-init-scale 1e30: the first steps overflow; they must be skipped (metrics.jsonl
    overflow_skips), not end the run as a non-finite loss."""
    run = ctx.run_dir("fp16_overflow")
    code, log = ctx.procs.run("fp16_overflow", ctx.train(
        *ctx.weights_flags(ctx.profile.fp16), "--mode", "finetune", "--precision", "fp16",
        "--fp16-init-scale", "1e30", "--epochs", "1", "--output-dir", str(run)))
    require_ok(code, log, "train.py --precision fp16 (overflowing steps must be skipped, not end the run)")
    out.figures["precision"] = runfiles.run_info(run).get("precision")
    if out.figures["precision"] != "fp16":
        raise StepFailed(f"expected precision fp16 in config.json, got {out.figures['precision']!r}")
    rows = runfiles.metrics(run)
    if not rows:
        raise StepFailed("metrics.jsonl has no epoch")
    skips, step = rows[-1].get("overflow_skips"), rows[-1].get("global_step")
    out.figures["overflow_skips"] = skips if skips is not None else "absent from metrics.jsonl"
    out.figures["global_step"] = step
    if isinstance(skips, int) and isinstance(step, int):
        out.figures["updates_after_overflows"] = step - skips
    out.figures |= runfiles.last_epoch_figures(rows, ("train_loss", "nan_skips"))
    if not isinstance(skips, int):
        out.reason = "dtl reported no skipped overflow steps (metrics.jsonl has no overflow_skips)"


#: epoch 1's position: a plain progress line ("epoch 1/2 train: 3/10 (30%) ...", stderr not a terminal) or a
#: tqdm bar ("epoch 1/2 train:  30%|###   | 3/10")
PROGRESS = re.compile(r"epoch 1/\d+ train(?::|[^\r\n|]*\|[^|\r\n]*\|)\s*(\d+)/(\d+)")


def wait_for_progress(procs: Processes, proc: subprocess.Popen, log: Path, fraction: float) -> tuple[int, int]:
    """Poll the progress lines of epoch 1 until `fraction` of its steps are done; (done, total)."""
    while time.monotonic() < procs.deadline:
        found = PROGRESS.findall(read_log(log))
        if found:
            done, total = map(int, found[-1])
            if done >= max(2, int(total * fraction)):
                return done, total
        if proc.poll() is not None:
            raise StepFailed(f"the run to interrupt ended (exit {proc.returncode}) before it was signalled: "
                             f"{error_line(read_log(log))}")
        time.sleep(0.05)
    raise TimedOut("timed out waiting for epoch 1 of the run to interrupt")


def check_preempted(run: Path, figures: dict[str, Any]) -> None:
    """status.json after the signal: state preempted, exit code 75, and where the run stopped."""
    status = runfiles.status(run)
    figures["status"] = status.get("state")
    figures["worker_exit"] = status.get("exit_code")
    figures["stopped_at"] = f"global step {status.get('global_step')}, {status.get('epoch')} epoch(s) done"
    if status.get("state") != "preempted" or status.get("exit_code") != EXIT_PREEMPTED:
        raise StepFailed(f"after SIGUSR1 expected status.json state preempted / exit code {EXIT_PREEMPTED}, got "
                         f"{status or 'no status.json'}")


def step_resume(ctx: Context, out: Outcome) -> None:
    """A (uninterrupted) and B (SIGUSR1 mid-epoch 1, then --resume auto) run side by side; same final weights."""
    env = dict(FORCE_DIST)  # CUBLAS_WORKSPACE_CONFIG is dtl's job under --deterministic
    flags = (*ctx.weights_flags(ctx.profile.resume), "--mode", "finetune", "--deterministic", "--epochs", "2",
             "--checkpoint-every-steps", "0", "--progress-every", "0.2")  # lines to time the signal by
    run_a, run_b = ctx.run_dir("resume_A"), ctx.run_dir("resume_B")
    procs = ctx.procs
    proc_a, log_a = procs.start("preempt_resume-A", ctx.train(*flags, "--output-dir", str(run_a), torchrun=True), env)
    proc_b, log_b = procs.start("preempt_resume-B", ctx.train(*flags, "--output-dir", str(run_b), torchrun=True), env)
    out.log = str(log_b)
    done, total = wait_for_progress(procs, proc_b, log_b, 0.25)
    if not signal_children(proc_b.pid, b"train.py", signal.SIGUSR1):
        raise StepFailed(f"found no train.py worker under the torchrun agent (pid {proc_b.pid})")
    out.figures["signalled_at"] = f"step {done}/{total} of epoch 1"
    out.figures["launcher_exit"] = procs.wait(proc_b)
    check_preempted(run_b, out.figures)
    check_backend(ctx, run_b, out.figures)
    out.log = str(ctx.logs / "preempt_resume-B-resume.log")
    code, log = procs.run("preempt_resume-B-resume", ctx.train(*flags, "--output-dir", str(run_b), "--resume",
                                                               "auto", torchrun=True), env)
    require_ok(code, log, "the --resume auto run")
    out.figures["resumed_from"] = resumed_from(run_b)
    out.log = str(log_a)
    require_ok(procs.wait(proc_a), read_log(log_a), "the uninterrupted run")
    rows_a, rows_b = runfiles.metrics(run_a), runfiles.metrics(run_b)
    out.figures["epochs"] = f"A {len(rows_a)}, B {len(rows_b)}"
    check_same_weights(run_a, run_b, out.figures, "resumed")
    if len(rows_a) != 2 or len(rows_b) != 2:
        raise StepFailed(f"expected 2 epochs in both metrics.jsonl, got {out.figures['epochs']}")


def step_compile(ctx: Context, out: Outcome) -> None:
    """--compile for 2 epochs with partial last batches: at most `MAX_RECOMPILES` recompiles (torch's own
    report, TORCH_LOGS=recompiles)."""
    if ctx.profile.compile is None:
        raise StepSkipped(ctx.profile.compile_skip)
    run = ctx.run_dir("compile")
    code, log = ctx.procs.run("compile_recompiles", ctx.train(
        *ctx.weights_flags(ctx.profile.compile), "--mode", "finetune", "--compile", "--epochs", "2",
        "--output-dir", str(run)), env={"TORCH_LOGS": "recompiles"})
    require_ok(code, log, "train.py --compile")
    count, reasons = recompiles(log)
    out.figures["recompiles"] = count
    out.figures["limit"] = MAX_RECOMPILES
    out.figures["guard_failures"] = reasons[:6]
    rows = runfiles.metrics(run)
    out.figures["epoch_seconds"] = [round(r["epoch_seconds"], 2) for r in rows if "epoch_seconds" in r]
    out.figures |= runfiles.last_epoch_figures(rows, ("images_per_sec",))
    if len(rows) != 2:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs, expected 2")
    if count > MAX_RECOMPILES:
        raise StepFailed(f"{count} recompiles (limit {MAX_RECOMPILES}): {'; '.join(reasons[:4])}")


def check_cached_features(run: Path, expected: str, which: str) -> None:
    """config.json's cached_features is `expected` ("computed" by the first run, "reused" by the second)."""
    found = runfiles.config(run).get("cached_features")
    if found != expected:
        raise StepFailed(f"the {which} run should have {expected} the cached features, config.json says "
                         f"cached_features={found!r}")


def step_cache(ctx: Context, out: Outcome) -> None:
    """--cache-features: computed by a first run, reused by a `--resume auto` second one."""
    run = ctx.run_dir("cache_features")
    flags = (*ctx.weights_flags(ctx.profile.cache), "--mode", "transfer", "--no-augment", "--cache-features",
             "--dropout", "0", "--output-dir", str(run))
    t0 = time.monotonic()
    code, log = ctx.procs.run("cache_features-1", ctx.train(*flags, "--epochs", "1"))
    require_ok(code, log, "the first --cache-features run")
    out.figures["first_run_s"] = time.monotonic() - t0
    check_cached_features(run, "computed", "first")
    out.figures["stored"] = runfiles.stored_features(run)
    t0 = time.monotonic()
    code, log = ctx.procs.run("cache_features-2", ctx.train(*flags, "--epochs", "2", "--resume", "auto"))
    require_ok(code, log, "the second (--resume auto --epochs 2) run")
    out.figures["second_run_s"] = time.monotonic() - t0
    check_cached_features(run, "reused", "second")
    rows = runfiles.metrics(run)
    out.figures["epochs"] = len(rows)
    out.figures |= runfiles.last_epoch_figures(rows, ("images_per_sec", "test_acc"))
    if len(rows) != 2:
        raise StepFailed(f"metrics.jsonl has {len(rows)} epochs after the second run, expected 2")


def check_sharded(run: Path, figures: dict[str, Any]) -> None:
    """--strategy fsdp sharded the model: the run's checkpoints are sharded (DCP safetensors shards)."""
    figures["shard_files"] = runfiles.shard_files(run)
    if not figures["shard_files"]:
        raise StepFailed(f"no sharded checkpoint files under {run / 'checkpoints'}/step-*/sharded/: "
                         "--strategy fsdp did not shard")


def step_fsdp(ctx: Context, out: Outcome) -> None:
    """FSDP at world size 1: A (2 epochs) and B (1 epoch, then --resume auto --epochs 2 from its sharded
    checkpoint) end with the same weights."""
    flags = (*ctx.weights_flags(ctx.profile.fsdp), "--mode", "finetune", "--strategy", "fsdp", "--deterministic",
             "--checkpoint-every-steps", "0")
    run_a, run_b = ctx.run_dir("fsdp_A"), ctx.run_dir("fsdp_B")
    procs = ctx.procs
    code, log = procs.run("fsdp_resume-A", ctx.train(*flags, "--epochs", "2", "--output-dir", str(run_a),
                                                      torchrun=True), env=FORCE_DIST)
    out.log = str(ctx.logs / "fsdp_resume-A.log")
    require_ok(code, log, "the uninterrupted FSDP run")
    check_backend(ctx, run_a, out.figures)
    check_sharded(run_a, out.figures)
    out.log = str(ctx.logs / "fsdp_resume-B1.log")
    code, log = procs.run("fsdp_resume-B1", ctx.train(*flags, "--epochs", "1", "--output-dir", str(run_b),
                                                       torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "the 1-epoch FSDP run")
    check_sharded(run_b, out.figures)
    out.log = str(ctx.logs / "fsdp_resume-B2.log")
    code, log = procs.run("fsdp_resume-B2", ctx.train(*flags, "--epochs", "2", "--output-dir", str(run_b),
                                                       "--resume", "auto", torchrun=True), env=FORCE_DIST)
    require_ok(code, log, "the --resume auto FSDP run")
    out.figures["resumed_from"] = resumed_from(run_b)
    check_same_weights(run_a, run_b, out.figures, "resumed FSDP")


def speed_flags(ctx: Context, label: str, flags: tuple[str, ...]) -> list[str]:
    """dtl's flags for a speed case: on the GPU profile each case's own train subset (about 2 s an epoch)."""
    subset = SPEED_TRAIN_IMAGES.get(label)
    return [*ctx.weights_flags(flags), *ctx.profile.speed_dtl, *(("--train-subset", str(subset)) if subset else ())]


def speed_row(dtl_rows: list[dict[str, Any]], strong: dict[str, Any] | None) -> dict[str, Any]:
    """One case of the speed table: dtl's rate (its last epoch) beside the strong loop's, their ratio, and
    TFLOP/s (the same model, mode and batch: the same FLOPs per image) against the bf16 matmul rate."""
    row: dict[str, Any] = {"dtl_img_s": dtl_rows[-1]["images_per_sec"], "epoch": dtl_rows[-1]["epoch"]}
    if strong is not None:
        row |= {"strong_img_s": strong["images_per_s"], "ratio": row["dtl_img_s"] / strong["images_per_s"]}
        if "flops_per_image" in strong:
            row["dtl_tflops"] = strong["flops_per_image"] * row["dtl_img_s"] / 1e12
            row["strong_tflops"] = strong["tflops"]
        if "bf16_matmul_tflops" in strong:
            row["dtl_fraction_of_bf16_matmul"] = row["dtl_tflops"] / strong["bf16_matmul_tflops"]
    return row


def speed_summary(rows: dict[str, dict[str, Any]]) -> str:
    return "; ".join(
        f"{label} dtl {fmt(r['dtl_img_s'])}" + (f" / strong {fmt(r['strong_img_s'])} = {r['ratio']:.2f}x"
                                                if "ratio" in r else " img/s")
        + (f" ({r['dtl_fraction_of_bf16_matmul']:.0%} of bf16 peak)" if "dtl_fraction_of_bf16_matmul" in r else "")
        for label, r in rows.items())


def step_speed(ctx: Context, out: Outcome) -> None:
    """The speed table: dtl's epoch rate (train.py, metrics.jsonl) beside the strong loop's train-step rate
    (`python -m dtl.tools.bench.strong_rate`, one process for all cases); FAIL when a goal is missed (GPU)."""
    p = ctx.profile
    folder = ctx.scratch / "speed"
    folder.mkdir(exist_ok=True)
    cases_file, strong_json = folder / "strong_cases.json", folder / "strong.json"
    cases_file.write_text(json.dumps({label: list(ctx.weights_flags(flags)) for label, flags in p.speed}))
    strong_json.unlink(missing_ok=True)
    code, log = ctx.procs.run("speed-strong", [PY, "-m", "dtl.tools.bench.strong_rate", "--cases", str(cases_file),
                                               "--dataset", "cifar10", "--data-dir", str(ctx.data), "--no-download",
                                               *p.device, *p.speed_strong, "--json", str(strong_json)])
    require_ok(code, log, "python -m dtl.tools.bench.strong_rate")
    strong = runfiles.read_json(strong_json)
    rows: dict[str, dict[str, Any]] = {}
    for label, flags in (*p.speed, ("cached_features", ())):
        run = ctx.run_dir(f"speed_{label}")
        train_flags = (speed_flags(ctx, label, flags) if flags else
                       [*ctx.weights_flags(p.speed_cached), *p.speed_dtl, "--cache-features", "--no-augment",
                        "--dropout", "0"])
        code, log = ctx.procs.run(f"speed-{label}", ctx.train(*train_flags, "--output-dir", str(run)))
        require_ok(code, log, f"train.py ({label})")
        epochs = runfiles.metrics(run)
        if not epochs:
            raise StepFailed(f"train.py ({label}) wrote no epoch to metrics.jsonl")
        rows[label] = speed_row(epochs, strong.get(label))
        if "bf16_matmul_tflops" in strong.get(label, {}):
            out.figures["bf16_matmul_tflops"] = strong[label]["bf16_matmul_tflops"]
    out.figures["cases"] = rows
    out.summary = speed_summary(rows)
    if p.speed_goals:
        missed = speed_goals_missed(rows)
        out.figures["goals_missed"] = missed
        if missed:
            raise StepFailed(f"speed goals missed: {'; '.join(missed)} | {out.summary}")


def bench_figures(result: dict[str, Any]) -> dict[str, Any]:
    """One `dtl bench --json` result as the check's figures: per phase the three loops' images/s, both
    ratios and the TFLOP/s."""
    figures: dict[str, Any] = {"precision": result["meta"]["precision"]["dtl"]}
    for phase in ("train_step", "eval_step"):
        ref, ours, ratio = result["reference"][phase], result["dtl"][phase], result["ratio"][phase]
        strong = result["strong"][phase]
        figures[phase] = {"reference_img_s": ref["images_per_s"], "strong_img_s": strong["images_per_s"],
                          "dtl_img_s": ours["images_per_s"], "ratio": ratio["images_per_s"],
                          "ratio_strong": result["ratio_strong"][phase]["images_per_s"]}
        for side, entry in (("dtl", ours), ("strong", strong)):
            for key in ("tflops", "fraction_of_bf16_matmul"):
                if key in entry:
                    figures[phase][f"{side}_{key}"] = entry[key]
        if "tflops" in ref:
            figures[phase]["reference_tflops"] = ref["tflops"]
    if "bf16_matmul_tflops" in result["meta"]:
        figures["bf16_matmul_tflops"] = result["meta"]["bf16_matmul_tflops"]
    return figures


def bench_summary(label: str, figures: dict[str, Any]) -> str:
    train, evals = figures["train_step"], figures["eval_step"]
    tflops = (f", dtl {train['dtl_tflops']:.3g} TFLOP/s" if "dtl_tflops" in train else "") + (
        f" = {train['dtl_fraction_of_bf16_matmul']:.1%} of bf16 matmul" if "dtl_fraction_of_bf16_matmul" in train
        else "")
    return (f"{label} ({figures['precision']}): train img/s dtl {fmt(train['dtl_img_s'])} vs ref "
            f"{fmt(train['reference_img_s'])} = {train['ratio']:.2f}x, vs strong {fmt(train['strong_img_s'])} = "
            f"{train['ratio_strong']:.2f}x{tflops}; eval {fmt(evals['dtl_img_s'])} vs {fmt(evals['reference_img_s'])} "
            f"= {evals['ratio']:.2f}x")


def step_bench(ctx: Context, out: Outcome) -> None:
    """`dtl bench` for each of the profile's cases: dtl, the reference loop and the strong loop."""
    folder = ctx.scratch / "bench"
    folder.mkdir(exist_ok=True)
    for label, flags in ctx.profile.bench:
        path = folder / f"{label}.json"
        path.unlink(missing_ok=True)
        cmd = [PY, "-m", "dtl.cli", "bench", *ctx.weights_flags(flags), "--dataset", "cifar10", "--data-dir",
               str(ctx.data), "--no-download", *ctx.profile.device, *ctx.profile.bench_common, "--json", str(path)]
        code, log = ctx.procs.run(f"bench-{label}", cmd)
        require_ok(code, log, f"dtl bench ({label})")
        result = runfiles.read_json(path)
        if not result:
            raise StepFailed(f"dtl bench ({label}) wrote no JSON at {path}")
        out.figures[label] = bench_figures(result)
        out.summary += ("; " if out.summary else "") + bench_summary(label, out.figures[label])


def step_pytest(ctx: Context, out: Outcome) -> None:
    """The suite's CUDA-only tests (pytest -m cuda); SKIP when none is collected or all skip."""
    junit = ctx.logs / "pytest_cuda.xml"
    junit.unlink(missing_ok=True)
    code, log = ctx.procs.run("pytest_cuda", [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                              f"--junitxml={junit}"])
    if code == 5:
        raise StepSkipped("no test carries the cuda marker (pytest -m cuda collected nothing)")
    counts, failed = junit_counts(junit)
    out.figures |= counts
    if code != 0 and failed:
        raise StepFailed(f"pytest -m cuda exited {code}: {len(failed)} failed: {', '.join(failed[:5])}")
    require_ok(code, log, "pytest -m cuda")
    if not counts.get("passed"):
        raise StepSkipped(f"all {counts.get('skipped', 0)} cuda tests skipped (no CUDA in this run)")


STEPS: tuple[tuple[str, Callable[[Context, Outcome], None], float], ...] = (
    ("inputs", step_inputs, 120),
    ("bf16_nccl_transfer", step_bf16, 150),
    ("fp16_overflow", step_fp16, 120),
    ("preempt_resume", step_resume, 240),
    ("compile_recompiles", step_compile, 240),
    ("cache_features", step_cache, 150),
    ("fsdp_resume", step_fsdp, 150),
    ("speed", step_speed, 240),
    ("bench", step_bench, 200),
    ("pytest_cuda", step_pytest, 240),
)
"""(name, function, timeout in seconds), in the order they run."""
