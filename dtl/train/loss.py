"""The training loss: the hard-label cross-entropy, or with MixUp/CutMix (`dtl.data.augment.mix`) the soft-target
cross-entropy their mixed targets need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtl.config import OptimConfig
from dtl.data.augment import mix

__all__ = ["SoftTargetCrossEntropy", "criterion_for"]


class SoftTargetCrossEntropy(nn.Module):
    """sum_c -t_c log softmax(x)_c, averaged over the batch (timm's `SoftTargetCrossEntropy`).

    With class weights w (`--class-balance loss`) each image's term is weighted by w_c summed over its
    target t_c, and the batch's sum divided by the sum of those weights: for one-hot targets exactly what
    `nn.CrossEntropyLoss(weight=w)` computes (a weighted mean), and for mixed targets the same weighting
    applied to each class by its share of the target."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=-1)
        if self.weight is None:
            return torch.sum(-targets * logp, dim=-1).mean()
        weighted = targets * self.weight
        return torch.sum(-weighted * logp) / weighted.sum()


def criterion_for(cfg: OptimConfig, class_weights: torch.Tensor | None) -> nn.Module:
    """The training loss: `nn.CrossEntropyLoss` on the hard labels when mixing is off, the soft-target one (label
    smoothing folded into the targets) when it is on."""
    if not mix.enabled(cfg):
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    return SoftTargetCrossEntropy(class_weights)
