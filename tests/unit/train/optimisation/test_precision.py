"""dtl.train.optimisation.precision: which precision a run uses, and why."""

from __future__ import annotations

import os

import pytest
import torch

from dtl import distributed
from dtl.train.optimisation import precision
from tests.conftest import TINY, train_inproc


@pytest.mark.parametrize("hardware_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_ignores_emulated_bf16(monkeypatch, hardware_bf16, expected):
    # V100/T4: is_bf16_supported() is True by default (emulation), False with including_emulation=False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or hardware_bf16)
    cuda = torch.device("cuda", 0)
    assert precision.resolve("auto", distributed.DistEnv(), cuda).name == expected


def test_accelerate_default_no_is_auto_and_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    no = distributed.DistEnv(accelerate_mixed_precision="no")
    chosen = precision.resolve("auto", no, cuda)
    assert chosen.name == "bf16" and "not a choice" in chosen.source, chosen.source
    assert precision.resolve("auto", no, cpu).name == "fp32"
    fp16 = distributed.DistEnv(accelerate_mixed_precision="fp16")
    assert precision.resolve("auto", fp16, cuda).name == "fp16"
    chosen = precision.resolve("fp32", fp16, cuda)
    assert (chosen.name, chosen.source) == ("fp32", "--precision flag")


def test_deterministic_flag_sets_strict_mode_and_cublas_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert train_inproc(*TINY, "--deterministic", "--train-subset", "32", "--eval-subset", "16",
                            "--epochs", "1", "--output-dir", str(tmp_path / "run")) == 0
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
