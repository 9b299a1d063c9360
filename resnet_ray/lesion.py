"""Lesions of a trained net (Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively
Shallow Networks", arXiv 1605.06431, sec. 4): a block's residual branch removed, its shortcut kept, at test time.

A lesioned block returns what its shortcut carries: ``relu(shortcut(x))`` for a post-activation block (2016a:
the final ReLU stays), ``shortcut(x)`` for a pre-activation one (its shortcut sees ``relu(bn1(x))`` in the first
block of a stage, as the block itself does), and the block's input for a plain block (no shortcut) whose shape
does not change. A plain block that changes the shape (a stage's first) cannot be removed. Works on the CIFAR
ResNets and plain nets of :mod:`resnet_ray.cifar_resnet` and on torchvision's ResNet blocks.

Plain torch, no Ray: :func:`blocks` lists a net's blocks, :func:`lesioned` removes some of them for the
duration of a ``with``; the model's weights and BatchNorm statistics are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_ray.cifar_resnet import Block


@dataclass(frozen=True)
class BlockInfo:
    name: str  # the module's name in the net (layer2.0)
    downsampling: bool  # the block changes the shape (stride 2 and/or more channels)
    removable: bool  # False for a plain block that changes the shape: nothing of its input could stand in


def _downsampling(block: nn.Module) -> bool:
    if isinstance(block, Block):
        convs = [c for c, _ in block.layers()]
        return any(c.stride != (1, 1) for c in convs) or convs[0].in_channels != convs[-1].out_channels
    return block.downsample is not None


def blocks(model: nn.Module) -> list[BlockInfo]:
    """The residual (or plain) blocks of ``model`` in forward order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (Block, BasicBlock, Bottleneck)):
            down = _downsampling(module)
            plain = isinstance(module, Block) and module.shortcut is None
            found.append(BlockInfo(name, down, removable=not (plain and down)))
    return found


def shortcut_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``block`` outputs with its residual branch removed."""
    if isinstance(block, Block):
        if block.shortcut is None:
            return x
        if block.preact:
            return block.shortcut(block.relu(block.bn1(x)) if block.shared_preact else x)
        return block.relu(block.shortcut(x))
    return F.relu(block.downsample(x) if block.downsample is not None else x)


@contextlib.contextmanager
def lesioned(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """``model`` with the residual branch of each named block removed, inside the ``with`` (forward hooks that
    replace the block's output by :func:`shortcut_path`). ValueError for an unknown or unremovable block."""
    info = {b.name: b for b in blocks(model)}
    modules = dict(model.named_modules())
    hooks = []
    try:
        for name in names:
            if name not in info:
                raise ValueError(f"{name}: not a block of this net ({', '.join(info) or 'it has none'})")
            if not info[name].removable:
                raise ValueError(f"{name}: a plain block that changes the shape cannot be removed")
            hooks.append(modules[name].register_forward_hook(lambda m, args, out: shortcut_path(m, args[0])))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
