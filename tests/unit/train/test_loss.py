"""dtl.train.loss: mixing off is `nn.CrossEntropyLoss` itself; the soft-target loss is timm's, and on one-hot
targets PyTorch's (weighted) cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtl.config import Config, OptimConfig
from dtl.data.augment import mix
from dtl.train.loss import SoftTargetCrossEntropy, criterion_for

C = 5


def optim(**kw) -> OptimConfig:
    return Config(**kw).optim


def test_mixing_off_is_the_hard_label_cross_entropy_bitwise():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, C), torch.randint(0, C, (8,))
    weight = torch.rand(C) + 0.5
    for smoothing, w in ((0.0, None), (0.1, None), (0.1, weight)):
        off = criterion_for(optim(label_smoothing=smoothing, mixup=0.0, cutmix=0.0), w)
        hard = nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)
        assert torch.equal(off(logits, labels), hard(logits, labels))
    assert Config(mixup=0.0, cutmix=0.0).optim.mixup == 0 and not mix.enabled(optim())


def test_soft_target_loss_on_one_hot_targets_is_the_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, C), torch.randint(0, C, (8,))
    one_hot = F.one_hot(labels, C).float()
    weight = torch.rand(C) + 0.5
    # equal up to summation order (the batch mean): hence mixing off keeps the hard-label loss itself
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, one_hot), F.cross_entropy(logits, labels))
    # --class-balance loss: for one-hot targets, PyTorch's weighted mean
    torch.testing.assert_close(SoftTargetCrossEntropy(weight)(logits, one_hot),
                               F.cross_entropy(logits, labels, weight=weight))
    soft = mix.mix_targets(labels, C, 0.3, 0.1)
    assert isinstance(criterion_for(optim(mixup=0.2), None), SoftTargetCrossEntropy)
    expected = torch.sum(-soft * F.log_softmax(logits, -1), -1).mean()  # timm's SoftTargetCrossEntropy
    assert torch.equal(SoftTargetCrossEntropy()(logits, soft), expected)
