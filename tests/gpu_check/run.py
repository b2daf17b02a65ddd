"""The driver: picks the profile, runs the steps within the session's time budget, prints the table and
writes the JSON report (see `tests.gpu_check` for the environment variables)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from tests.gpu_check import report
from tests.gpu_check.processes import TimedOut
from tests.gpu_check.profiles import CPU_SMOKE, GPU
from tests.gpu_check.report import Outcome
from tests.gpu_check.steps import STEPS, Context, StepFailed, StepSkipped

EXIT_USAGE = 2
"""No CUDA device (and no GPU_CHECK_CPU_SMOKE=1), or an unknown step in GPU_CHECK_STEPS."""
MIN_STEP_SECONDS = 15.0
"""A step is not started with less than this left of the budget (it is SKIPped instead)."""
#: steps that need neither the inputs nor each other
INDEPENDENT = ("inputs", "pytest_cuda")


def blocked_reason(name: str, wanted: set[str], outcomes: list[Outcome], interrupted: bool) -> str | None:
    """Why step `name` does not run (SKIP with this reason), or None. `wanted`: GPU_CHECK_STEPS (empty: all)."""
    if interrupted:
        return "the check was interrupted"
    if name == "inputs" and wanted and not wanted - set(INDEPENDENT):
        return "no step in GPU_CHECK_STEPS needs it"
    if wanted and name not in wanted and name != "inputs":
        return "not in GPU_CHECK_STEPS"
    if name not in INDEPENDENT and outcomes and outcomes[0].result != "PASS":
        return "the inputs step failed"
    return None


def run_step(ctx: Context, name: str, fn: Callable[[Context, Outcome], None], timeout: float, deadline: float,
             blocked: str | None) -> Outcome:
    """One step within min(its timeout, what is left of the budget at `deadline`); its processes are stopped
    when it ends, however it ends. A bug in a step is a FAIL with the traceback in a log of its own."""
    out = Outcome(name)
    left = deadline - time.monotonic()
    if blocked:
        out.result, out.reason = "SKIP", blocked
        return out
    if left < MIN_STEP_SECONDS:
        out.result = "SKIP"
        out.reason = f"the check's time budget (GPU_CHECK_BUDGET_S) is used up ({max(left, 0):.0f} s left)"
        return out
    limit = min(timeout, left)
    ctx.procs.deadline = time.monotonic() + limit
    ctx.procs.last_log = None
    start = time.monotonic()
    try:
        fn(ctx, out)
    except StepSkipped as why:
        out.result, out.reason = "SKIP", str(why)
    except StepFailed as why:
        out.result, out.reason = "FAIL", str(why)
    except TimedOut as why:
        out.result, out.reason = "FAIL", f"{why} after {time.monotonic() - start:.0f} s (limit {limit:.0f} s)"
    except Exception:  # a bug in a step, or output it could not read
        out.result = "FAIL"
        out.reason = traceback.format_exc().strip().splitlines()[-1]
        crash = ctx.logs / f"{name}-driver-traceback.log"
        crash.write_text(traceback.format_exc())
        out.log = out.log or str(ctx.procs.last_log or crash)
        out.figures["driver_traceback"] = str(crash)
    finally:
        ctx.procs.stop_all()
    out.seconds = time.monotonic() - start
    out.log = out.log or (str(ctx.procs.last_log) if ctx.procs.last_log else None)
    if out.result == "FAIL" and out.log:
        out.log_tail = report.tail(Path(out.log))
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_steps(ctx: Context, wanted: set[str], budget_s: float,
              steps: tuple[tuple[str, Callable[[Context, Outcome], None], float], ...] = STEPS) -> list[Outcome]:
    """Every step in order (SKIP where `blocked_reason` says so), printing one line each; Ctrl-C or SIGTERM
    stops the running step's processes, and the steps after it are SKIPped."""
    deadline = time.monotonic() + budget_s
    outcomes: list[Outcome] = []
    interrupted = False
    for i, (name, fn, timeout) in enumerate(steps, start=1):
        blocked = blocked_reason(name, wanted, outcomes, interrupted)
        print(f"gpu-check: [{i}/{len(steps)}] {name} ...", end="", flush=True)
        step_start = time.monotonic()
        try:
            out = run_step(ctx, name, fn, timeout, deadline, blocked)
        except KeyboardInterrupt:
            interrupted = True
            out = Outcome(name, "FAIL", time.monotonic() - step_start,
                          reason="interrupted (SIGINT/SIGTERM); its processes were stopped")
        outcomes.append(out)
        print(f" {out.result} ({out.seconds:.1f} s){': ' + out.reason if out.reason else ''}", flush=True)
        if out.log_tail:
            print(f"  --- last {len(out.log_tail)} lines of {out.log} ---")
            print("\n".join(f"  | {ln}" for ln in out.log_tail), flush=True)
    return outcomes


def main() -> int:
    smoke = os.environ.get("GPU_CHECK_CPU_SMOKE", "") not in ("", "0")
    if not smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine "
              "(or GPU_CHECK_CPU_SMOKE=1 for the CPU smoke run)", file=sys.stderr)
        return EXIT_USAGE
    profile = CPU_SMOKE if smoke else GPU
    names = [name for name, _, _ in STEPS]
    wanted = {s.strip() for s in os.environ.get("GPU_CHECK_STEPS", "").split(",") if s.strip()}
    if wanted - set(names):
        print(f"gpu-check: unknown step(s) in GPU_CHECK_STEPS: {', '.join(sorted(wanted - set(names)))}; steps: "
              f"{', '.join(names)}", file=sys.stderr)
        return EXIT_USAGE
    scratch = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S") or profile.budget_s)
    env = report.environment()
    ctx = Context(profile, scratch, [n for n in names if not wanted or n in wanted])
    print(f"gpu-check ({profile.name}): {env.get('gpu', 'CPU only')}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"NCCL {env.get('nccl')}; scratch folder {scratch}; budget {budget:.0f} s", flush=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: stop this step's processes, report what ran
    outcomes = run_steps(ctx, wanted, budget)
    total = time.monotonic() - started
    result = report.report(outcomes, profile.name, total, budget, scratch, env)
    json_path = Path(os.environ.get("GPU_CHECK_JSON") or scratch / "gpu_check.json")
    report.write_report(result, json_path, Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    print("\n" + report.format_table(outcomes) + "\n", flush=True)
    verdict = f"FAIL ({', '.join(result['failed'])})" if result["failed"] else "PASS"
    print(f"gpu-check: {verdict} in {total:.0f} s on {env.get('gpu', 'CPU (smoke run)')}; "
          f"report {json_path}; runs and logs in {scratch}", flush=True)
    return 1 if result["failed"] else 0
