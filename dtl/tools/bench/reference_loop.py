"""The reference loop: the single-GPU notebook script dtl grew from (a transfer-learning article's VGG16 on
CIFAR-10 script), exactly as it runs -- CIFAR-format uint8 images made into PIL images, per-image torchvision
transforms in a ``DataLoader`` (``num_workers=0``, ``shuffle=True``), fp32, plain SGD (lr 1e-3, momentum 0.9)
over the parameters the mode trains, and ``loss.item()`` + ``torch.sum(preds == labels)`` (host syncs) every
step. `dtl bench` times dtl's loop against it.

Also the pieces every side of the bench shares: `task_model` (the data and the model they all train) and
`endless` (batches across epochs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from dtl import models
from dtl.config import Config
from dtl.data import datasets
from dtl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from dtl.data.splits import Split, Splits

REFERENCE_LR, REFERENCE_MOMENTUM = 1e-3, 0.9


def endless(loader: Iterable) -> Iterator[Any]:
    """Batches forever, one pass (epoch) after another, like a multi-epoch run."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class CifarPIL(torch.utils.data.Dataset):
    """What `torchvision.datasets.CIFAR10.__getitem__` does: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, split: Split, transform: Callable[[Any], torch.Tensor]) -> None:
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # torchvision's dependency, imported where the reference loop uses it

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def reference_transform(train: bool, size: int) -> Callable[[Any], torch.Tensor]:
    """The reference loop's per-image PIL transforms (torchvision.transforms, v1)."""
    head = ([transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip()]
            if train else [transforms.Resize(size)])
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def task_model(cfg: Config) -> tuple[Splits, nn.Module]:
    """The data and the model every side of the bench trains: dtl's backbone and new head, seeded alike, with
    the same trainable parameters as dtl's run (on the CPU; each side moves it)."""
    splits = datasets.load_splits(cfg, allow_download=False)
    torch.manual_seed(cfg.run.seed)
    b = cfg.backbone
    net = models.build_model(b.model, len(splits.classes), b.weights, cfg.data.image_size, b.dropout, b.drop_path)
    models.freeze(net, b.model, b.mode, b.finetune_last_n)
    return splits, net


class ReferenceLoop:
    """The reference loop's data pipeline and train/test loops, one method per benchmarked phase
    (`dtl.tools.bench.timing.BenchLoop`)."""

    name = "reference"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        splits, net = task_model(cfg)
        self.device, self.net = device, net.to(device)
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params=params, lr=REFERENCE_LR, momentum=REFERENCE_MOMENTUM)
        self.criterion = nn.CrossEntropyLoss()
        size, bsz = cfg.data.image_size, cfg.optim.batch_size
        self.train_batches = endless(DataLoader(CifarPIL(splits.train, reference_transform(True, size)),
                                                batch_size=bsz, shuffle=True))
        self.eval_batches = endless(DataLoader(CifarPIL(splits.test, reference_transform(False, size)),
                                               batch_size=bsz, shuffle=False))
        self.epoch_loss, self.epoch_corrects = 0.0, 0

    def context(self) -> contextlib.AbstractContextManager:
        """The reference loop never turns on cuDNN autotuning (dtl's prepare does, process-wide)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=False)

    def input(self, steps: int) -> int:
        images = 0
        for _ in range(steps):
            inputs, labels = next(self.train_batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            images += inputs.size(0)
        return images

    def train_batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad()
        with torch.set_grad_enabled(True):
            outputs = self.net(inputs)
            loss = self.criterion(outputs, labels)
            _, preds = torch.max(outputs, 1)
            loss.backward()
            self.optimizer.step()
        self.epoch_loss += loss.item() * inputs.size(0)
        self.epoch_corrects += torch.sum(preds == labels.data)
        return inputs.size(0)

    def eval_batch(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        with torch.set_grad_enabled(False):
            outputs = self.net(inputs)
            loss = self.criterion(outputs, labels)
            _, preds = torch.max(outputs, 1)
        self.epoch_loss += loss.item() * inputs.size(0)
        self.epoch_corrects += torch.sum(preds == labels.data)
        return inputs.size(0)

    def train_step(self, steps: int) -> int:
        self.net.train()
        return sum(self.train_batch(*next(self.train_batches)) for _ in range(steps))

    def eval_step(self, steps: int) -> int:
        self.net.eval()
        return sum(self.eval_batch(*next(self.eval_batches)) for _ in range(steps))
