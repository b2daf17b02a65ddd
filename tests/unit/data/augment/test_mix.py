"""MixUp/CutMix against timm's own `Mixup(mode="batch")` (same draws: the same seed through numpy's legacy
generator), the soft targets, the draw distributions, and the config's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data.mixup import Mixup, mixup_target

from dtl.config import Config, OptimConfig
from dtl.data.augment import mix
from dtl.data.splits import stream_seed
from tests.conftest import TINY, train_inproc

C = 5


def batch(n: int = 6, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 100 + size)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def optim(**kw) -> OptimConfig:
    return Config(**kw).optim


@pytest.mark.parametrize("kw", [{"mixup": 0.2, "cutmix": 1.0, "mix_switch_prob": 0.5, "label_smoothing": 0.1},
                                {"mixup": 0.8}, {"cutmix": 1.0, "mix_prob": 0.7}])
def test_batches_are_timms_mixup_given_the_same_draws(kw):
    cfg = optim(**kw)
    mixer = mix.Mixer(cfg, C, seed=3, rank=1)
    timm = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                 switch_prob=cfg.mix_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing, num_classes=C)
    kinds = set()
    for b in range(40):
        images, labels = batch()
        ours = mixer(images, labels, epoch=2, batch_index=b)
        kinds.add(mixer.draw(2, b, 12, 12).kind)
        np.random.seed(mix.seed_words(stream_seed(3, 2, 1, b, "mix")))  # timm draws from the global stream
        theirs_x, theirs_t = timm(images.clone(), labels)
        assert torch.equal(ours.images, theirs_x), b
        assert torch.equal(ours.targets, theirs_t), b
    wanted = {"mixup", "cutmix"} if cfg.mixup and cfg.cutmix else {"mixup"} if cfg.mixup else {"cutmix", "none"}
    assert wanted <= kinds


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    images, labels = batch(5)  # odd: the middle image pairs with itself
    d = mix.MixDraw("mixup", 0.3)
    torch.testing.assert_close(mix.mix_images(images, d), 0.3 * images + 0.7 * images.flip(0))
    assert torch.equal(mix.mix_images(images, mix.MixDraw("none")), images)


@pytest.mark.parametrize("n", [5, 6])
def test_mixup_in_chunks_is_timms_whole_batch_blend_bitwise(monkeypatch: pytest.MonkeyPatch, n: int):
    """Chunked (here 2 images per chunk, so pairs straddle chunks and an odd middle pairs with itself): bit for bit
    timm's ``x.mul_(lam).add_(x.flip(0).mul_(1 - lam))`` on the whole batch."""
    images = torch.randn(n, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(mix, "CHUNK_VALUES", 2 * images[0].numel())
    lam = 0.3137
    expected = images.clone().mul_(lam).add_(images.flip(0).mul_(1.0 - lam))
    out = mix.mix_images(images, mix.MixDraw("mixup", lam))
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_cutmix_pastes_the_clipped_box_and_corrects_lam_to_its_area():
    cfg = optim(cutmix=1.0)
    clipped = 0
    for b in range(60):
        d = mix.Mixer(cfg, C, 0, 0).draw(0, b, 10, 14)
        y0, y1, x0, x1 = d.box
        assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 14
        assert d.lam == 1 - (y1 - y0) * (x1 - x0) / 140
        images = torch.randn(4, 3, 10, 14)
        out = mix.mix_images(images, d)
        inside = torch.zeros(10, 14, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[..., inside], images.flip(0)[..., inside])
        assert torch.equal(out[..., ~inside], images[..., ~inside])
        clipped += y0 == 0 or x0 == 0 or y1 == 10 or x1 == 14
    assert clipped > 0  # the border clipping (and so the lam correction) was exercised


def test_soft_targets_sum_to_one_and_are_timms():
    labels = torch.tensor([0, 3, 3, 1, 4, 2])
    for lam, smoothing in ((1.0, 0.0), (0.37, 0.0), (0.8, 0.1)):
        t = mix.mix_targets(labels, C, lam, smoothing)
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        assert torch.equal(t, mixup_target(labels, C, lam, smoothing))


def test_train_accuracy_counts_the_dominant_label():
    images, labels = batch(6)
    mixer = mix.Mixer(optim(mixup=0.4), C, 0, 0)
    seen = set()
    for b in range(30):
        d = mixer.draw(0, b, 12, 12)
        out = mixer(images, labels, 0, b)
        assert torch.equal(out.labels, labels if d.lam >= 0.5 else labels.flip(0))
        seen.add(d.lam >= 0.5)
    assert seen == {True, False}


def draws(n: int, **kw) -> list[mix.MixDraw]:
    mixer = mix.Mixer(optim(**kw), C, seed=11, rank=0)
    return [mixer.draw(b // 100, b % 100, 32, 32) for b in range(n)]


def test_lam_is_beta_and_the_mix_and_switch_probabilities_hold():
    found = draws(2000, mixup=0.2, cutmix=1.0, mix_prob=0.7, mix_switch_prob=0.3)
    applied = [d for d in found if d.kind != "none"]
    assert stats.binomtest(len(applied), len(found), 0.7).pvalue > 0.001
    cut = [d for d in applied if d.kind == "cutmix"]
    assert stats.binomtest(len(cut), len(applied), 0.3).pvalue > 0.001
    lams = [d.lam for d in applied if d.kind == "mixup"]
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 0.001
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 0.001  # the test can tell alphas apart
    cut_only = draws(1000, cutmix=0.5)
    assert {d.kind for d in cut_only} == {"cutmix"}


def test_draws_depend_on_the_batch_epoch_and_rank_only():
    cfg = optim(mixup=0.2, cutmix=1.0)
    a, b = mix.Mixer(cfg, C, 0, 0), mix.Mixer(cfg, C, 0, 1)
    assert a.draw(1, 5, 32, 32) == mix.Mixer(cfg, C, 0, 0).draw(1, 5, 32, 32)  # no hidden state: resumable
    assert len({a.draw(e, i, 32, 32) for e in range(3) for i in range(10)} | {b.draw(0, 0, 32, 32)}) == 31


def test_config_checks_and_the_cache_features_refusal(tmp_path, capfd):
    for bad in ({"mixup": -0.1}, {"mix_prob": 1.5}, {"mix_switch_prob": -1}, {"drop_path": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    code = train_inproc(*TINY, "--mode", "transfer", "--weights", str(tmp_path / "none.safetensors"),
                        "--no-augment", "--cache-features", "--mixup", "0.2", "--output-dir", str(tmp_path / "r"))
    assert code == 2
    assert "--cache-features" in capfd.readouterr().err
    assert not (tmp_path / "r").exists()
    assert train_inproc(*TINY, "--model", "vgg16", "--drop-path", "0.1", "--output-dir", str(tmp_path / "v")) == 2
    assert "vgg16 has no stochastic depth; the families that do are convnext" in capfd.readouterr().err
    assert not (tmp_path / "v").exists()
