"""The steps' commands and verdicts, on recorded run folders: a `Player` stands in for the processes, and each
command it is given 'runs' by putting a recorded (and, for a failure, edited) run folder where the command
writes its run. The processes themselves: test_processes.py; one real run of the driver: tests/e2e."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtl import cli
from dtl.tools.bench import strong_rate
from tests.conftest import TINY
from tests.gpu_check import steps
from tests.gpu_check.conftest import Recorded, copy_run, edit_json, edit_metrics
from tests.gpu_check.profiles import CPU_SMOKE, GPU, SPEED_GOALS, Profile
from tests.gpu_check.report import Outcome
from tests.gpu_check.steps import Context, StepFailed, StepSkipped

Play = Callable[[str, list[str], dict[str, str]], tuple[int, str]]


class FinishedProc:
    """What `Player.start` returns: a process that has already ended with `returncode`."""

    pid = -1

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode


class Player:
    """Stands in for `tests.gpu_check.processes.Processes`: `play(label, cmd, env)` does what the command would
    (writes its run folder or JSON) and returns (exit code, log text); every command is kept in `commands`."""

    def __init__(self, logs: Path, play: Play) -> None:
        self.logs, self.play = logs, play
        logs.mkdir(parents=True, exist_ok=True)
        self.deadline = math.inf
        self.last_log: Path | None = None
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}

    def start(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[FinishedProc, Path]:
        self.commands[label] = (cmd, env or {})
        code, text = self.play(label, cmd, env or {})
        log = self.logs / f"{label}.log"
        log.write_text(text)
        self.last_log = log
        return FinishedProc(code), log

    def wait(self, proc: FinishedProc) -> int:
        return proc.returncode

    def run(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        proc, log = self.start(label, cmd, env)
        return proc.returncode, log.read_text()

    def stop_all(self) -> None:
        pass


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def context(tmp_path: Path, profile: Profile, play: Play) -> tuple[Context, Player]:
    ctx = Context(profile, tmp_path / "scratch")
    ctx.weights = {m: tmp_path / f"{m}.pth" for m in ("squeezenet1_1", "resnet18", "vgg16")}
    player = Player(tmp_path / "scratch" / "logs", play)
    ctx.procs = player  # type: ignore[assignment]
    return ctx, player


def writes(src: Path, code: int = 0, log: str = "", **config: Any) -> Play:
    """A command that leaves a copy of the recorded run `src` at its --output-dir, with config.json edited."""
    def play(label: str, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        out = copy_run(src, Path(flag(cmd, "--output-dir")))
        if config:
            edit_json(out / "config.json", **config)
        return code, log
    return play


def by_label(**plays: Play) -> Play:
    return lambda label, cmd, env: plays[label.replace("-", "_")](label, cmd, env)


def run_step(fn: Callable[[Context, Outcome], None], ctx: Context) -> Outcome:
    out = Outcome(fn.__name__)
    fn(ctx, out)
    return out


# ---- bf16_nccl_transfer, fp16_overflow ---------------------------------------------------------------

def test_bf16_runs_torchrun_with_a_process_group_and_reads_backend_and_precision(tmp_path, recorded):
    ctx, player = context(tmp_path, GPU, writes(recorded.plain, run={"backend": "nccl", "precision": "bf16"}))
    out = run_step(steps.step_bf16, ctx)
    cmd, env = player.commands["bf16_nccl_transfer"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and env == {"DTL_FORCE_DISTRIBUTED": "1"}
    assert flag(cmd, "--precision") == "bf16" and flag(cmd, "--model") == "vgg16"
    assert flag(cmd, "--weights") == str(tmp_path / "vgg16.pth")
    assert (out.figures["backend"], out.figures["precision"], out.figures["epochs"]) == ("nccl", "bf16", 1)
    assert out.figures["images_per_sec"] > 0


@pytest.mark.parametrize(("run_info", "message"), [
    ({"backend": None, "precision": "bf16"}, "expected a nccl process group .* says none"),
    ({"backend": "gloo", "precision": "bf16"}, "expected a nccl process group .* says gloo"),
    ({"backend": "nccl", "precision": "fp32"}, "expected precision bf16 in config.json, got 'fp32'"),
])
def test_bf16_fails_on_the_wrong_backend_or_precision(tmp_path, recorded, run_info, message):
    ctx, _ = context(tmp_path, GPU, writes(recorded.plain, run=run_info))
    with pytest.raises(StepFailed, match=message):
        run_step(steps.step_bf16, ctx)


def test_a_failed_run_fails_the_step_with_its_error_line(tmp_path, recorded):
    log = "some output\nTraceback (most recent call last):\nRuntimeError: CUDA error: out of memory\nmore\n"
    ctx, _ = context(tmp_path, GPU, writes(recorded.plain, code=1, log=log))
    with pytest.raises(StepFailed, match="torchrun train.py exited 1: RuntimeError: CUDA error: out of memory"):
        run_step(steps.step_bf16, ctx)


def fp16_run(tmp_path: Path, recorded: Recorded, **metrics: Any) -> Path:
    src = copy_run(recorded.plain, tmp_path / "fp16_src")
    edit_json(src / "config.json", run={"precision": "fp16"})
    edit_metrics(src, **metrics)
    return src


def test_fp16_reads_the_skipped_overflows_from_metrics(tmp_path, recorded):
    ctx, player = context(tmp_path, CPU_SMOKE, writes(fp16_run(tmp_path, recorded, overflow_skips=2, global_step=2)))
    out = run_step(steps.step_fp16, ctx)
    cmd, _ = player.commands["fp16_overflow"]
    assert flag(cmd, "--fp16-init-scale") == "1e30" and flag(cmd, "--device") == "cpu"
    assert (out.figures["overflow_skips"], out.figures["updates_after_overflows"], out.reason) == (2, 0, "")


def test_fp16_without_overflow_skips_passes_with_a_note_and_a_crash_fails(tmp_path, recorded):
    ctx, _ = context(tmp_path, CPU_SMOKE, writes(fp16_run(tmp_path, recorded)))
    out = run_step(steps.step_fp16, ctx)
    assert out.figures["overflow_skips"] == "absent from metrics.jsonl" and "no skipped overflow" in out.reason
    crash = "dtl.train.step.NonFiniteLossError: 11 non-finite steps in a row\n"
    ctx, _ = context(tmp_path, CPU_SMOKE, writes(fp16_run(tmp_path, recorded), code=1, log=crash))
    with pytest.raises(StepFailed, match="must be skipped, not end the run.*NonFiniteLossError"):
        run_step(steps.step_fp16, ctx)


# ---- preempt_resume ------------------------------------------------------------------------------

PROGRESS_LINE = "epoch 1/2 train: 9/30 (30%) 512 img/s ETA 0:00:02 loss 2.30\n"


def resume_plays(tmp_path: Path, recorded: Recorded, status: dict[str, Any] | None = None,
                 resumed: bool = True, other_weights: bool = False) -> Play:
    """A (uninterrupted, 2 epochs), B (preempted: `status`), B's --resume auto (2 epochs), all on gloo."""
    full = copy_run(recorded.cached_second, tmp_path / "full")
    b = copy_run(full, tmp_path / "preempted")
    edit_json(b / "status.json", **(status or {"state": "preempted", "exit_code": 75, "epoch": 0,
                                               "global_step": 9}))
    resumed_b = copy_run(full, tmp_path / "resumed")
    if not resumed:
        edit_json(resumed_b / "config.json", resumed_from=None)
    if other_weights:
        weights = load_file(str(resumed_b / "model.safetensors"))
        name = next(k for k, v in weights.items() if v.is_floating_point())
        weights[name] = weights[name] + 1
        save_file(weights, str(resumed_b / "model.safetensors"))
    gloo = {"run": {"backend": "gloo"}}
    return by_label(preempt_resume_A=writes(full, **gloo), preempt_resume_B=writes(b, log=PROGRESS_LINE, **gloo),
                    preempt_resume_B_resume=writes(resumed_b, **gloo))


@pytest.fixture
def signalled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes, int]]:
    """The workers the step signals (the agent is not a real process here)."""
    sent: list[tuple[int, bytes, int]] = []
    monkeypatch.setattr(steps, "signal_children", lambda parent, marker, sig: sent.append((parent, marker, sig))
                        or [4242])
    return sent


def test_resume_signals_the_workers_mid_epoch_then_resumes_to_the_same_weights(tmp_path, recorded, signalled):
    ctx, player = context(tmp_path, CPU_SMOKE, resume_plays(tmp_path, recorded))
    out = run_step(steps.step_resume, ctx)
    assert signalled == [(FinishedProc.pid, b"train.py", signal.SIGUSR1)]
    assert out.figures["signalled_at"] == "step 9/30 of epoch 1"
    assert (out.figures["status"], out.figures["worker_exit"], out.figures["backend"]) == ("preempted", 75, "gloo")
    assert out.figures["resumed_from"].startswith("step-") and out.figures["epochs"] == "A 2, B 2"
    assert out.figures["unequal_tensors"] == 0 and out.figures["tensors"] > 0
    assert flag(player.commands["preempt_resume-B-resume"][0], "--resume") == "auto"
    assert "--deterministic" in player.commands["preempt_resume-A"][0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"status": {"state": "completed", "exit_code": 0}}, "expected status.json state preempted / exit code 75"),
    ({"resumed": False}, "the --resume auto run did not resume"),
    ({"other_weights": True}, r"resumed weights differ from the uninterrupted run's in 1 of \d+ tensors"),
])
def test_resume_fails_when_not_preempted_not_resumed_or_not_equal(tmp_path, recorded, signalled, kwargs, message):
    ctx, _ = context(tmp_path, CPU_SMOKE, resume_plays(tmp_path, recorded, **kwargs))
    with pytest.raises(StepFailed, match=message):
        run_step(steps.step_resume, ctx)


def test_the_signal_waits_for_a_quarter_of_epoch_1(tmp_path):
    log = tmp_path / "b.log"
    log.write_text("epoch 1/2 train:  10%|#         | 3/30 [00:01<00:09]\r")  # a tqdm bar, too early
    player = Player(tmp_path / "logs", lambda *a: (0, ""))
    player.deadline = 0.0  # no time to wait for more
    running = subprocess.Popen(["sleep", "5"])
    try:
        with pytest.raises(steps.TimedOut):
            steps.wait_for_progress(player, running, log, 0.25)
        log.write_text(log.read_text() + "epoch 1/2 train:  27%|###       | 8/30 [00:02<00:06]\r")
        player.deadline = math.inf
        assert steps.wait_for_progress(player, running, log, 0.25) == (8, 30)
    finally:
        running.kill()
        running.wait()
    with pytest.raises(StepFailed, match="ended .exit 3. before it was signalled"):
        steps.wait_for_progress(player, FinishedProc(3), tmp_path / "missing.log", 0.25)


# ---- compile_recompiles, cache_features, fsdp_resume ------------------------------------------------

#: TORCH_LOGS=recompiles as torch 2.14.1 writes it (recorded from a compiled function called with 3 shapes)
RECOMPILES = """\
V1207 20:38:25.758000 10183 torch/_dynamo/guards.py:5621] [0/1] [__recompiles] Recompiling function forward in m.py:3
V1207 20:38:25.758000 10183 torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     triggered by the following guard failure(s):
V1207 20:38:25.758000 10183 torch/_dynamo/guards.py:5621] [0/1] [__recompiles]     - 0/0: tensor 'x' size mismatch at index 0. expected 256, actual 136
V1207 20:38:25.818000 10183 torch/_dynamo/guards.py:5621] [0/2] [__recompiles] Recompiling function forward in m.py:3
V1207 20:38:25.818000 10183 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     triggered by the following guard failure(s):
V1207 20:38:25.818000 10183 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     - 0/1: tensor 'x' size mismatch at index 0. expected 136, actual 16
V1207 20:38:25.818000 10183 torch/_dynamo/guards.py:5621] [0/2] [__recompiles]     - 0/0: tensor 'x' size mismatch at index 0. expected 256, actual 16
"""  # noqa: E501


def test_compile_counts_torchs_recompiles_against_the_limit(tmp_path, recorded):
    ctx, player = context(tmp_path, GPU, writes(recorded.cached_second, log=RECOMPILES))
    out = run_step(steps.step_compile, ctx)
    assert player.commands["compile_recompiles"][1] == {"TORCH_LOGS": "recompiles"}
    assert (out.figures["recompiles"], out.figures["limit"], len(out.figures["guard_failures"])) == (2, 2, 3)
    ctx, _ = context(tmp_path, GPU, writes(recorded.cached_second, log=RECOMPILES + RECOMPILES.splitlines()[0]))
    with pytest.raises(StepFailed, match=r"3 recompiles \(limit 2\): tensor 'x' size mismatch"):
        run_step(steps.step_compile, ctx)
    ctx, _ = context(tmp_path, CPU_SMOKE, writes(recorded.cached_second))
    with pytest.raises(StepSkipped, match="inductor"):
        run_step(steps.step_compile, ctx)


def test_cache_features_computed_then_reused(tmp_path, recorded):
    ctx, _ = context(tmp_path, CPU_SMOKE, by_label(cache_features_1=writes(recorded.cached_first),
                                                   cache_features_2=writes(recorded.cached_second)))
    out = run_step(steps.step_cache, ctx)
    assert out.figures["stored"] == {"test.safetensors": [16, 64], "train.safetensors": [32, 64]}
    assert out.figures["epochs"] == 2
    ctx, _ = context(tmp_path, CPU_SMOKE, by_label(cache_features_1=writes(recorded.cached_first),
                                                   cache_features_2=writes(recorded.cached_first)))
    with pytest.raises(StepFailed, match="second run should have reused .* cached_features='computed'"):
        run_step(steps.step_cache, ctx)


def test_fsdp_needs_sharded_checkpoints_a_resume_and_the_same_weights(tmp_path, recorded):
    sharded = copy_run(recorded.cached_second, tmp_path / "sharded")
    shard = next((sharded / "checkpoints").glob("step-*")) / "sharded" / "shard-00001-model-00001-of-00001.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    ctx, player = context(tmp_path, CPU_SMOKE, writes(sharded, run={"backend": "gloo"}))
    out = run_step(steps.step_fsdp, ctx)
    assert out.figures["shard_files"] == [shard.name] and out.figures["unequal_tensors"] == 0
    assert flag(player.commands["fsdp_resume-A"][0], "--strategy") == "fsdp"
    assert flag(player.commands["fsdp_resume-B2"][0], "--resume") == "auto"
    ctx, _ = context(tmp_path, CPU_SMOKE, writes(recorded.cached_second, run={"backend": "gloo"}))
    with pytest.raises(StepFailed, match="no sharded checkpoint files .* did not shard"):
        run_step(steps.step_fsdp, ctx)


# ---- speed, bench, pytest_cuda ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strong_json(tmp_path_factory) -> dict[str, Any]:
    """The strong loop's rates as `python -m dtl.tools.bench.strong_rate --cases` writes them (CPU, tiny)."""
    import torchvision

    folder = tmp_path_factory.mktemp("strong")
    torch.save(torchvision.models.squeezenet1_1().state_dict(), folder / "squeezenet.pth")
    cases = {label: [*flags, "--weights", str(folder / "squeezenet.pth")] for label, flags in CPU_SMOKE.speed}
    (folder / "cases.json").write_text(json.dumps(cases))
    assert strong_rate.main(["--cases", str(folder / "cases.json"), "--device", "cpu",
                             "--train-subset", "32", "--eval-subset", "16", "--warmup", "0", "--steps", "1",
                             "--json", str(folder / "strong.json")]) == 0
    return json.loads((folder / "strong.json").read_text())


def speed_plays(recorded: Recorded, strong: dict[str, Any], dtl_img_s: float) -> Play:
    """strong_rate writes `strong`; every train.py run leaves 2 epochs at `dtl_img_s`."""
    def play(label: str, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        if label == "speed-strong":
            Path(flag(cmd, "--json")).write_text(json.dumps(strong))
            return 0, ""
        out = copy_run(recorded.cached_second, Path(flag(cmd, "--output-dir")))
        edit_metrics(out, images_per_sec=dtl_img_s)
        return 0, ""
    return play


def test_speed_puts_dtls_epoch_rate_beside_the_strong_loops_step_rate(tmp_path, recorded, strong_json):
    ctx, player = context(tmp_path, CPU_SMOKE, speed_plays(recorded, strong_json, 100.0))
    out = run_step(steps.step_speed, ctx)
    cases = out.figures["cases"]
    assert set(cases) == {"transfer_32px_b16", "finetune_32px_b16", "cached_features"}
    for label in ("transfer_32px_b16", "finetune_32px_b16"):
        assert cases[label]["epoch"] == 2
        assert cases[label]["ratio"] == 100.0 / strong_json[label]["images_per_s"]
    assert "ratio" not in cases["cached_features"] and "goals_missed" not in out.figures  # no goals on a CPU
    assert "--cache-features" in player.commands["speed-cached_features"][0]
    assert "cached_features dtl 100 img/s" in out.summary


def gpu_strong(tflops_per_img_s: float = 1e-3) -> dict[str, Any]:
    return {label: {"images_per_s": 1000.0, "flops_per_image": tflops_per_img_s * 1e12, "tflops": 1.0,
                    "bf16_matmul_tflops": 2.0} for label in SPEED_GOALS}


def test_speed_goals_pass_and_fail_on_the_gpu_profile(tmp_path, recorded):
    ctx, player = context(tmp_path, GPU, speed_plays(recorded, gpu_strong(), 2_000_000.0))
    out = run_step(steps.step_speed, ctx)
    assert out.figures["goals_missed"] == [] and out.figures["bf16_matmul_tflops"] == 2.0
    assert out.figures["cases"]["finetune_224px_b256"]["dtl_fraction_of_bf16_matmul"] == pytest.approx(1000.0)
    assert flag(player.commands["speed-finetune_224px_b64"][0], "--train-subset") == "6400"
    ctx, _ = context(tmp_path, GPU, speed_plays(recorded, gpu_strong(1e-16), 1100.0))
    with pytest.raises(StepFailed, match=r"speed goals missed: transfer_224px_b256 1.10x < 1.2x; cached_features "
                                         r"1100 img/s < 1000000; finetune_224px_b256 0% of the bf16 matmul"):
        run_step(steps.step_speed, ctx)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict[str, Any]:
    """`dtl bench --json` (CPU, tiny, no memory probe)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert cli.main(["bench", *TINY, "--weights", "none", "--train-subset", "32",
                     "--eval-subset", "16", "--steps", "1", "--warmup", "0", "--repeats", "1", "--input-steps", "1",
                     "--memory", "off", "--flops", "--min-seconds", "0", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_bench_reports_both_ratios_per_case(tmp_path, bench_json):
    def play(label: str, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        Path(flag(cmd, "--json")).write_text(json.dumps(bench_json))
        return 0, ""

    ctx, player = context(tmp_path, CPU_SMOKE, play)
    out = run_step(steps.step_bench, ctx)
    assert set(out.figures) == {"squeezenet_transfer_32px", "squeezenet_finetune_32px"}
    train = out.figures["squeezenet_transfer_32px"]["train_step"]
    assert train["ratio_strong"] == pytest.approx(train["dtl_img_s"] / train["strong_img_s"])
    assert train["dtl_tflops"] > 0 and "dtl_fraction_of_bf16_matmul" not in train
    assert out.summary.count("train img/s dtl") == 2
    assert player.commands["bench-squeezenet_transfer_32px"][0][1:4] == ["-m", "dtl.cli", "bench"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest"
errors="0" failures="{failures}" skipped="{skipped}" tests="3" time="1.0">
<testcase classname="tests.unit.test_a" name="test_one" time="0.1">{failure}</testcase>
<testcase classname="tests.unit.test_a" name="test_two" time="0.1"><skipped message="no CUDA" /></testcase>
<testcase classname="tests.unit.test_b" name="test_three" time="0.1"{third}</testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize(("code", "xml", "verdict"), [
    (0, JUNIT.format(failures=0, skipped=1, failure="", third=">"), None),
    (0, JUNIT.format(failures=0, skipped=3, failure="", third="><skipped />"), "all 3 cuda tests skipped"),
    (1, JUNIT.format(failures=1, skipped=1, failure="<failure message='x'>x</failure>", third=">"),
     "1 failed: tests.unit.test_a::test_one"),
    (5, "", "no test carries the cuda marker"),
])
def test_pytest_cuda_reads_pytests_junit_report(tmp_path, code, xml, verdict):
    def play(label: str, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        if xml:
            Path(cmd[-1].split("=", 1)[1]).write_text(xml)
        return code, ""

    ctx, player = context(tmp_path, GPU, play)
    if verdict is None:
        out = run_step(steps.step_pytest, ctx)
        assert (out.figures["passed"], out.figures["skipped"]) == (2, 1)
    else:
        with pytest.raises((StepFailed, StepSkipped), match=verdict):
            run_step(steps.step_pytest, ctx)
    assert player.commands["pytest_cuda"][0][1:5] == ["-m", "pytest", "-m", "cuda"]
