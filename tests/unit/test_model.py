"""Model building, weight loading and normalization (no Ray, no network)."""

import os

import pytest
import torch
import torchvision

from resnet_ray.config import ModelConfig
from resnet_ray.model import IMAGENET_MEAN, IMAGENET_STD, ModelError, build_model, is_head, normalization


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A resnet18 state_dict with a 1000-class head, saved to disk: (path, state)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(state, path)
    return str(path), state


def test_build_without_weights_has_new_head_and_forward():
    m = build_model(ModelConfig(arch="resnet18", weights="none"), 7)
    assert m.fc.out_features == 7
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_weights_file_loads_backbone_and_new_head(resnet18_file):
    path, state = resnet18_file
    m = build_model(ModelConfig(arch="resnet18", weights=path), 5)
    torch.testing.assert_close(m.conv1.weight, state["conv1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(m.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"], atol=0, rtol=0)
    assert m.fc.weight.shape == (5, 512) and m.fc.out_features == 5


def test_checkpoint_style_file_with_model_key(tmp_path, resnet18_file):
    _, state = resnet18_file
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "epoch": 3}, path)
    m = build_model(ModelConfig(arch="resnet18", weights=str(path)), 4)
    torch.testing.assert_close(m.conv1.weight, state["conv1.weight"], atol=0, rtol=0)


def test_weights_file_loaded_with_weights_only(monkeypatch, resnet18_file):
    path, _ = resnet18_file
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    build_model(ModelConfig(arch="resnet18", weights=path), 3)
    assert calls == [True]


def test_keys_that_do_not_fit_raise_model_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)  # extra blocks: unexpected keys
    with pytest.raises(ModelError, match="model.weights"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)), 3)


def test_resnet50_weights_into_resnet18_raise_model_error(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    try:
        build_model(ModelConfig(arch="resnet18", weights=str(path)), 3)
    except ModelError as exc:
        assert "model.weights" in str(exc)
    except RuntimeError as exc:
        raise AssertionError(f"expected ModelError, got {type(exc).__name__}") from exc
    else:
        raise AssertionError("no error raised")


def test_nonexistent_weights_path_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="model.weights"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "nope.pth")), 3)


def test_file_without_state_dict_raises_model_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelError, match="state_dict"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)), 3)


def test_unreadable_file_raises_model_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot load"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)), 3)


def test_imagenet_offline_error_names_torch_home_and_flag(monkeypatch, tmp_path):
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(arch="resnet18", weights="imagenet"), 3)
    msg = str(info.value)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    assert cache.startswith(str(torch_home))
    assert "TORCH_HOME" in msg and cache in msg and "--model.weights" in msg and "offline" in msg


def test_imagenet_uses_cached_file_without_download(monkeypatch, tmp_path, resnet18_file):
    _, state = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(cache)
    torch.save(state, os.path.join(cache, os.path.basename(url)))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download when the file is cached")
    )
    m = build_model(ModelConfig(arch="resnet18", weights="imagenet"), 6)
    torch.testing.assert_close(m.conv1.weight, state["conv1.weight"], atol=0, rtol=0)
    assert m.fc.out_features == 6


def test_unknown_imagenet_variant_raises_model_error():
    with pytest.raises(ModelError, match="IMAGENET1K_V2"):
        build_model(ModelConfig(arch="resnet18", weights="imagenet_v2"), 3)


def test_normalization():
    meta = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert normalization(ModelConfig(arch="resnet18", weights="imagenet"), meta) == (IMAGENET_MEAN, IMAGENET_STD)
    assert normalization(ModelConfig(arch="resnet18", weights="none"), meta) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize(
    "name,head",
    [
        ("fc.weight", True),
        ("fc.bias", True),
        ("module.fc.weight", True),
        ("_orig_mod.fc.bias", True),
        ("module._orig_mod.fc.weight", True),
        ("conv1.weight", False),
        ("module.layer1.0.conv1.weight", False),
        ("_orig_mod.bn1.bias", False),
        ("fcx.weight", False),
    ],
)
def test_is_head(name, head):
    assert is_head(name) is head


def test_the_driver_fetches_or_refuses_weights_before_any_ray_work(monkeypatch, tmp_path):
    """fit() and the search call fetch_weights first: offline without a cached copy, or a weights file that
    does not exist, ends with the one-line ModelError before data, workers or trials start."""
    from resnet_ray.config_files import load_config
    from resnet_ray.model import fetch_weights
    from resnet_ray.train import fit

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ModelError, match="cannot download"):
        fetch_weights(ModelConfig(arch="resnet18", weights="imagenet"))
    fetch_weights(ModelConfig(arch="resnet18", weights="none"))
    cfg = load_config(
        None,
        {
            "model.weights": str(tmp_path / "missing.pt"),
            "data.root": str(tmp_path / "data"),
            "train.storage_path": str(tmp_path / "runs"),
        },
    )
    with pytest.raises(ModelError, match="missing.pt' is neither imagenet"):
        fit(cfg)  # no Ray instance in this process: it stopped before needing one
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# the registry of model.arch names and the switches (He et al. 2016a/b; resnet_ray/cifar_resnet.py)


def test_every_name_of_the_registry_builds_with_its_depth():
    from resnet_ray.architectures import ARCH_SWITCHES, ARCHS

    for arch in ARCHS:
        with torch.device("meta"):  # shapes only
            model = build_model(ModelConfig(arch=arch, weights="none", image_size=32), 10)
        assert model.fc.out_features == 10, arch
        if arch not in ("resnet18", "resnet34", "resnet50"):  # 6n+2 / 9n+2 layers: the convs off the shortcuts + fc
            convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
            assert len(convs) + 1 == ARCH_SWITCHES[arch]["depth"], arch


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_arch_defaults_follow_the_papers():
    from resnet_ray.cifar_resnet import Block, PadShortcut

    def blocks(model):
        return [m for m in model.modules() if isinstance(m, Block)]

    with torch.device("meta"):
        r20 = build_model(ModelConfig(arch="resnet20", weights="none"), 10)
        p20 = build_model(ModelConfig(arch="plain20", weights="none"), 10)
        r164 = build_model(ModelConfig(arch="resnet164", weights="none"), 10)
        r20b = build_model(ModelConfig(arch="resnet20", weights="none", shortcut="projection"), 10)
    assert sum(isinstance(b.shortcut, PadShortcut) for b in blocks(r20)) == 2  # option A
    assert all(b.shortcut is None for b in blocks(p20)) and n_params(p20) == n_params(r20)
    assert n_params(r20) / 1e6 == pytest.approx(0.27, rel=0.01)
    assert all(b.preact and b.depth == 3 for b in blocks(r164)) and len(blocks(r164)) == 54
    assert n_params(r164) / 1e6 == pytest.approx(1.7, rel=0.01)
    assert n_params(r20b) > n_params(r20)
    r20 = build_model(ModelConfig(arch="resnet20", weights="none"), 10)
    assert all(b.last_norm.weight.all() for b in blocks(r20))  # the paper's nets: no zero-init residual
    zero = build_model(ModelConfig(arch="resnet20", weights="none", zero_init_residual=True), 10)
    assert not any(b.last_norm.weight.any() for b in blocks(zero))
    plain = build_model(ModelConfig(arch="resnet20", weights="none", shortcut="none", norm="none"), 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


def test_torchvision_nets_build_exactly_as_before():
    """Configs and model.json files without the switches: the same resnet18 as the code before them built."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", weights="none"), 7)
    torch.manual_seed(0)
    before = torchvision.models.get_model("resnet18", weights=None, zero_init_residual=True)
    before.fc = torch.nn.Linear(before.fc.in_features, 7)
    a, b = model.state_dict(), before.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not model.layer1[0].bn2.weight.any()  # zero_init_residual stays on for torchvision nets


def test_torchvision_init_and_zero_init_switches():
    torch.manual_seed(0)
    he = build_model(ModelConfig(arch="resnet18", weights="none"), 3)
    xavier = build_model(ModelConfig(arch="resnet18", weights="none", init="xavier", zero_init_residual=False), 3)
    w = xavier.layer4[0].conv2.weight  # 512 x 512 x 3 x 3
    assert w.std().item() == pytest.approx((2 / (2 * 512 * 9)) ** 0.5, rel=0.03)
    assert he.layer4[0].conv2.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.03)
    assert xavier.layer1[0].bn2.weight.all()


def test_cifar_nets_normalize_with_the_datasets_statistics_even_from_a_weights_file(tmp_path):
    meta = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    path = tmp_path / "r20.pt"
    torch.save(build_model(ModelConfig(arch="resnet20", weights="none"), 10).state_dict(), path)
    cfg = ModelConfig(arch="resnet20", weights=str(path))
    assert normalization(cfg, meta) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    model = build_model(cfg, 4)  # a CIFAR net's weights file: all but the head loaded
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"]) and model.fc.out_features == 4
    with pytest.raises(ModelError, match="does not fit resnet20"):
        build_model(ModelConfig(arch="resnet20", weights=str(path), shortcut="projection"), 4)


def test_a_cifar_net_trains_at_32_px():
    """One SGD step of resnet20 at its native size: the loss is finite and the weights move."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet20", weights="none", image_size=32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.layer3[2].conv2.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(model.layer3[2].conv2.weight, before)


# every family, at its smallest, and the switches that change the weights' layout or (shortcut none) only the forward
ROUND_TRIPS = [
    {"arch": "resnet18"},
    {"arch": "resnet20"},
    {"arch": "plain20"},
    {"arch": "resnet20", "preact": True},
    {"arch": "resnet20", "block": "bottleneck", "preact": True, "shortcut": "projection"},
    {"arch": "resnet164"},
    {"arch": "resnet20", "shortcut": "none"},  # same weights as resnet20: only the stored switch tells them apart
    {"arch": "resnet20", "shortcut": "projection", "norm": "none"},
]


@pytest.mark.parametrize("switches", ROUND_TRIPS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_export_and_load_round_trip_with_the_switches(tmp_path, switches):
    from resnet_ray.checkpoint import export_model, save_training_state
    from resnet_ray.config import Config
    from resnet_ray.config_files import to_dict
    from resnet_ray.saved_model import load_model

    cfg = Config(model=ModelConfig(weights="none", image_size=32, **switches))
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.train()(torch.rand(4, 3, 32, 32))  # moves the BN running statistics
    model.eval()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    meta = {
        "arch": cfg.model.arch,
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "coarse_classes": None,
        "fine_to_coarse": None,
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "dataset": "digits",
        "epoch": 1,
        "metrics": [],
        "config": to_dict(cfg),
    }
    save_training_state(str(folder), {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, meta)
    loaded = load_model(export_model(str(folder), str(tmp_path / "model")))
    assert type(loaded.model) is type(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), atol=0, rtol=0)
    if switches.get("shortcut") == "none":  # the stored switch matters: built as resnet20 it computes otherwise
        plainless = build_model(ModelConfig(arch="resnet20", weights="none"), 3).eval()
        plainless.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plainless(x), model(x))


def test_saved_model_config_of_older_files_and_of_another_arch():
    from resnet_ray.config import Config
    from resnet_ray.config_files import to_dict
    from resnet_ray.model import saved_model_config

    old = to_dict(Config(model=ModelConfig(arch="resnet20", weights="none")))
    for key in ("shortcut", "block", "preact", "norm", "init", "zero_init_residual"):
        del old["model"][key]  # a model.json written before the switches existed
    assert saved_model_config({"arch": "resnet20", "config": old}) == ModelConfig(arch="resnet20", weights="none")
    other = to_dict(Config(model=ModelConfig(arch="resnet20", weights="none", shortcut="none")))
    assert saved_model_config({"arch": "resnet18", "config": other}) == ModelConfig(arch="resnet18", weights="none")
    assert saved_model_config({"arch": "resnet20", "config": other}).own("shortcut") == "none"
