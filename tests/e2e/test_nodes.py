"""Two nodes on one machine (`tests.e2e.nodes`: two torchrun agents, `--nnodes 2`), each with its own output
folder, data path, torch cache and TMPDIR, and a fault on node 1: missing data, a corrupt weights file, an
exception at step N, the worker killed with SIGKILL mid-epoch. In every case each node's log names the failing
rank, its host and its message, every process ends within 60 s, and no half-written file is left."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tests.conftest import fault_env
from tests.e2e.nodes import run_nodes

HOST = socket.gethostname()
#: squeezenet1_1 from given weights, 32 px, a few steps per epoch (96 images / 2 ranks / batch 16 = 3 steps)
RUN = ["--dataset", "cifar10", "--no-download", "--image-size", "32", "--device", "cpu", "--batch-size", "16",
       "--model", "squeezenet1_1", "--mode", "finetune", "--epochs", "2", "--train-subset", "96",
       "--eval-subset", "32", "--log-every", "1", "--dist-timeout", "60"]


@pytest.fixture(scope="module")
def node_inputs(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> dict[str, Path]:
    """What each node reads, in folders of its own: a data folder and a weights file per node, plus a corrupt
    weights file (the first 100 bytes of a good one) and a data path that does not exist."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    good = {k: v.contiguous() for k, v in torchvision.models.squeezenet1_1().state_dict().items()}
    out: dict[str, Path] = {}
    for node in (0, 1):
        shutil.copytree(synth_dir, root / f"data{node}")
        save_file(good, str(root / f"weights{node}.safetensors"))
        out[f"data{node}"], out[f"weights{node}"] = root / f"data{node}", root / f"weights{node}.safetensors"
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(out["weights1"].read_bytes()[:100])
    out["corrupt"], out["missing"] = corrupt, root / "no-such-data"
    return out


def node_args(tmp_path: Path, inputs: dict[str, Path], node: int, **override: Path) -> list[str]:
    data, weights = override.get("data", inputs[f"data{node}"]), override.get("weights", inputs[f"weights{node}"])
    return [*RUN, "--data-dir", str(data), "--weights", str(weights), "--output-dir", str(tmp_path / f"out{node}")]


def half_written(folder: Path) -> list[Path]:
    """Temporary files of an interrupted write (atomic_files and the checkpointer write `.NAME.tmpPID` /
    `*.tmp*` and rename them into place)."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name and p.parent.name != "tmp"]


#: fault name -> (node 1's overrides, node 1's extra environment, what the failing rank says, exit code)
FAULTS = {
    "missing data": ({"data": "missing"}, {}, "no-such-data", 2),
    "corrupt weights": ({"weights": "corrupt"}, {}, "could not be read as weights", 2),
    "exception at step 3": ({}, fault_env(3, "raise"), "RuntimeError: injected fault", 1),
    "SIGKILL mid-epoch": ({}, fault_env(3, "kill"), None, 1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_on_node_1_is_named_on_both_nodes(tmp_path, node_inputs, fault):
    overrides, env1, message, code = FAULTS[fault]
    args = [node_args(tmp_path, node_inputs, 0),
            node_args(tmp_path, node_inputs, 1, **{k: node_inputs[v] for k, v in overrides.items()})]
    envs = [{"TORCH_HOME": str(tmp_path / f"node{n}" / "torch_home")} for n in (0, 1)]
    envs[1].update(env1)
    node0, node1 = run_nodes(tmp_path, args, envs, timeout=150)
    logs = f"--- node 0\n{node0.log[-3000:]}\n--- node 1\n{node1.log[-3000:]}"
    assert node0.returncode not in (0, -9) and node1.returncode not in (0, -9), logs
    assert max(node0.seconds, node1.seconds) < 60 + 30, logs  # 60 s for the job, 30 s for two interpreters
    if message is not None:
        # the failing rank says it itself, tagged with its rank and host ...
        own = [s for s in node1.log.splitlines() if s.split("] ", 1)[0].endswith(f"[rank 1 on {HOST}")]
        assert any(message in s for s in own), logs
        # ... and the other node names the rank, the host and the message, once
        line = f"rank 1 ({HOST}) failed: "
        said = [s for s in node0.log.splitlines() if line in s]
        assert len(said) == 1 and message in said[0], logs
        assert f"exitcode: {code}" in node1.log or f"exitcode  : {code}" in node1.log, logs
    else:  # nothing left a message: node 1's launcher names the signal, node 0 the silent rank and its host
        assert "Signal 9 (SIGKILL)" in node1.log, logs
        said = [s for s in node0.log.splitlines() if f"rank 1 ({HOST}) failed: ended without a message" in s]
        assert len(said) == 1, logs
    assert "[rank0]: Traceback" not in node0.log, logs  # the survivor says one line, not a traceback
    assert not half_written(tmp_path), half_written(tmp_path)
