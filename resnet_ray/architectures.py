"""The registry of model.arch names: each architecture's own switches (no torch here).

``config.ModelConfig`` validates model.arch and its switches against it, and resolves the switches left null;
``model.build_model`` builds every name from its depth and switches.
"""

from __future__ import annotations

# model.arch -> the architecture's own switches: what a null ModelConfig.shortcut / block / preact /
# zero_init_residual means (the papers' choices). The one registry of model.arch names: resnet_ray/model.py builds
# each from its depth and switches; no torch here.
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # the 6n+2 CIFAR ResNets of He et al. 2016a (arXiv 1512.03385), Table 6


def _own(depth: int, shortcut: str, block: str = "basic", preact: bool = False, zero_init: bool = False) -> dict:
    return {"depth": depth, "shortcut": shortcut, "block": block, "preact": preact, "zero_init_residual": zero_init}


ARCH_SWITCHES = {
    # torchvision's ImageNet ResNets: option B shortcuts, post-activation, zero-init residual (as before)
    "resnet18": _own(18, "projection", zero_init=True),
    "resnet34": _own(34, "projection", zero_init=True),
    "resnet50": _own(50, "projection", "bottleneck", zero_init=True),
    # CIFAR ResNets (He et al. 2016a, sec. 4.2): option A (zero-padded identity) shortcuts, no zero-init
    **{f"resnet{d}": _own(d, "identity") for d in _CIFAR_DEPTHS},
    # ResNet-164 of He et al. 2016b (arXiv 1603.05027): pre-activation bottleneck blocks (9n+2, n=18) with 1x1
    # projection shortcuts where the shape changes (the authors' code, github.com/KaimingHe/resnet-1k-layers)
    "resnet164": _own(164, "projection", "bottleneck", preact=True),
    # the plain nets of He et al. 2016a (Fig. 6): the same stacks as resnetN without any shortcut
    **{f"plain{d}": _own(d, "none") for d in _CIFAR_DEPTHS},
}
ARCHS = tuple(ARCH_SWITCHES)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")  # the only ones with ImageNet weights
SHORTCUTS = ("identity", "projection", "none")
BLOCKS = ("basic", "bottleneck")
NORMS = ("batch", "none")
INITS = ("he", "xavier", "default")
