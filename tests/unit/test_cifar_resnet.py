"""The CIFAR ResNets of He et al. 2016a/b and their switches (plain PyTorch, no Ray)."""

import pytest
import torch
from torch import nn

from resnet_ray.cifar_resnet import Block, CifarResNet, PadShortcut, blocks_per_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def on_meta(**kwargs) -> CifarResNet:
    with torch.device("meta"):  # shapes and counts only: no init work
        return CifarResNet(**kwargs)


# He et al. 2016a, Table 6 (option A shortcuts, 10 classes), as printed there: 0.27M ... 1.7M
TABLE_6 = [(20, 3, "0.27"), (32, 5, "0.46"), (44, 7, "0.66"), (56, 9, "0.85"), (110, 18, "1.7")]


@pytest.mark.parametrize("depth, n, printed", TABLE_6)
def test_parameter_counts_match_table_6(depth, n, printed):
    model = on_meta(depth=depth)
    assert blocks_per_stage(depth, "basic") == n and len(blocks(model)) == 3 * n
    count = params(model) / 1e6
    decimals = len(printed.split(".")[1])
    assert round(count, decimals) == float(printed)  # the table's figure at the precision it is printed with
    if decimals == 2:
        assert count == pytest.approx(float(printed), rel=0.01)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n+2 weighted layers: the convs and the fc


def test_resnet164_preact_bottleneck_has_1_7m_parameters():
    """He et al. 2016b, Table 2 / 3: ResNet-164 (9n+2, n=18), 1.7M parameters; outputs 64 / 128 / 256."""
    model = on_meta(depth=164, block="bottleneck", preact=True, shortcut="projection")
    assert params(model) / 1e6 == pytest.approx(1.7, rel=0.01)
    assert [model.layer1[0].conv3.out_channels, model.layer2[0].conv3.out_channels] == [64, 128]
    assert model.layer3[-1].conv3.out_channels == 256 and model.fc.in_features == 256
    assert [model.layer1[0].conv1.out_channels, model.layer3[0].conv2.out_channels] == [16, 64]  # inner widths
    with pytest.raises(ValueError, match="9n\\+2"):
        CifarResNet(32, block="bottleneck")


def test_forward_shapes_and_strides():
    model = CifarResNet(20, num_classes=7).eval()
    seen = {}
    for name in ("conv1", "layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert seen == {
        "conv1": (2, 16, 32, 32),
        "layer1": (2, 16, 32, 32),
        "layer2": (2, 32, 16, 16),
        "layer3": (2, 64, 8, 8),
    }
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_option_a_is_a_parameter_free_zero_padded_subsampling():
    model = CifarResNet(20)
    shortcuts = [b.shortcut for b in blocks(model)]
    pads = [s for s in shortcuts if isinstance(s, PadShortcut)]
    assert len(pads) == 2 and all(isinstance(s, nn.Identity) for s in shortcuts if s not in pads)
    assert not list(model.layer2[0].shortcut.parameters())
    x = torch.randn(2, 16, 32, 32)
    out = model.layer2[0].shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and not out[:, 16:].any()


def test_option_b_projects_only_where_the_shape_changes():
    model = CifarResNet(20, shortcut="projection")
    projections = [b.shortcut for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2  # first blocks of stages 2 and 3
    conv, bn = projections[0]
    assert (conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels) == ((1, 1), (2, 2), 16, 32)
    assert isinstance(bn, nn.BatchNorm2d)
    assert params(model) == params(CifarResNet(20)) + sum(params(p) for p in projections)
    bottleneck = CifarResNet(20, block="bottleneck", shortcut="projection")  # 9n+2, n=2: 16 -> 64 already in stage 1
    assert sum(not isinstance(b.shortcut, nn.Identity) for b in blocks(bottleneck)) == 3


def test_plain_net_is_the_same_stack_without_shortcuts():
    torch.manual_seed(0)
    plain = CifarResNet(20, shortcut="none").eval()
    torch.manual_seed(0)
    residual = CifarResNet(20).eval()
    assert all(b.shortcut is None for b in blocks(plain))
    assert params(plain) == params(residual)
    a, b = plain.state_dict(), residual.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, the same init
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), residual(x))


def test_norm_none_has_no_batchnorm_and_biased_convs():
    model = CifarResNet(20, norm="none", shortcut="projection")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None and not c.bias.any() for c in convs)  # he init: zero biases
    assert all(c.bias is None for c in CifarResNet(20).modules() if isinstance(c, nn.Conv2d))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="zero_init_residual"):
        CifarResNet(20, norm="none", zero_init_residual=True)


def conv_std(init: str) -> tuple[float, int, int]:
    torch.manual_seed(0)
    conv = CifarResNet(56, init=init).layer3[4].conv1  # 64 x 64 x 3 x 3 = 36,864 weights
    fan_in = fan_out = 64 * 9
    return conv.weight.std().item(), fan_in, fan_out


def test_init_sets_the_conv_weight_statistics():
    std, fan_in, fan_out = conv_std("he")
    assert std == pytest.approx((2 / fan_out) ** 0.5, rel=0.03)  # kaiming_normal_, fan_out, relu
    std, fan_in, fan_out = conv_std("xavier")
    assert std == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.03)  # xavier_uniform_, gain 1
    std, fan_in, _ = conv_std("default")
    assert std == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.03)  # PyTorch's kaiming_uniform_(a=sqrt(5))
    model = CifarResNet(20, init="xavier")
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )


def call_order(block: Block) -> list[str]:
    order = []
    for name, module in block.named_children():
        if name.startswith(("conv", "bn")):
            module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
    block(torch.rand(2, block.conv1.in_channels, 8, 8))
    return order


def test_preact_puts_batchnorm_before_each_conv():
    post, pre = CifarResNet(20).layer2[1], CifarResNet(20, preact=True).layer2[1]
    assert call_order(post) == ["conv1", "bn1", "conv2", "bn2"]
    assert call_order(pre) == ["bn1", "conv1", "bn2", "conv2"]
    model = CifarResNet(20, preact=True)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn_final, nn.BatchNorm2d)  # final BN-ReLU
    assert model.layer2[0].bn1.num_features == model.layer2[0].conv1.in_channels == 16
    bottleneck = CifarResNet(164, block="bottleneck", preact=True, shortcut="projection").layer3[5]
    assert call_order(bottleneck) == ["bn1", "conv1", "bn2", "conv2", "bn3", "conv3"]


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("train", [True, False])
def test_preact_identity_block_with_zero_residual_passes_its_input_through_exactly(block, train):
    """2016b's point: with a zero residual branch, a pre-activation block is the identity, out = x (in training
    mode too: a zero gamma makes the BN output zero whatever the batch statistics)."""
    model = CifarResNet(20, block=block, preact=True, zero_init_residual=True).train(train)
    for b, size in ((model.layer1[1], 32), (model.layer2[1], 16), (model.layer3[1], 8)):
        assert isinstance(b.shortcut, nn.Identity)
        x = torch.randn(4, b.conv1.in_channels, size, size)
        with torch.no_grad():
            assert torch.equal(b(x), x)


def test_postact_block_with_zeroed_last_conv_is_relu_of_its_input():
    """Post-activation: out = relu(F(x) + x) = relu(x) when F is zero: the identity on non-negative input."""
    model = CifarResNet(20).eval()
    block = model.layer1[1]
    with torch.no_grad():
        block.conv2.weight.zero_()
        x = torch.rand(2, 16, 8, 8)
        assert torch.equal(block(x), x)
        assert torch.equal(block(x - 0.5), torch.relu(x - 0.5))
        transition = model.layer2[0]  # option A where the shape changes: subsampled, zero-padded input
        transition.conv2.weight.zero_()
        out = transition(x)
        assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and not out[:, 16:].any()


def test_zero_init_residual_zeroes_the_last_bn_of_every_branch():
    for kwargs in ({}, {"preact": True}, {"block": "bottleneck"}):
        model = CifarResNet(20, zero_init_residual=True, **kwargs)
        for b in blocks(model):
            assert not b.last_norm.weight.any()
            assert all(getattr(b, f"bn{i}").weight.all() for i in range(1, b.depth))
    post = CifarResNet(20, zero_init_residual=True).eval()
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(post.layer1[0](x), x)  # relu(0 + x) on non-negative input
    assert all(b.last_norm.weight.all() for b in blocks(CifarResNet(20)))  # the paper's nets: no zero-init
    with pytest.raises(ValueError, match="zero_init_residual"):
        CifarResNet(20, shortcut="none", zero_init_residual=True)


def test_whole_preact_net_with_zero_residuals_reduces_to_its_first_blocks():
    """Every block but the first of each stage is the identity: the net's output does not depend on them."""
    torch.manual_seed(0)
    model = CifarResNet(32, preact=True, zero_init_residual=True).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for stage in (model.layer1, model.layer2, model.layer3):
            for b in list(stage)[1:]:
                b.forward = lambda t: t
        assert torch.equal(model(x), full)


@pytest.mark.parametrize("name, value", [("shortcut", "C"), ("block", "wide"), ("norm", "group"), ("init", "lecun")])
def test_unknown_switch_values_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}: '{value}' is not one of"):
        CifarResNet(20, **{name: value})


def test_works_at_other_sizes_and_backpropagates():
    model = CifarResNet(20, shortcut="projection", preact=True)
    out = model(torch.rand(2, 3, 48, 40))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
