"""The reference side of `dtl bench`'s extra input phases (`dtl.tools.bench.input_phases`): torchvision v2."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from dtl.tools.bench import input_phases, settings
from tests.unit.tools.bench.test_side_by_side import TINY, bench_args


def test_the_v2_reference_mixes_like_timm_batch_mode():
    """The reference side's collate: v2 MixUp/CutMix chosen like timm's switch, applied with --mix-prob; off
    when mixing is off."""
    cfg = settings.bench_config(bench_args([*TINY, "--mixup", "0.2", "--cutmix", "1.0", "--mix-switch-prob", "0.25",
                                         "--mix-prob", "0.8"]))
    t = input_phases.v2_mix_transform(cfg, 10)
    assert isinstance(t, v2.RandomApply) and t.p == 0.8
    choice = t.transforms[0]
    assert [type(c).__name__ for c in choice.transforms] == ["MixUp", "CutMix"] and choice.p == [0.75, 0.25]
    assert input_phases.v2_mix_transform(settings.bench_config(bench_args([*TINY])), 10) is None
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    # mixing every batch (--mix-prob 1): the check does not depend on the global random state
    always = settings.bench_config(bench_args([*TINY, "--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "1.0"]))
    collate = input_phases._MixCollate(input_phases.v2_mix_transform(always, 10))
    x, y = collate(list(zip(images, labels)))
    assert x.shape == images.shape and y.shape == (8, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
