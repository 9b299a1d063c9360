"""The CIFAR ResNets of He et al. in plain PyTorch, with the papers' ideas as switches.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv 1512.03385), sec. 4.2:
a 3x3 conv with 16 filters, three stages of n blocks at widths 16 / 32 / 64 on 32 / 16 / 8 px maps (stride 2
at the start of stages 2 and 3), no max-pool, global average pooling and an ``fc`` head: 6n+2 layers with basic
blocks (two 3x3 convs). He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016, arXiv
1603.05027): pre-activation blocks (BN-ReLU before each conv, a final BN-ReLU before the pool) and bottleneck
blocks (1x1, 3x3, 1x1 convs, x4 expansion: 9n+2 layers, e.g. ResNet-164 with n = 18).

Switches (CifarResNet's arguments), each defaulting to 2016a's choice:

- ``shortcut``: ``identity`` (option A: the identity, subsampled with stride 2 and zero-padded with extra
  channels where the shape changes; no parameters), ``projection`` (option B: a 1x1 conv + norm where the shape
  changes, the identity elsewhere), ``none`` (a plain net: the same stack with the shortcut removed);
- ``block``: ``basic`` | ``bottleneck``; ``preact``: pre-activation blocks; ``norm``: ``batch`` | ``none`` (no
  BatchNorm at all: the convs then get a bias);
- ``init``: ``he`` (kaiming_normal_, fan_out, relu, as both papers), ``xavier`` (xavier_uniform_) or ``default``
  (PyTorch's own); ``zero_init_residual``: zero the last BN gamma of each residual branch, so that every block
  starts as the identity (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

Pre-activation follows the authors' code (facebook/fb.resnet.torch ``preresnet.lua``): the first block of each
stage applies its BN-ReLU to both branches (so its shortcut sees the activated input: the stem conv has no
BN-ReLU of its own); every other block adds its input unchanged, out = F(x) + x. A projection shortcut of a
pre-activation block is a bare 1x1 conv (its input is already normalized). Bottleneck blocks stride in their
3x3 conv (fb.resnet.torch, torchvision's ResNet v1.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_ray.architectures import BLOCKS, INITS, NORMS, SHORTCUTS

WIDTHS = (16, 32, 64)  # He et al. 2016a sec. 4.2; the bottleneck's inner width in 2016b


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A k x k conv keeping the size (padding k // 2). torchvision's conv3x3 / conv1x1 fix bias=False; without
    BatchNorm (norm none) the convs need their bias."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)


def norm_layer(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class PadShortcut(nn.Module):
    """Option A: the identity where the shape changes, without parameters: every stride-th pixel of the input,
    its channels followed by zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"zero channels={self.extra}, stride={self.stride}"


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, preact: bool, norm: str):
    """The shortcut module of one block: None for a plain net, nn.Identity where the shape stays."""
    if kind == "none":
        return None
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    if kind == "identity":
        return PadShortcut(in_channels, out_channels, stride)
    projection = conv(in_channels, out_channels, 1, stride, bias=norm == "none")
    # pre-activation: a stage's first block (the only one whose shape changes) hands its shortcut the BN-ReLU'd
    # input, so the projection is fb.resnet.torch's 1x1 conv alone
    return projection if preact else nn.Sequential(projection, norm_layer(norm, out_channels))


class Block(nn.Module):
    """A residual block: convs ``conv1..convK`` with norms ``bn1..bnK`` and a shortcut.

    Post-activation (2016a): out = relu(bnK(convK(... relu(bn1(conv1(x))))) + shortcut(x)), bn_i after conv_i.
    Pre-activation (2016b): out = convK(relu(bnK(... conv1(relu(bn1(x)))))) + shortcut(x), bn_i before conv_i;
    with ``shared_preact`` (the first block of a stage) the shortcut gets relu(bn1(x)) instead of x.
    ``shortcut`` None: a plain block, out = relu(F(x)) or F(x).
    """

    def __init__(self, convs: list, shortcut, preact: bool, shared_preact: bool, norm: str):
        super().__init__()
        self.preact, self.shared_preact = preact, shared_preact
        self.depth = len(convs)
        for i, c in enumerate(convs, 1):
            setattr(self, f"conv{i}", c)
            setattr(self, f"bn{i}", norm_layer(norm, c.in_channels if preact else c.out_channels))
        self.shortcut = shortcut
        self.relu = nn.ReLU(inplace=False)

    def layers(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.depth + 1)]

    @property
    def last_norm(self) -> nn.Module:
        """The norm whose zero gamma makes the residual branch zero (zero_init_residual)."""
        return getattr(self, f"bn{self.depth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._preact(x) if self.preact else self._postact(x)

    def _postact(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i, (c, bn) in enumerate(self.layers(), 1):
            out = bn(c(out))
            if i < self.depth:
                out = self.relu(out)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)

    def _preact(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        pre = self.relu(layers[0][1](x))
        out = layers[0][0](pre)
        for c, bn in layers[1:]:
            out = c(self.relu(bn(out)))
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.shared_preact else x)
        return out


def basic_block(in_channels, width, stride, bias) -> list[nn.Conv2d]:
    """Two 3x3 convs of ``width`` filters (the first strided): the block of 2016a's CIFAR nets."""
    return [conv(in_channels, width, 3, stride, bias), conv(width, width, 3, 1, bias)]


def bottleneck_block(in_channels, width, stride, bias) -> list[nn.Conv2d]:
    """1x1 (width), 3x3 (width, strided), 1x1 (4 x width): the bottleneck of 2016a sec. 4.1 / 2016b."""
    return [
        conv(in_channels, width, 1, 1, bias),
        conv(width, width, 3, stride, bias),
        conv(width, 4 * width, 1, 1, bias),
    ]


BLOCK_BUILDERS = {"basic": (basic_block, 1), "bottleneck": (bottleneck_block, 4)}  # convs, expansion


def blocks_per_stage(depth: int, block: str) -> int:
    """n of a 6n+2 (basic) or 9n+2 (bottleneck) layer net."""
    per_block = 2 * 3 if block == "basic" else 3 * 3
    if depth < 2 + per_block or (depth - 2) % per_block:
        raise ValueError(f"{block} blocks stack {per_block}n+2 layers (n >= 1); depth {depth} is not one")
    return (depth - 2) // per_block


class CifarResNet(nn.Module):
    """A CIFAR ResNet (or plain net) of ``depth`` layers; the head is ``fc``. Input: (B, 3, H, W), any H, W
    (32 in the papers); output: (B, num_classes) logits."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        shortcut: str = "identity",
        block: str = "basic",
        preact: bool = False,
        norm: str = "batch",
        init: str = "he",
        zero_init_residual: bool = False,
        widths: tuple = WIDTHS,
    ):
        super().__init__()
        for name, value, allowed in (
            ("shortcut", shortcut, SHORTCUTS),
            ("block", block, BLOCKS),
            ("norm", norm, NORMS),
            ("init", init, INITS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        if zero_init_residual and (norm != "batch" or shortcut == "none"):
            raise ValueError("zero_init_residual needs norm batch and shortcuts")
        n = blocks_per_stage(depth, block)
        make_convs, expansion = BLOCK_BUILDERS[block]
        bias = norm == "none"
        self.preact = preact
        self.conv1 = conv(3, widths[0], 3, 1, bias)
        # post-activation: the stem is conv-BN-ReLU; pre-activation: conv alone (the first block's BN-ReLU follows)
        self.bn1 = nn.Identity() if preact else norm_layer(norm, widths[0])
        channels, stages = widths[0], []
        for s, width in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                out = width * expansion
                blocks.append(
                    Block(
                        make_convs(channels, width, stride, bias),
                        make_shortcut(shortcut, channels, out, stride, preact, norm),
                        preact,
                        shared_preact=b == 0,
                        norm=norm,
                    )
                )
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = norm_layer(norm, channels) if preact else nn.Identity()  # 2016b: BN-ReLU before the pool
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        if init != "default":  # PyTorch's own init is what the modules got when they were made
            init_weights(self, init)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Block):
                    nn.init.zeros_(m.last_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = self.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.preact:
            x = self.relu(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_weights(model: nn.Module, init: str) -> None:
    """(Re)initialize every conv of ``model``: he = kaiming_normal_ (fan_out, relu: std sqrt(2 / (k*k*out)), as
    2016a, fb.resnet.torch and torchvision), xavier = xavier_uniform_ (Glorot & Bengio 2010, gain 1), default =
    PyTorch's own (``reset_parameters``). Conv biases (norm none) start at zero with he / xavier. Norm layers and
    the fc head are left as they are (BatchNorm at gamma 1, beta 0 unless zero-initialized)."""
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if init == "default":
            m.reset_parameters()
            continue
        if init == "he":
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
