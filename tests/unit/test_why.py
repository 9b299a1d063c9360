"""Why ResNet works, measured on the nets themselves (plain PyTorch, no Ray): lesions of residual blocks, the
signal at initialization, layer responses."""

import pytest
import torch
import torchvision

from resnet_ray.cifar_resnet import CifarResNet
from resnet_ray.lesion import blocks, lesioned, shortcut_path
from resnet_ray.probes import first_last_ratio, layer_responses, signal_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_resnet20_has_9_blocks_two_of_them_downsampling_and_a_plain_net_cannot_lose_those():
    listed = blocks(CifarResNet(20))
    assert len(listed) == 9 and [b.name for b in listed if b.downsampling] == ["layer2.0", "layer3.0"]
    assert all(b.removable for b in listed)
    plain = blocks(CifarResNet(20, shortcut="none"))
    assert [b.name for b in plain if not b.removable] == ["layer2.0", "layer3.0"]
    with pytest.raises(ValueError, match="layer2.0: a plain block that changes the shape cannot be removed"):
        with lesioned(CifarResNet(20, shortcut="none"), ["layer2.0"]):
            pass
    with pytest.raises(ValueError, match="layer9.9: not a block of this net"):
        with lesioned(CifarResNet(20), ["layer9.9"]):
            pass


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("shortcut", ["identity", "projection", "none"])
def test_a_lesioned_block_returns_its_shortcut(preact, shortcut):
    torch.manual_seed(0)
    model = CifarResNet(20, shortcut=shortcut, preact=preact).eval()
    name = "layer2.1" if shortcut == "none" else "layer2.0"  # a plain net's downsampling block cannot go
    block = dict(model.named_modules())[name]
    x = torch.randn(2, 16, 32, 32) if name == "layer2.0" else torch.randn(2, 32, 16, 16)  # the block's input
    with torch.no_grad():
        whole = block(x)
        with lesioned(model, [name]):
            cut = block(x)
        if shortcut == "none":
            expected = x  # a plain block of unchanged shape passes its input through
        elif preact:
            expected = block.shortcut(block.relu(block.bn1(x)))  # the stage's first block: its BN-ReLU'd input
        else:
            expected = torch.relu(block.shortcut(x))  # through the final ReLU
    torch.testing.assert_close(cut, expected)
    assert not torch.allclose(cut, whole)
    with torch.no_grad():
        torch.testing.assert_close(block(x), whole)  # the hook is gone after the with


def test_a_torchvision_block_lesion_keeps_its_downsample_and_relu():
    model = torchvision.models.resnet18(num_classes=4).eval()
    block = model.layer2[0]
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad(), lesioned(model, ["layer2.0"]):
        torch.testing.assert_close(block(x), torch.relu(block.downsample(x)))
    assert shortcut_path(model.layer1[0], -x).min() == 0


def test_with_zero_initialised_residual_branches_every_lesion_changes_nothing():
    torch.manual_seed(0)
    model = CifarResNet(20, zero_init_residual=True).eval()
    x = images()
    with torch.no_grad():
        whole = model(x)
        with lesioned(model, [b.name for b in blocks(model)]):
            torch.testing.assert_close(model(x), whole)


def plain56(init, norm):
    torch.manual_seed(0)
    return CifarResNet(56, shortcut="none", norm=norm, init=init)


def test_xavier_init_vanishes_the_gradient_of_a_deep_plain_net_without_bn_and_he_init_does_not():
    """He et al. 2015, sec. 2.2: with ReLU, Xavier halves the signal's variance at every layer."""
    x, y = images(32), torch.arange(32) % 10
    xavier = first_last_ratio(signal_stats(plain56("xavier", "none"), x, y))
    he = first_last_ratio(signal_stats(plain56("he", "none"), x, y))
    assert xavier < 1e-3, xavier  # more than 1,000x smaller at the first layer than at the last
    assert 1e-2 < he < 1e2, he  # within 100x


def test_signal_rows_cover_every_conv_in_forward_order_and_leave_no_gradients():
    model = CifarResNet(20, shortcut="projection")
    rows = signal_stats(model, images(4), torch.tensor([0, 1, 2, 3]))
    assert len(rows) == 19 + 2  # 6n+1 convs and the two projection shortcuts
    assert rows[0]["name"] == "conv1" and rows[-1]["name"] == "layer3.2.conv2"
    assert [r["layer"] for r in rows] == list(range(1, 22))
    assert all(r["activation_std"] > 0 and r["activation_grad_norm"] > 0 for r in rows)
    assert all(p.grad is None for p in model.parameters())


def test_layer_responses_are_one_per_3x3_layer_after_its_bn():
    model = CifarResNet(20)
    rows = layer_responses(model, images())
    assert len(rows) == 19 and rows[0]["name"] == "conv1" and rows[1]["name"] == "layer1.0.conv1"
    assert all(r["std"] > 0 for r in rows)
    zero = CifarResNet(20, zero_init_residual=True)
    last = {r["name"]: r["std"] for r in layer_responses(zero, images())}
    assert last["layer1.0.conv2"] == 0  # a zero-gamma BN: the residual function responds with nothing


def test_the_default_nets_of_init_stats_are_model_switches():
    from resnet_ray.config import Config
    from resnet_ray.config_files import replace
    from resnet_ray.init_stats import DEFAULT_NETS, parse_net

    parsed = [parse_net(text) for text in DEFAULT_NETS]
    assert [label for label, _ in parsed] == [
        "plain-56 no-BN xavier",
        "plain-56 no-BN he",
        "plain-56 BN he",
        "resnet-56 BN he",
    ]
    for _, overrides in parsed:
        assert replace(Config(), {"model.weights": "none", **overrides}).model.arch in ("plain56", "resnet56")
