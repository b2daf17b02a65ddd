"""dtl.distributed.fsdp in a world of one (gloo): which modules a block shards, and the sharded state through
torch.distributed.checkpoint's safetensors files and back."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dtl import models
from dtl.distributed import fsdp


def test_a_blocks_parameter_names_shard_their_owning_modules():
    model = models.build_model("timm/test_vit", 10, "none", 32)
    blocks = models.backbone_blocks(model, "timm/test_vit")
    first = fsdp._block_modules(model, blocks[0])  # cls_token, pos_embed (the root's own) and patch_embed.proj
    assert first == [model.patch_embed.proj]
    last = fsdp._block_modules(model, blocks[-1])  # blocks.5's parameters one by one, and the final norm
    assert model.norm in last and model.blocks[5].attn.qkv in last and model.blocks[5] not in last


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_sharded_state_saves_and_loads_through_safetensors_shards(world_of_one, tmp_path):
    model = fsdp.shard(_net(), [["0"], ["2"]], None, None, cpu_offload=False)
    assert fsdp.is_sharded(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.arange(5) % 4).backward()
    opt.step()
    flat, groups = fsdp.sharded_state(model, opt)
    saved = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in flat.items()}
    fsdp.save(flat, tmp_path / "sharded")
    assert [p.suffix for p in (tmp_path / "sharded").iterdir()] == [".safetensors"]  # no pickle
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    again, _ = fsdp.sharded_state(model, opt)
    fsdp.load(again, tmp_path / "sharded")
    fsdp.load_sharded_state(model, opt, again, groups)
    now, _ = fsdp.sharded_state(model, opt)
    for key, value in saved.items():
        got = now[key].full_tensor() if hasattr(now[key], "full_tensor") else now[key]
        assert torch.equal(got, value), key
    full = fsdp.full_state_dict(model)
    assert set(full) == set(_net().state_dict()) and all(type(t) is torch.Tensor for t in full.values())


def _reshards_after_forward(module: nn.Module) -> bool:
    # FSDP2 has no public getter; its param group's post-forward mesh is None when it keeps the parameters
    # gathered after forward (private, checked against torch 2.14.1; a world of one all-gathers nothing to count)
    return module._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None


def test_evaluation_leaves_the_roots_reshard_setting_as_it_was(world_of_one):
    model = fsdp.shard(_net(), [["0"]], None, None, cpu_offload=False)  # the root holds the head
    nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.arange(5) % 4).backward()
    before = [_reshards_after_forward(m) for m in (model, model[0])]
    assert before == [False, True]  # the root keeps its parameters for backward; the block reshards
    with fsdp.gathered(model), torch.no_grad():
        model(torch.randn(3, 8))
    assert [_reshards_after_forward(m) for m in (model, model[0])] == before


def test_buffers_are_broadcast_once_per_dtype(world_of_one, monkeypatch):
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(6), nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, b in enumerate(model.buffers()):
            b.add_(i + 1)
    expected = [b.clone() for b in model.buffers()]
    sent = []
    original = dist.broadcast
    monkeypatch.setattr(dist, "broadcast", lambda t, src: (sent.append(t.dtype), original(t, src))[1])
    fsdp.sync_buffers(model)
    assert sorted(map(str, sent)) == ["torch.float32", "torch.int64"]  # 9 buffers, 2 broadcasts
    assert all(torch.equal(b, e) for b, e in zip(model.buffers(), expected))
