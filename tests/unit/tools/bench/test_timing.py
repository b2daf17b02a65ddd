"""`dtl.tools.bench.timing`: how long a measurement runs (no timing in tests: the measured time is faked)."""

from __future__ import annotations

import pytest
import torch

from dtl.tools.bench import timing
from dtl.tools.bench.settings import Options


def test_calibration_stretches_a_measurement_to_the_minimum_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps are decided from one timed measurement (its time faked here: no timing in tests)."""
    monkeypatch.setattr(timing, "timed_run", lambda loop, fn, steps: (8 * steps, 0.01 * steps))
    assert timing.calibrated_steps(None, None, 5, 2.0) == 200  # 10 ms a step -> 200 steps for 2 s
    assert timing.calibrated_steps(None, None, 500, 2.0) == 500  # already long enough
    assert timing.calibrated_steps(None, None, 5, 0.0) == 5
    monkeypatch.setattr(timing, "timed_run", lambda loop, fn, steps: (8 * steps, 0.0))
    assert timing.calibrated_steps(None, None, 5, 2.0) == timing.MAX_STEPS
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert timing.min_seconds(gpu, "train_step") == timing.min_seconds(gpu, "input") == timing.MIN_SECONDS_GPU
    assert timing.min_seconds(cpu, "train_step") == 0 and timing.min_seconds(cpu, "input_augment") > 0
    assert timing.min_seconds(cpu, "input", Options(min_seconds=0.0).min_seconds) == 0
