"""Looking inside a net, per layer, on one batch (plain torch, no Ray).

- :func:`signal_stats`: at initialization (or any time), one forward and backward pass in training mode: per conv
  layer, in forward order, the std of its output, the norm of the loss's gradient with respect to that output,
  and the norm of its weight gradient. The activation gradient shows vanishing and exploding signals that the
  weight gradients can hide (Glorot & Bengio 2010, Figs. 6-8; He et al. 2015, sec. 2.2; with BatchNorm, Philipp et
  al. 2018 and Yang et al. 2019: deep plain nets explode towards the input, shortcuts tame them).
- :func:`layer_responses`: in a trained net (eval mode), the std of each 3x3 layer's response, after its
  BatchNorm and before the ReLU or the addition (He et al. 2016a, sec. 4.2, Fig. 7): residual functions respond
  less than plain layers, and less the deeper the net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_ray.cifar_resnet import Block, CifarResNet


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The conv layers of ``model`` in the order its forward pass runs them (a dry run on one image)."""
    order: list[str] = []
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: order.append(name)) for name, m in named]
    was_training = model.training
    try:
        size = 32 if isinstance(model, CifarResNet) else 64
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    modules = dict(named)
    return [(name, modules[name]) for name in dict.fromkeys(order)]


def signal_stats(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """One row per conv layer, in forward order: ``layer`` (1-based), ``name``, ``activation_std`` (of the conv's
    output), ``activation_grad_norm`` (||dL/d output||) and ``weight_grad_norm`` (||dL/dW||), for the mean
    cross-entropy of ``model(images)`` against ``labels``, the model in training mode (BatchNorm on batch
    statistics, as in the first step of a training run). The model's gradients are cleared afterwards."""
    layers = conv_layers(model)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in layers]
    was_training = model.training
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        rows = []
        for i, (name, conv) in enumerate(layers, 1):
            out = outputs[name]
            rows.append(
                {
                    "layer": i,
                    "name": name,
                    "activation_std": float(out.detach().float().std()),
                    "activation_grad_norm": float(out.grad.float().norm()),
                    "weight_grad_norm": float(conv.weight.grad.float().norm()),
                }
            )
        return rows
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def first_last_ratio(rows: list[dict], key: str = "activation_grad_norm") -> float:
    """``key`` at the first layer over ``key`` at the last: << 1 vanishing towards the input, >> 1 exploding."""
    return rows[0][key] / rows[-1][key]


def response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module whose output is the layer's response) for each 3x3 layer of a CIFAR net, in forward order:
    the BatchNorm after the conv in post-activation nets (the conv itself without BN), the conv in
    pre-activation ones (its BN comes before it)."""
    if not isinstance(model, CifarResNet):
        raise ValueError("layer responses are defined here for the CIFAR ResNets and plain nets (model.arch resnetN)")
    found = [("conv1", model.conv1 if model.preact or isinstance(model.bn1, nn.Identity) else model.bn1)]
    for name, block in model.named_modules():
        if isinstance(block, Block):
            for i, (conv, bn) in enumerate(block.layers(), 1):
                if conv.kernel_size == (3, 3):
                    after_bn = not block.preact and not isinstance(bn, nn.Identity)
                    found.append((f"{name}.conv{i}", bn if after_bn else conv))
    return found


@torch.no_grad()
def layer_responses(model: nn.Module, images: torch.Tensor) -> list[dict]:
    """One row per 3x3 layer, in forward order: ``layer`` (1-based), ``name`` and ``std`` of its response over
    the batch (eval mode: BatchNorm on its running statistics). He et al. 2016a, Fig. 7."""
    stds: dict[str, float] = {}
    layers = response_layers(model)
    hooks = [
        m.register_forward_hook(lambda m, a, out, name=name: stds.__setitem__(name, float(out.float().std())))
        for name, m in layers
    ]
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [{"layer": i, "name": name, "std": stds[name]} for i, (name, _) in enumerate(layers, 1)]
