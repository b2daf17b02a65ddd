"""What trains: requires_grad per mode (`--mode`, `--finetune-last-n`), frozen normalisation layers kept in eval
mode, the frozen prefix run without autograd, and the memory format that suits what trains."""

from __future__ import annotations

import torch
from torch import nn

from dtl.errors import UserError
from dtl.models.registry import backbone, head_name


def freeze(model: nn.Module, name: str, mode: str, finetune_last_n: int | None) -> list[str]:
    """Set requires_grad per mode; returns the names of the trainable parameters. Call before DDP wraps the
    model: DDP decides at construction which parameters it reduces."""
    head = head_name(model)
    if mode == "scratch" or (mode == "finetune" and finetune_last_n is None):
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        prefixes = [head]
        if mode == "finetune":
            blocks = backbone(name).blocks(model)
            if finetune_last_n > len(blocks):
                raise UserError(f"--finetune-last-n {finetune_last_n} is more than the {len(blocks)} blocks "
                                f"{name} has; omit it to train everything")
            prefixes += [p for block in blocks[len(blocks) - finetune_last_n:] for p in block]
        for key, p in model.named_parameters():
            p.requires_grad_(any(key == pre or key.startswith(pre + ".") for pre in prefixes))
    return [k for k, p in model.named_parameters() if p.requires_grad]


def freeze_frozen_norms(model: nn.Module, all_stats: bool = False) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode, so a frozen backbone stays
    frozen (its BatchNorm running statistics do not drift); with `all_stats` (--freeze-bn-stats) every
    BatchNorm layer, trained or not. Dropout keeps the train-mode semantics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if all_stats or (params and not any(p.requires_grad for p in params)):
                module.eval()


def memory_format(device_type: str, mode: str) -> torch.memory_format:
    """channels_last on GPUs (NHWC is what their convolution kernels want); on CPUs only when no convolution
    trains: oneDNN's channels_last convolution *backward* measured 1.7x slower than NCHW here (VGG16, 224 px),
    while its forward is faster (transfer mode runs forward only through the convolutions)."""
    if device_type == "cuda" or mode == "transfer":
        return torch.channels_last
    return torch.contiguous_format


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_prefix_without_grad(model: nn.Module, head: str) -> list[torch.utils.hooks.RemovableHandle]:
    """Run everything before the head under no_grad (transfer mode): the frozen backbone stores no
    activations and builds no graph; the head runs in whatever grad mode the caller had.

    Done with hooks (which live as long as the model) rather than a `with torch.no_grad()` around the backbone
    so it works for every family's own forward() and leaves the grad mode unchanged outside the model (DDP
    decides whether to prepare its gradient all-reduce from the grad mode after forward). Returns the hooks'
    handles (lp-ft removes them when the backbone is unfrozen)."""
    saved: list[bool] = []

    def enter(module: nn.Module, args: tuple) -> None:
        saved.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def at_head(module: nn.Module, args: tuple) -> None:
        if saved:  # the head called on its own (cached features) never went through enter
            torch.set_grad_enabled(saved[-1])

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        torch.set_grad_enabled(saved.pop())

    return [model.register_forward_pre_hook(enter), model.get_submodule(head).register_forward_pre_hook(at_head),
            model.register_forward_hook(leave, always_call=True)]
