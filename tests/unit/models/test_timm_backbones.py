"""timm backbones: names, heads, blocks, weights (tags, files, offline), preprocessing, cached features."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torchvision.io import write_png
from torchvision.transforms.v2.functional import center_crop, resize

from dtl import models
from dtl.config import Config
from dtl.errors import UserError
from dtl.models import timm_backbones
from dtl.train.build import preprocessing_of
from tests.conftest import TINY, main_inproc, run_cli, train_inproc

SMALL = [*TINY, "--epochs", "1", "--train-subset", "32", "--eval-subset", "16"]


def test_vit_and_convnext_heads_and_blocks():
    vit = models.build_model("timm/test_vit", 5, "none", 32)
    assert models.head_name(vit) == "head" and vit.head.out_features == 5
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 5)  # built for --image-size (img_size kwarg)
    blocks = models.backbone_blocks(vit, "timm/test_vit")
    assert blocks[0] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert blocks[1] == ["blocks.0"] and "norm.weight" in blocks[-1]
    assert all(not k.startswith("head") for b in blocks for k in b)

    cnx = models.build_model("timm/test_convnext", 3, "none", 32)
    assert models.head_name(cnx) == "head.fc" and cnx.head.fc.out_features == 3
    trainable = models.freeze(cnx, "timm/test_convnext", "finetune", 1)
    assert trainable == ["head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"]
    assert models.freeze(cnx, "timm/test_convnext", "transfer", None) == ["head.fc.weight", "head.fc.bias"]


def test_transfer_runs_the_backbone_without_grad_up_to_head_fc():
    cnx = models.build_model("timm/test_convnext", 3, "none", 32)
    models.freeze(cnx, "timm/test_convnext", "transfer", None)
    seen = []
    cnx.head.norm.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    models.run_prefix_without_grad(cnx, models.head_name(cnx))
    out = cnx(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert seen == [False] and out.requires_grad  # no graph through the frozen norm, the head's is built
    assert cnx.head.fc.weight.grad is not None and torch.is_grad_enabled()


def test_names_tags_and_missing_timm(monkeypatch):
    with pytest.raises(UserError, match="did you mean timm/convnext_tiny"):
        timm_backbones.check_name("timm/convnext_tinyy")
    with pytest.raises(UserError, match="--weights fb_in1k"):
        timm_backbones.check_name("timm/convnext_tiny.fb_in1k")
    with pytest.raises(UserError, match="no such pretrained tag .*d2_in1k"):
        timm_backbones.create("timm/convnext_atto", "nope", 32, True)
    assert timm_backbones._tagged("timm/convnext_atto", "d2_in1k") == "convnext_atto.d2_in1k"
    assert timm_backbones._tagged("timm/convnext_atto", "imagenet") == "convnext_atto"
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"pip install 'dtl\[timm\]'"):
        models.build_model("timm/test_vit", 5, "none", 32)


def test_preprocessing_comes_from_pretrained_cfg():
    vit = models.preprocessing("timm/vit_base_patch16_224", "imagenet")
    assert (vit.mean, vit.std, vit.interpolation) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert models.preprocessing("vgg16", "imagenet").mean == (0.485, 0.456, 0.406)
    assert vit.for_pipeline("device").interpolation == "bilinear" and vit.for_pipeline("workers") == vit


def test_a_pretrained_tag_brings_its_own_preprocessing():
    """The tag's pretrained_cfg, read from timm's registry (no download), is what the run records and feeds."""
    name = "timm/mobilenetv3_large_100"
    tagged = models.preprocessing(name, "miil_in21k_ft_in1k")
    assert (tagged.mean, tagged.std, tagged.interpolation) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    default = models.preprocessing(name, "imagenet")
    assert (default.mean, default.interpolation) == ((0.485, 0.456, 0.406), "bicubic")
    assert models.preprocessing(name, "none") == default
    cfg = Config(model=name, weights="miil_in21k_ft_in1k", data_pipeline="workers")
    assert preprocessing_of(cfg) == tagged  # config.json's record, which eval, predict and export read


def test_models_lists_timm_with_parameter_counts(capsys):
    assert main_inproc("models", "--source", "timm", "--filter", "convnext_atto") == 0
    out = capsys.readouterr().out
    assert "timm/convnext_atto " in out and "3,695,520" in out and "d2_in1k" in out


def test_weights_file_trains_and_eval_uses_the_recorded_normalisation(tmp_path, capsys):
    """--weights FILE (an ImageNet-shaped timm state dict), transfer mode; dtl eval reproduces the run's own
    test accuracy, which needs the run's (0.5/0.5) normalisation."""
    torch.manual_seed(0)
    weights = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("test_convnext").state_dict(), str(weights))
    out = tmp_path / "run"
    assert train_inproc(*SMALL, "--model", "timm/test_convnext", "--mode", "transfer", "--weights", str(weights),
                        "--output-dir", str(out)) == 0
    run = json.loads((out / "config.json").read_text())["run"]
    assert run["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    assert "timm" in run["versions"]
    final, start = load_file(str(out / "model.safetensors")), load_file(str(weights))
    assert torch.equal(final["stem.0.weight"], start["stem.0.weight"])  # frozen backbone
    assert final["head.fc.weight"].shape == (10, 64)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main_inproc("eval", "--checkpoint", str(out), "--device", "cpu") == 0
    summary = json.loads(next((out / "eval").glob("*/summary.json")).read_text())
    assert (summary["top1"], summary["loss"]) == pytest.approx((last["test_acc"], last["test_loss"]), rel=1e-5)
    # dtl predict normalises with the model's 0.5/0.5 too
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    write_png(image, str(tmp_path / "x.png"))
    assert main_inproc("predict", "--checkpoint", str(out), str(tmp_path / "x.png"), "--top-k", "1",
                       "--output", str(tmp_path / "p.jsonl"), "--device", "cpu") == 0
    model = models.build_model("timm/test_convnext", 10, "none", 32).eval()
    model.load_state_dict(final)
    x = (center_crop(resize(image, [32], antialias=True), [32]).float() / 255 - 0.5) / 0.5
    expected = torch.softmax(model(x[None]), 1).max().item()
    assert json.loads((tmp_path / "p.jsonl").read_text())["probability"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("keep", [False, True])
def test_a_same_shape_timm_head_starts_fresh_unless_kept(tmp_path, keep):
    """timm too: the file's 10-class head (as many classes as the data) is reset after loading."""
    torch.manual_seed(0)
    weights = tmp_path / "other_task.safetensors"
    src = timm.create_model("test_convnext", num_classes=10)
    save_file(src.state_dict(), str(weights))
    out = tmp_path / "run"
    flags = ["--keep-head"] if keep else []
    assert train_inproc(*SMALL, "--model", "timm/test_convnext", "--mode", "finetune", "--weights", str(weights),
                        "--lr", "1e-12", "--weight-decay", "0", "--seed", "4", *flags, "--output-dir", str(out)) == 0
    head = load_file(str(out / "model.safetensors"))["head.fc.weight"]
    fresh = timm.create_model("test_convnext", num_classes=10)
    torch.manual_seed(4)
    fresh.reset_classifier(10)
    expected = src if keep else fresh
    torch.testing.assert_close(head, expected.head.fc.weight.detach(), atol=1e-7, rtol=0)  # one step at lr 1e-12
    if not keep:
        assert (head - src.head.fc.weight).abs().max() > 1e-3
    assert json.loads((out / "config.json").read_text())["config"]["keep_head"] is keep


def test_a_weight_file_at_another_resolution_is_resampled(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit160.safetensors"
    state = timm.create_model("test_vit").state_dict()  # 160 px: 100 patches + the class token
    save_file(state, str(path))
    model = models.build_model("timm/test_vit", 4, str(path), 32)
    assert model.pos_embed.shape == (1, 5, 64) and state["pos_embed"].shape == (1, 101, 64)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_cached_features_match_the_uncached_run(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", img_size=32).state_dict(), str(weights))
    flags = [*SMALL, "--model", "timm/test_vit", "--mode", "transfer", "--weights", str(weights), "--no-augment",
             "--dropout", "0"]
    assert train_inproc(*flags, "--output-dir", str(tmp_path / "plain")) == 0
    assert train_inproc(*flags, "--cache-features", "--output-dir", str(tmp_path / "cached")) == 0
    plain, cached = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("plain", "cached"))
    assert torch.allclose(plain["head.weight"], cached["head.weight"], atol=1e-5)


def test_offline_pretrained_missing_is_one_message(tmp_path):
    res = run_cli("train", *SMALL, "--model", "timm/test_vit", "--mode", "transfer", "--output-dir",
                  str(tmp_path / "run"), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "could not get the pretrained weights of timm/test_vit" in res.stderr
    assert "huggingface-cli download timm/test_vit.r160_in1k" in res.stderr and str(tmp_path / "hf") in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_imagenet_weights_come_from_the_hub_cache_offline(tmp_path):
    """--weights imagenet = timm's default tag, read offline from $HF_HOME/hub; test_vit's 160 px position
    embeddings are resampled for --image-size 32."""
    torch.manual_seed(0)
    pretrained = timm.create_model("test_vit").state_dict()
    repo = tmp_path / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(pretrained, str(repo / "snapshots" / revision / "model.safetensors"))
    out = tmp_path / "run"
    res = run_cli("train", *SMALL, "--model", "timm/test_vit", "--mode", "transfer", "--output-dir", str(out),
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 0, res.stderr[-2000:]
    final = load_file(str(out / "model.safetensors"))
    assert torch.equal(final["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert final["pos_embed"].shape == (1, 5, 64) and pretrained["pos_embed"].shape != final["pos_embed"].shape


def test_drop_path_reaches_timm_as_drop_path_rate():
    """--drop-path on a timm model is timm's own `drop_path_rate`: training outputs vary, eval outputs do not."""
    from timm.layers import DropPath

    model = models.build_model("timm/test_convnext", 3, "none", 32, drop_path=0.5)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = models.build_model("timm/test_convnext", 3, "none", 32)
    assert plain.state_dict().keys() == model.state_dict().keys()
