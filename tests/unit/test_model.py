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
    from resnet_ray.config import load_config
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
