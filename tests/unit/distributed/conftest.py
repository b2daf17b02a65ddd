"""A process group of one (gloo, in this process) for the tests of what runs inside one: DDP's hooks, FSDP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from tests.conftest import free_port


@pytest.fixture
def world_of_one() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
