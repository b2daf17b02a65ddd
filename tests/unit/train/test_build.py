"""dtl.train.build's choices that depend on the launch: the strategy (--strategy auto follows accelerate's
config) and whether gradient compression applies."""

from __future__ import annotations

import pytest
import torch

from dtl.config import Config
from dtl.distributed import DistEnv, detect
from dtl.errors import UserError
from dtl.train.build import grad_compression, resolve_strategy, shard_model
from dtl.train.optimisation.precision import Precision

TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "no"}


def test_strategy_auto_follows_an_accelerate_fsdp_config():
    assert detect(environ={**TWO, "ACCELERATE_USE_FSDP": "true"}).accelerate_fsdp
    env = detect(environ={**TWO, "ACCELERATE_USE_FSDP": "true"})
    assert resolve_strategy(Config(), env) == "fsdp"
    assert resolve_strategy(Config(strategy="ddp"), env) == "ddp"  # an explicit choice wins
    assert resolve_strategy(Config(), detect(environ=TWO)) == "ddp"
    with pytest.raises(UserError, match="the accelerate config asks for FSDP, but compile=True"):
        resolve_strategy(Config(compile=True), env)


def test_one_process_neither_shards_nor_compresses():
    assert resolve_strategy(Config(strategy="fsdp"), DistEnv()) == "ddp"
    assert grad_compression(Config(grad_compress="powersgd"), DistEnv()) is None
    two = DistEnv(world_size=2)
    made = grad_compression(Config(grad_compress="powersgd", powersgd_rank=2, powersgd_start_iter=5), two)
    assert made is not None and made.psgd is not None
    assert (made.psgd.matrix_approximation_rank, made.psgd.start_powerSGD_iter) == (2, 5)


def test_cpu_offload_is_refused_on_a_cpu_run():
    """FSDP2's CPUOffloadPolicy pins host memory, which needs CUDA ("Found no NVIDIA driver"), and a CPU run
    has nothing to offload."""
    with pytest.raises(UserError, match="drop --fsdp-cpu-offload"):
        shard_model(Config(strategy="fsdp", fsdp_cpu_offload=True), torch.nn.Linear(2, 2),
                    Precision("fp32", torch.device("cpu")), torch.device("cpu"))
