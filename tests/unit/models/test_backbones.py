import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from dtl import models
from dtl.config import Config
from dtl.errors import UserError
from tests.conftest import TINY, train_inproc


def names(model):
    return [k for k, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def vgg16():
    return models.build_model("vgg16", 10, "none", 32)


def test_transfer_trains_exactly_the_new_head_weight_and_bias(vgg16):
    # The reference script misspelled "classifier.6.baias", so its head bias never trained.
    assert models.freeze(vgg16, "vgg16", "transfer", None) == ["classifier.6.weight", "classifier.6.bias"]
    assert vgg16.classifier[6].out_features == 10


def test_finetune_last_block_and_scratch(vgg16):
    assert models.freeze(vgg16, "vgg16", "finetune", 1) == [
        "classifier.3.weight", "classifier.3.bias", "classifier.6.weight", "classifier.6.bias"]
    three = models.freeze(vgg16, "vgg16", "finetune", 3)
    assert three[:2] == ["features.28.weight", "features.28.bias"] and len(three) == 8
    everything = [k for k, _ in vgg16.named_parameters()]
    assert models.freeze(vgg16, "vgg16", "finetune", None) == everything
    assert models.freeze(vgg16, "vgg16", "scratch", None) == everything
    with pytest.raises(UserError, match="blocks"):
        models.freeze(vgg16, "vgg16", "finetune", 99)


# one model of each family the foundation issue lists, with its head and the last block's first parameter
FAMILIES = {
    "vgg16": ("classifier.6", "classifier.3.weight"),
    "alexnet": ("classifier.6", "classifier.4.weight"),
    "resnet18": ("fc", "layer4.1.conv1.weight"),
    "googlenet": ("fc", "inception5b.branch1.conv.weight"),
    "regnet_y_400mf": ("fc", "trunk_output.block4.block4-5.f.a.0.weight"),
    "efficientnet_b0": ("classifier.1", "features.8.0.weight"),
    "mobilenet_v3_small": ("classifier.3", "classifier.0.weight"),
    "convnext_tiny": ("classifier.2", "classifier.0.weight"),
    "vit_b_16": ("heads.head", "encoder.ln.weight"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_head_replacement_and_last_block_per_family(name):
    head, last_block_param = FAMILIES[name]
    size = 224 if name.startswith("vit") else 64
    model = models.skeleton(name, size)
    assert models.replace_head(model, 7) == head
    layer = model.get_submodule(head)
    assert layer.out_features == 7
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, size, size, device=layer.weight.device))
    assert out.shape == (2, 7)
    trainable = models.freeze(model, name, "finetune", 1)
    assert trainable[0] == last_block_param and trainable[-2:] == [f"{head}.weight", f"{head}.bias"]
    assert models.freeze(model, name, "transfer", None) == [f"{head}.weight", f"{head}.bias"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(UserError, match="vgg16"):
        models.check_model_name("vgg61")


def test_image_size_too_small_is_refused():
    with pytest.raises(UserError, match="too small"):
        models.check_image_size("vgg16", 16, pretrained=False)
    with pytest.raises(UserError, match="224"):
        models.check_image_size("vit_b_16", 32, pretrained=True)


def test_imagenet_weights_come_from_torchvisions_cache(fake_vgg16_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(fake_vgg16_home))
    model = models.build_model("vgg16", 10, "imagenet", 32)
    cached = torch.load(next((fake_vgg16_home / "hub" / "checkpoints").iterdir()), weights_only=True)
    assert torch.equal(model.features[0].weight, cached["features.0.weight"])
    assert model.classifier[6].out_features == 10


def test_imagenet_weights_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(UserError) as err:
        models.build_model("resnet18", 10, "imagenet", 32)
    assert "resnet18-f37072fd.pth" in str(err.value)
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints") in str(err.value)


def test_weight_files_safetensors_pth_and_bad_ones(tmp_path):
    src = torchvision.models.resnet18(num_classes=10)
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(st))
    torch.save(src.state_dict(), pth)
    for path in (st, pth):
        model = models.build_model("resnet18", 10, str(path), 32, keep_head=True)
        assert torch.equal(model.fc.weight, src.fc.weight)
        assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        models.build_model("resnet18", 10, str(corrupt), 32)
    wrong = tmp_path / "wrong.pth"
    state = src.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    torch.save(state, wrong)
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight"):
        models.build_model("resnet18", 10, str(wrong), 32)


def fresh_linear(seed: int, inputs: int, outputs: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, outputs)


def test_a_same_shape_head_in_a_weight_file_is_replaced_by_a_fresh_one(tmp_path, caplog):
    """A file of another 5-class task must not hand its classifier to this 5-class task."""
    torch.manual_seed(1)
    src = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "other_task.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with caplog.at_level("INFO", logger="dtl"):
        model = models.build_model("resnet18", 5, str(path), 32, head_seed=3)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)  # the backbone is the file's
    assert not torch.equal(model.fc.weight, src.fc.weight)
    expected = fresh_linear(3, 512, 5)
    assert torch.equal(model.fc.weight, expected.weight) and torch.equal(model.fc.bias, expected.bias)
    assert "new head: Linear(512, 5) (fc), initialised with seed 3" in caplog.text

    kept = models.build_model("resnet18", 5, str(path), 32, keep_head=True, head_seed=3)
    assert torch.equal(kept.fc.weight, src.fc.weight) and torch.equal(kept.fc.bias, src.fc.bias)
    with pytest.raises(UserError, match="has 5 outputs but the data set has 7 classes; drop --keep-head"):
        models.build_model("resnet18", 7, str(path), 32, keep_head=True)
    # another class count without --keep-head: the backbone loads, the head is new
    seven = models.build_model("resnet18", 7, str(path), 32, head_seed=3)
    assert seven.fc.out_features == 7 and torch.equal(seven.conv1.weight, src.conv1.weight)


def test_a_backbone_only_file_gets_a_new_head_and_refuses_keep_head(tmp_path):
    src = torchvision.models.resnet18()
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("fc.")}, str(path))
    model = models.build_model("resnet18", 4, str(path), 32, head_seed=0)
    assert torch.equal(model.fc.weight, fresh_linear(0, 512, 4).weight)
    with pytest.raises(UserError, match=r"no head \(fc.weight\) to keep"):
        models.build_model("resnet18", 4, str(path), 32, keep_head=True)


def test_imagenet_weights_get_a_new_head_even_with_1000_classes(fake_vgg16_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(fake_vgg16_home))
    cached = torch.load(next((fake_vgg16_home / "hub" / "checkpoints").iterdir()), weights_only=True)
    model = models.build_model("vgg16", 1000, "imagenet", 32, head_seed=0)
    assert not torch.equal(model.classifier[6].weight, cached["classifier.6.weight"])
    kept = models.build_model("vgg16", 1000, "imagenet", 32, keep_head=True)
    assert torch.equal(kept.classifier[6].weight, cached["classifier.6.weight"])
    with pytest.raises(UserError, match="has 1000 outputs but the data set has 10 classes"):
        models.build_model("vgg16", 10, "imagenet", 32, keep_head=True)


@pytest.mark.parametrize("keep", [False, True])
def test_training_starts_from_a_fresh_head_unless_kept(tmp_path, keep):
    """Through train.py: one step at lr 1e-12 leaves the starting head in model.safetensors."""
    torch.manual_seed(1)
    src = torchvision.models.resnet18(num_classes=10)  # the synthetic set has 10 classes
    path = tmp_path / "other_task.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out = tmp_path / "run"
    flags = ["--keep-head"] if keep else []
    assert train_inproc(*TINY, "--model", "resnet18", "--mode", "transfer", "--weights", str(path), "--epochs", "1",
                        "--train-subset", "16", "--eval-subset", "16", "--lr", "1e-12", "--weight-decay", "0",
                        "--seed", "4", *flags, "--output-dir", str(out)) == 0
    final = load_file(str(out / "model.safetensors"))
    expected = src.fc if keep else fresh_linear(4, 512, 10)
    torch.testing.assert_close(final["fc.weight"], expected.weight.detach(), atol=1e-7, rtol=0)
    torch.testing.assert_close(final["fc.bias"], expected.bias.detach(), atol=1e-7, rtol=0)
    if not keep:
        assert (final["fc.weight"] - src.fc.weight).abs().max() > 1e-2
    assert json.loads((out / "config.json").read_text())["config"]["keep_head"] is keep


def test_keep_head_without_weights_is_a_config_error():
    with pytest.raises(ValueError, match="keep_head=True .* weights='none'"):
        Config(mode="scratch", keep_head=True)


def test_pickled_code_in_a_pth_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"fc.weight": Evil()}))
    with pytest.raises(UserError, match="pickled code is refused"):
        models.build_model("resnet18", 10, str(bad), 32)
    assert not marker.exists()


def test_frozen_batchnorm_stays_in_eval_mode():
    model = models.build_model("resnet18", 10, "none", 32)
    models.freeze(model, "resnet18", "finetune", 1)
    model.train()
    models.freeze_frozen_norms(model)
    assert not model.bn1.training and model.layer4[1].bn1.training


def test_weights_by_torchvision_enum_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="resnet50-11ad3fa6.pth"):  # IMAGENET1K_V2's file, not V1's
        models.build_model("resnet50", 10, "IMAGENET1K_V2", 32)
    with pytest.raises(UserError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        models.build_model("resnet50", 10, "IMAGENET9K", 32)


@pytest.mark.parametrize("size_in, size_out", [(7, 7), (14, 7), (1, 7), (8, 1), (5, (1, 1))])
def test_deterministic_pooling_matches_adaptive_pooling(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, requires_grad=True)
    ref = nn.AdaptiveAvgPool2d(size_out)(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = models.DeterministicAdaptiveAvgPool2d(size_out)(x)
    (g_out,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)


def test_deterministic_pooling_swaps_classifier_pools_and_keeps_state_dict():
    for name in ("vgg16", "resnet18"):
        net = models.skeleton(name)
        keys = list(net.state_dict())
        assert models.deterministic_pooling(net) == 1
        assert list(net.state_dict()) == keys
        wrapped = {id(m.pool) for m in net.modules() if isinstance(m, models.DeterministicAdaptiveAvgPool2d)}
        assert all(id(m) in wrapped for m in net.modules() if type(m) is nn.AdaptiveAvgPool2d)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_deterministic_backward_through_swapped_pooling_is_bitwise():
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            net = torchvision.models.resnet18(num_classes=10).cuda()
            models.deterministic_pooling(net)
            torch.manual_seed(1)
            x = torch.randn(8, 3, 32, 32, device="cuda")
            net(x).sum().backward()  # without the swap: adaptive_avg_pool2d_backward_cuda raises here
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_graph_reaches_frozen_parameters():
    model = models.build_model("vgg11", 10, "none", 32)
    models.freeze(model, "vgg11", "transfer", None)
    models.run_prefix_without_grad(model, "classifier.6")
    seen = []
    model.classifier[5].register_forward_hook(lambda m, a, out: seen.append(out))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen[0].grad_fn is None and not seen[0].requires_grad  # the head's input: no graph behind it
    assert out.grad_fn is not None and torch.is_grad_enabled()  # the head itself does build one
    out.sum().backward()
    frozen = [p for n, p in model.named_parameters() if not n.startswith("classifier.6")]
    assert all(p.grad is None for p in frozen)
    assert model.classifier[6].weight.grad is not None


PEAK = """
import torch
from dtl import models
torch.manual_seed(0)
model = models.build_model("vgg11", 10, "none", 64)
models.freeze(model, "vgg11", MODE, None)
if MODE == "transfer":
    models.run_prefix_without_grad(model, "classifier.6")
x = torch.randn(32, 3, 64, 64)
saved = []
def pack(t):
    saved.append(t.numel() * t.element_size())
    return t
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1])
base = rss("VmRSS:")
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    model(x).sum().backward()
print(rss("VmHWM:") - base, sum(saved))
"""


def peak(mode: str) -> tuple[int, int]:
    """(peak RSS increase in KiB during one step, bytes autograd saved for backward)."""
    out = subprocess.run([sys.executable, "-c", PEAK.replace("MODE", repr(mode))], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    return int(out[0]), int(out[1])


def test_transfer_step_peaks_below_finetune_step():
    (rss_t, saved_t), (rss_f, saved_f) = peak("transfer"), peak("finetune")
    assert saved_t <= 32 * 4096 * 4 * 2  # only the head's input (and its dropout mask) is kept
    assert saved_f > 50 * saved_t
    assert rss_t < rss_f, (rss_t, rss_f)


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0"])
def test_drop_path_changes_training_outputs_not_eval_outputs_nor_the_state_dict(name):
    """torchvision's ViT has no stochastic depth (dropout/attention dropout only): EfficientNet is the second
    family here."""
    torch.manual_seed(0)
    off = models.build_model(name, 10, "none", 32, drop_path=0.0)
    on = models.build_model(name, 10, "none", 32, drop_path=0.1)
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in on.state_dict().items()}
    on.load_state_dict(off.state_dict())  # pretrained weights still load
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(off.eval()(x), on.eval()(x))  # first: a train-mode pass moves BatchNorm statistics
        torch.manual_seed(1)
        a = off.train()(x)
        torch.manual_seed(1)
        b = on.train()(x)
        assert not torch.equal(a, b)
    rates = [m.p for m in on.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert max(rates) <= 0.1 and max(rates) > 0.05 and min(rates) == 0.0


def test_drop_path_rescales_swins_fixed_schedule_and_is_refused_without_stochastic_depth():
    rates = [m.p for m in models.build_model("swin_t", 10, "none", 32, drop_path=0.3).modules()
             if isinstance(m, torchvision.ops.StochasticDepth)]
    assert max(rates) == pytest.approx(0.3) and rates == sorted(rates) and rates[0] == 0.0
    for name in ("vgg16", "resnet18", "vit_b_16"):
        with pytest.raises(UserError, match=f"{name} has no stochastic depth.*convnext, efficientnet"):
            models.build_model(name, 10, "none", 32, drop_path=0.1)
    assert models.build_model("vgg11", 10, "none", 32, drop_path=0.0) is not None  # 0: nothing to turn off
