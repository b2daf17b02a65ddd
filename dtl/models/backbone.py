"""The interface of a source of backbones (torchvision, timm): how a name is checked and built, where the head
is, what the blocks are, how a weight file is adapted, what input the weights expect. The rest of dtl asks a
`Backbone` (chosen by `dtl.models.registry`) and never which library a model comes from."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from dtl.data.preprocessing import Preprocessing


class Backbone(ABC):
    """One backbone name (`vgg16`, `timm/convnext_tiny`) of one source. Methods that take a model work on
    any model of this source."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    @abstractmethod
    def serves(cls, name: str) -> bool:
        """Whether `--model name` belongs to this source."""

    @classmethod
    @abstractmethod
    def owns(cls, model: nn.Module) -> bool:
        """Whether `model` was built by this source."""

    @abstractmethod
    def check(self, image_size: int, hub_weights: bool, drop_path: float | None) -> None:
        """Refuse an unknown name or an image size the architecture cannot take (UserError), before anything
        big is built or written. `hub_weights`: published pretrained weights will be loaded."""

    @abstractmethod
    def create(self, weights: str, image_size: int, drop_path: float | None) -> nn.Module:
        """The architecture with its original head: with the published weights `weights` names (imagenet, an
        enum name or tag) loaded, or randomly initialised (`none`, or a weight file loaded afterwards).
        `drop_path`: the stochastic depth rate (None: the model's own)."""

    @abstractmethod
    def fetch_weights(self, weights: str) -> None:
        """Bring the published weights into the local cache (a download when missing), so that the processes
        that build the model afterwards only read them."""

    @abstractmethod
    def preprocessing(self, weights: str) -> Preprocessing:
        """The normalisation and resampling the weights (`--weights`: a published name, none or a file) were
        trained with."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[list[str]]:
        """Blocks (each a list of parameter-name prefixes) in forward order, the head left out: what
        `--finetune-last-n` unfreezes and `--layer-decay` scales."""

    @staticmethod
    @abstractmethod
    def head_name(model: nn.Module) -> str:
        """Qualified name of the classification layer."""

    @staticmethod
    @abstractmethod
    def replace_head(model: nn.Module, num_classes: int) -> str:
        """Swap the classification layer for a freshly initialised one with `num_classes` outputs (drawn from
        the global random stream); its name."""

    def adapt_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A weight file's state dict as this architecture loads it (e.g. resampled position embeddings)."""
        return state

    def versions(self) -> dict[str, str]:
        """Library versions worth recording with a run (torch and torchvision are recorded anyway)."""
        return {}
