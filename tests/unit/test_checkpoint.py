"""Training checkpoints, exported models and load_model (no Ray)."""

import hashlib
import json
import os

import pytest
import torch

from resnet_ray import checkpoint as ckpt
from resnet_ray import saved_model as sm
from resnet_ray import weights
from resnet_ray.checkpoint import CheckpointError, export_model, load_training_state, save_training_state
from resnet_ray.config import Config, ModelConfig
from resnet_ray.config_files import to_dict
from resnet_ray.model import build_model
from resnet_ray.saved_model import SavedModel, load_model, temperature_of
from resnet_ray.weights import unwrap_state_dict

NUM_CLASSES = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def make_meta(epoch=2):
    return {
        "arch": "resnet18",
        "num_classes": NUM_CLASSES,
        "classes": ["a", "b", "c"],
        "coarse_classes": None,
        "fine_to_coarse": None,
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "dataset": "digits",
        "epoch": epoch,
        "metrics": [{"epoch": epoch, "val_top1": 0.5}],
        "config": to_dict(Config()),
    }


@pytest.fixture(scope="module")
def trained():
    """A resnet18 with non-default weights and BN statistics, and its state_dict."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", weights="none"), NUM_CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.train()
        model(torch.rand(4, 3, 32, 32))  # moves the running statistics
    return model.eval(), model.state_dict()


@pytest.fixture
def checkpoint(tmp_path, trained):
    """A training checkpoint folder saved with DDP-style ``module.`` keys."""
    _, state_dict = trained
    folder = tmp_path / "checkpoint_000002"
    folder.mkdir()
    model = {f"module.{k}": v for k, v in state_dict.items()}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    state = {"model": model, "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 7}, "epoch": 2}
    save_training_state(str(folder), state, make_meta())
    return str(folder)


def test_training_state_round_trip(checkpoint, trained):
    state, meta = load_training_state(checkpoint)
    assert meta == make_meta()
    assert state["epoch"] == 2 and state["scheduler"] == {"last_epoch": 7}
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    for k, v in trained[1].items():
        assert torch.equal(state["model"][f"module.{k}"], v), k
    assert SavedModel.read(checkpoint).config() == Config()


@pytest.mark.parametrize("missing", [ckpt.STATE, ckpt.META])
def test_load_training_state_missing_file_names_folder(checkpoint, missing):
    os.remove(os.path.join(checkpoint, missing))
    with pytest.raises(CheckpointError, match=missing) as info:
        load_training_state(checkpoint)
    assert checkpoint in str(info.value)


def test_load_training_state_corrupt_state(checkpoint):
    with open(os.path.join(checkpoint, ckpt.STATE), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_training_state(checkpoint)


def test_unwrap_state_dict_prefixes():
    t = torch.zeros(1)
    assert list(
        unwrap_state_dict(
            {"module.fc.weight": t, "_orig_mod.conv1.weight": t, "module._orig_mod.bn1.bias": t, "layer1.0.bn1.bias": t}
        )
    ) == ["fc.weight", "conv1.weight", "bn1.bias", "layer1.0.bn1.bias"]


def test_export_writes_model_and_info_with_matching_sha(checkpoint, tmp_path, trained):
    out = export_model(checkpoint, str(tmp_path / "run" / "model"))
    assert sorted(os.listdir(out)) == sorted([ckpt.MODEL, ckpt.MODEL_INFO])
    # readable like its run folder (not mkdtemp's 0700): other users of a shared file system can load it
    assert os.stat(out).st_mode & 0o777 == os.stat(tmp_path / "run").st_mode & 0o777
    with open(os.path.join(out, ckpt.MODEL_INFO)) as f:
        info = json.load(f)
    with open(os.path.join(out, ckpt.MODEL), "rb") as f:
        assert info["sha256"] == hashlib.sha256(f.read()).hexdigest()
    meta = make_meta()
    assert {k: v for k, v in info.items() if k != "sha256"} == meta
    weights = torch.load(os.path.join(out, ckpt.MODEL), weights_only=True)
    assert set(weights) == set(trained[1])  # DDP prefix stripped
    assert not any(k.startswith("module.") for k in weights)
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".export-")]


def test_export_replaces_an_existing_folder(checkpoint, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_model(checkpoint, str(out))
    assert sorted(os.listdir(out)) == sorted([ckpt.MODEL, ckpt.MODEL_INFO])


def test_load_model_from_export_checkpoint_and_run_folder_agree(checkpoint, tmp_path, trained):
    run = tmp_path / "run"
    export_model(checkpoint, str(run / "model"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained[0](x)
        outputs = {}
        for name, path in [("export", run / "model"), ("checkpoint", checkpoint), ("run", run)]:
            loaded = load_model(str(path))
            assert not loaded.model.training
            assert loaded.info["num_classes"] == NUM_CLASSES and loaded.info["arch"] == "resnet18"
            outputs[name] = loaded.model(x)
    assert load_model(str(run)).source == str(run / "model")
    assert load_model(checkpoint).source == checkpoint
    for out in outputs.values():
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_tampered_model_is_refused_before_torch_load(checkpoint, tmp_path, monkeypatch):
    out = export_model(checkpoint, str(tmp_path / "model"))
    path = os.path.join(out, ckpt.MODEL)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(out)
    assert calls == []


def test_load_model_uses_weights_only(checkpoint, tmp_path, monkeypatch):
    out = export_model(checkpoint, str(tmp_path / "model"))
    flags = []
    real_load = torch.load

    def spy(*args, **kwargs):
        flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(out)
    load_model(checkpoint)
    assert flags == [True, True]


def test_missing_model_pt_names_folder(checkpoint, tmp_path):
    out = export_model(checkpoint, str(tmp_path / "model"))
    os.remove(os.path.join(out, ckpt.MODEL))
    with pytest.raises(CheckpointError) as info:
        load_model(out)
    assert out in str(info.value)


def test_folder_without_model_names_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_model(str(empty))
    assert str(empty) in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_model(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)


def test_checkpoint_without_meta_names_folder(checkpoint):
    os.remove(os.path.join(checkpoint, ckpt.META))
    with pytest.raises(CheckpointError, match=ckpt.META) as info:
        load_model(checkpoint)
    assert checkpoint in str(info.value)


def test_model_json_with_other_num_classes_is_refused(checkpoint, tmp_path):
    out = export_model(checkpoint, str(tmp_path / "model"))
    info_path = os.path.join(out, ckpt.MODEL_INFO)
    with open(info_path) as f:
        info = json.load(f)
    info["num_classes"] = NUM_CLASSES + 2
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(CheckpointError, match="5 classes") as exc:
        load_model(out)
    assert out in str(exc.value)


def test_corrupt_model_json_raises_checkpoint_error(checkpoint, tmp_path):
    out = export_model(checkpoint, str(tmp_path / "model"))
    with open(os.path.join(out, ckpt.MODEL_INFO), "w") as f:
        f.write('{"arch": "resnet18", ')
    try:
        load_model(out)
    except CheckpointError:
        pass
    except Exception as exc:
        raise AssertionError(f"expected CheckpointError, got {type(exc).__name__}") from exc
    else:
        raise AssertionError("no error raised")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RESNET_RAY_CACHE", str(folder))
    return folder / "models"


def test_remote_model_is_fetched_once_per_node_and_cached_by_its_hash(
    checkpoint, tmp_path, trained, cache, monkeypatch
):
    run = tmp_path / "run"
    export_model(checkpoint, str(run / "model"))
    (run / "checkpoint_000002").mkdir()  # a run folder holds more than the model: none of it is fetched
    (run / "checkpoint_000002" / "state.pt").write_bytes(b"x" * 1000)
    sha = json.load(open(run / "model" / ckpt.MODEL_INFO))["sha256"]
    loaded = load_model(f"file://{run}")  # a run folder URI resolves to its model/
    assert loaded.source == f"file://{run}/model"
    assert os.listdir(cache) == [sha] and sorted(os.listdir(cache / sha)) == [ckpt.MODEL_INFO, ckpt.MODEL]
    for k, v in trained[1].items():
        assert torch.equal(loaded.model.state_dict()[k], v), k

    def no_download(*args):
        raise AssertionError("a cached model was downloaded again")

    monkeypatch.setattr(sm.storage, "download", no_download)
    monkeypatch.setattr(sm.storage, "file_sha256", no_download)
    assert load_model(f"file://{run}/model").info["sha256"] == sha  # from the cache, not hashed again


def test_a_fetch_killed_midway_is_swept_by_the_next_one_and_a_running_one_is_not(checkpoint, tmp_path, cache):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(cache / f".fetch-{int(dead.stdout)}-abc")  # its process was killed mid-download
    (cache / f".fetch-{int(dead.stdout)}-abc" / ckpt.MODEL).write_bytes(b"partial")
    os.makedirs(cache / f".fetch-{os.getpid()}-def")  # a download in progress (this process)
    out = export_model(checkpoint, str(tmp_path / "model"))
    sha = json.load(open(os.path.join(out, ckpt.MODEL_INFO)))["sha256"]
    load_model(f"file://{out}")
    assert sorted(os.listdir(cache)) == sorted([sha, f".fetch-{os.getpid()}-def"])


def test_remote_model_with_a_wrong_hash_is_refused_and_leaves_no_cache(checkpoint, tmp_path, cache):
    out = export_model(checkpoint, str(tmp_path / "model"))
    with open(os.path.join(out, ckpt.MODEL), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model(f"file://{out}")
    assert os.listdir(cache) == []  # neither an entry nor a temporary folder


def test_remote_training_checkpoint_loads_without_leaving_copies(checkpoint, trained, monkeypatch, tmp_path):
    monkeypatch.setattr(sm.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    loaded = load_model(f"file://{checkpoint}")
    assert loaded.info["epoch"] == 2 and os.listdir(tmp_path / "tmp") == []
    assert SavedModel.read(f"file://{checkpoint}").config() == Config()


# ---------------------------------------------------------------------------
# a pickle payload posing as model.pt: refused in one line, and no code in it runs


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious model.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload_model(folder, marker) -> str:
    """An exported-model folder whose model.pt is a payload, with its true SHA-256 in a valid model.json."""
    os.makedirs(folder)
    path = os.path.join(folder, ckpt.MODEL)
    torch.save({"fc.weight": Payload(marker)}, path)
    info = {**make_meta(), "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    with open(os.path.join(folder, ckpt.MODEL_INFO), "w") as f:
        json.dump(info, f)
    return str(folder)


def test_a_pickle_payload_as_model_pt_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = _payload_model(tmp_path / "evil", marker)
    for load in (SavedModel.verified, load_model):
        with pytest.raises(CheckpointError) as error:
            load(folder)
        message = str(error.value)
        assert message.startswith(os.path.join(folder, ckpt.MODEL) + ": not a weights-only state_dict")
        assert "asks to run code" in message and "\n" not in message
    assert not marker.exists()
    # the same payload as a training checkpoint's state.pt, and as a model.weights file
    os.makedirs(tmp_path / "checkpoint")
    os.replace(os.path.join(folder, ckpt.MODEL), tmp_path / "checkpoint" / ckpt.STATE)
    with open(tmp_path / "checkpoint" / ckpt.META, "w") as f:
        json.dump(make_meta(), f)
    with pytest.raises(CheckpointError, match="asks to run code") as error:
        load_training_state(str(tmp_path / "checkpoint"))
    assert "\n" not in str(error.value)
    from resnet_ray.model import ModelError, read_weights_file

    with pytest.raises(ModelError, match="asks to run code") as error:
        read_weights_file(str(tmp_path / "checkpoint" / ckpt.STATE))
    assert "\n" not in str(error.value) and not marker.exists()


def test_a_weights_file_of_other_objects_is_refused(tmp_path):
    folder = tmp_path / "lists"
    _payload_model(folder, tmp_path / "unused")
    path = folder / ckpt.MODEL
    torch.save([torch.zeros(1)], path)
    info = json.load(open(folder / ckpt.MODEL_INFO))
    info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    json.dump(info, open(folder / ckpt.MODEL_INFO, "w"))
    with pytest.raises(CheckpointError, match="not a state_dict"):
        SavedModel.verified(str(folder))


def test_the_evaluation_job_refuses_a_payload_in_one_line(tmp_path, monkeypatch, capsys):
    """jobs/evaluate.py on the payload: exit status 2 and one line on stderr naming model.pt; nothing ran."""
    import runpy
    import sys

    from resnet_ray import runtime

    marker = tmp_path / "ran"
    folder = _payload_model(tmp_path / "evil", marker)
    monkeypatch.setattr(runtime, "init_ray", lambda **kwargs: None)  # the refusal comes before any Ray work
    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py", "--local", "--model", folder])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(root, "jobs", "evaluate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {os.path.join(folder, ckpt.MODEL)}: ")
    assert not marker.exists()


def test_temperature_of_old_and_bad_model_json():
    assert temperature_of(make_meta()) == 1.0  # exported before temperature scaling
    assert temperature_of({"temperature": 2}) == 2.0
    for bad in (0, -1.0, "2", float("nan"), True):
        with pytest.raises(CheckpointError, match="m/model.json: temperature must be a number > 0"):
            temperature_of({"temperature": bad}, "m/model.json")


def test_weights_saved_in_the_legacy_format_still_load(checkpoint, tmp_path):
    """weights.load(mmap=True), the check of SavedModel.verified, falls back to a plain load for pre-zip files."""
    out = export_model(checkpoint, str(tmp_path / "model"))
    path = os.path.join(out, ckpt.MODEL)
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    info = json.load(open(os.path.join(out, ckpt.MODEL_INFO)))
    info["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(info, open(os.path.join(out, ckpt.MODEL_INFO), "w"))
    assert SavedModel.verified(out).info["sha256"] == info["sha256"]
    assert set(weights.load(path, mmap=True)) == set(load_model(out).model.state_dict())
