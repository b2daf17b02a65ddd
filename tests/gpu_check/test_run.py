"""The driver (`tests.gpu_check.run`): which steps run, the time budget, and how a step's end -- a failure, a
skip, a timeout, a bug, an interruption -- becomes its row."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.gpu_check import run
from tests.gpu_check.processes import TimedOut
from tests.gpu_check.profiles import CPU_SMOKE
from tests.gpu_check.report import Outcome
from tests.gpu_check.steps import Context, StepFailed, StepSkipped


class Recorder:
    """Processes that record being stopped (the driver stops a step's processes however it ends)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.deadline, self.last_log, self.stopped = logs, 0.0, None, 0
        logs.mkdir(parents=True, exist_ok=True)

    def stop_all(self) -> None:
        self.stopped += 1


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    context = Context(CPU_SMOKE, tmp_path)
    context.procs = Recorder(tmp_path / "logs")  # type: ignore[assignment]
    return context


def test_which_steps_are_blocked():
    passed, failed = [Outcome("inputs")], [Outcome("inputs", "FAIL")]
    assert run.blocked_reason("bench", set(), passed, False) is None
    assert run.blocked_reason("bench", set(), failed, False) == "the inputs step failed"
    assert run.blocked_reason("pytest_cuda", set(), failed, False) is None  # needs no inputs
    assert run.blocked_reason("bench", {"speed"}, passed, False) == "not in GPU_CHECK_STEPS"
    assert run.blocked_reason("inputs", {"speed"}, [], False) is None
    assert run.blocked_reason("inputs", {"pytest_cuda"}, [], False) == "no step in GPU_CHECK_STEPS needs it"
    assert run.blocked_reason("bench", set(), passed, True) == "the check was interrupted"


def raises(error: Exception):
    def step(ctx: Context, out: Outcome) -> None:
        out.figures["started"] = True
        raise error
    return step


@pytest.mark.parametrize(("error", "result", "reason"), [
    (StepFailed("it did not hold"), "FAIL", "^it did not hold$"),
    (StepSkipped("not here"), "SKIP", "^not here$"),
    (TimedOut("timed out waiting for x"), "FAIL", r"^timed out waiting for x after 0 s \(limit 60 s\)$"),
    (KeyError("oops"), "FAIL", "^KeyError: 'oops'$"),
])
def test_a_steps_end_becomes_its_row_and_its_processes_are_stopped(ctx, error, result, reason):
    out = run.run_step(ctx, "bench", raises(error), 60, time.monotonic() + 600, None)
    assert out.result == result and out.figures["started"]
    assert pytest.approx(ctx.procs.deadline, abs=5) == time.monotonic() + 60  # its own timeout, within the budget
    assert re.match(reason, out.reason) and ctx.procs.stopped == 1
    if isinstance(error, KeyError):  # a bug in a step: the traceback in a log of its own, its tail shown
        crash = Path(out.figures["driver_traceback"])
        assert "KeyError: 'oops'" in crash.read_text() and out.log == str(crash) and out.log_tail


def test_the_budget_skips_what_it_cannot_start_and_caps_the_timeout(ctx):
    out = run.run_step(ctx, "bench", raises(AssertionError("must not run")), 60, time.monotonic() + 5, None)
    assert out.result == "SKIP" and "time budget (GPU_CHECK_BUDGET_S) is used up (5 s left)" in out.reason
    out = run.run_step(ctx, "bench", lambda c, o: None, 600, time.monotonic() + 100, None)
    assert out.result == "PASS" and ctx.procs.deadline <= time.monotonic() + 100
    assert run.run_step(ctx, "x", raises(AssertionError()), 60, time.monotonic() + 600, "why").reason == "why"


def test_the_steps_run_in_order_and_an_interruption_stops_the_rest(ctx, capsys):
    def interrupted(c: Context, o: Outcome) -> None:
        raise KeyboardInterrupt

    ran = []
    steps = (("inputs", lambda c, o: ran.append("inputs"), 10), ("a", lambda c, o: ran.append("a"), 10),
             ("b", interrupted, 10), ("c", lambda c, o: ran.append("c"), 10))
    outcomes = run.run_steps(ctx, set(), 600, steps)
    assert ran == ["inputs", "a"]
    assert [(o.name, o.result) for o in outcomes] == [("inputs", "PASS"), ("a", "PASS"), ("b", "FAIL"),
                                                      ("c", "SKIP")]
    assert outcomes[2].reason.startswith("interrupted") and outcomes[3].reason == "the check was interrupted"
    assert "gpu-check: [4/4] c ... SKIP (0.0 s): the check was interrupted" in capsys.readouterr().out
