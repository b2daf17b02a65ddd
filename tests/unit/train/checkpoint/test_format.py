"""dtl.train.checkpoint.format: round trips, partial writes never picked up, pruning, damaged files."""

import json
from pathlib import Path

import pytest
import torch

from dtl.errors import UserError
from dtl.train.checkpoint import format as ckpt


def write(outdir: Path, step: int, best: bool = False, keep_last: int = 2) -> Path:
    model = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3)}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    meta = {"global_step": step, "config": {"model": "resnet18"}, "num_classes": 10, "best_acc": 0.5}
    return ckpt.save_checkpoint(outdir, model_state=model, optim_state=opt.state_dict(),
                                rng={"cpu.rank0": torch.get_rng_state()}, meta=meta, keep_last=keep_last,
                                is_best=best)


def test_roundtrip_and_latest(tmp_path: Path):
    write(tmp_path, 10)
    path = write(tmp_path, 20)
    assert ckpt.latest_checkpoint(tmp_path) == path
    state = ckpt.load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 20.0))
    assert state["meta"]["global_step"] == 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    opt.load_state_dict(state["optim"])
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], torch.ones(2))


def test_partial_writes_are_never_picked_up(tmp_path: Path):
    write(tmp_path, 10)
    stale = tmp_path / "checkpoints" / ".tmp-step-00000020-999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    half = tmp_path / "checkpoints" / "step-00000030"
    half.mkdir()  # no state.json: not complete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000010"


def test_prune_keeps_last_k_and_best(tmp_path: Path):
    write(tmp_path, 1, best=True)
    for step in (2, 3, 4):
        write(tmp_path, step)
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step-00000001", "step-00000003", "step-00000004"]
    assert ckpt.best_or_last(tmp_path).name == "step-00000001"


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_files_are_refused(tmp_path: Path, damage: str):
    path = write(tmp_path, 5)
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(raw[:-7]))
    else:
        raw[-3] ^= 0x10
        f.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="model.safetensors"):
        ckpt.load_checkpoint(path)


def test_format_version_and_compatibility(tmp_path: Path):
    path = write(tmp_path, 5)
    state = json.loads((path / "state.json").read_text())
    with pytest.raises(UserError, match="'resnet18' with 10 classes"):
        ckpt.check_compatible(state, "vgg16", 10, path)
    state["format_version"] = 99
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="format version 99"):
        ckpt.load_checkpoint(path)


def test_no_pickle_anywhere(tmp_path: Path):
    path = write(tmp_path, 5)
    for f in path.iterdir():
        assert f.suffix in (".safetensors", ".json")
