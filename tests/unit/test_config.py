import glob
import os

import pytest

from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError
from resnet_ray.config_files import from_dict, load_config, parse_overrides, replace, to_dict, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.5\n  name: adamw\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["--optim.lr", "0.01", "--train.amp=false", "--data.classes", "[a, b]"])
    assert cfg.optim.lr == 0.01 and cfg.optim.name == "adamw"
    assert cfg.train.epochs == 3 and cfg.train.amp is False
    assert cfg.data.classes == ("a", "b")
    assert cfg.model.arch == "resnet50"  # untouched default


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(
        None,
        {
            "optim.lr": 0.2,
            "data.classes": ["x"],
            "tune.search_space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        },
    )
    assert from_dict(to_dict(cfg)) == cfg
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["--optim.lr", "1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["--train.epochs", "2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optim.lr", "-0.1"], "optim.lr: must be > 0"),
        (["--train.batch_size", "0"], "train.batch_size: must be >= 1"),
        (["--scaling.num_workers", "0"], "scaling.num_workers: must be >= 1"),
        (["--data.source", "mnist"], "data.source: 'mnist' is not one of 'digits', 'cifar10'"),
        (["--optim.name", "lamb"], "optim.name: 'lamb' is not one of 'sgd', 'adamw'"),
        (["--optim.lrr", "0.1"], "optim.lrr: unknown key; allowed: name, lr,"),
        (["--nosection.x", "1"], "nosection: unknown key"),
        (["--train.amp", "maybe"], "train.amp: expected true/false"),
        (["--data.source", "parquet"], "data.path: is required for data.source='parquet'"),
        (["--data.val_fraction", "0.7"], "data.val_fraction: must be in"),
        (["--train.freeze_backbone_epochs", "50"], "train.freeze_backbone_epochs"),
        (["--eval.split", "dev"], "eval.split: 'dev' is not one of"),
        (["--eval.in_process_rows", "-1"], "eval.in_process_rows: must be >= 0 or null"),
        (["--optim.lr"], "--optim.lr: is missing its value"),
        (["optim.lr", "1"], "expected --section.field VALUE"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_unknown_yaml_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        load_config(write(tmp_path, "model:\n  depth: 50\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_a_config_builds_on_its_base_field_by_field(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "recipe.yaml").write_text("optim:\n  lr: 0.5\n  name: adamw\ntrain:\n  epochs: 15\n")
    path = write(tmp_path, "base: recipes/recipe.yaml\noptim:\n  lr: 0.1\ntune:\n  max_epochs: 3\n")
    cfg = load_config(path, ["--train.batch_size", "16"])
    assert (cfg.optim.lr, cfg.optim.name) == (0.1, "adamw")  # this file's field over its base's, per field
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.tune.max_epochs) == (15, 16, 3)
    assert "base" not in to_dict(cfg)  # saved configs are whole: a run folder's config.yaml needs no other file
    with pytest.raises(ConfigError, match=r"missing.yaml: not found \(the base of .*c.yaml\)"):
        load_config(write(tmp_path, "base: missing.yaml\n"))
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(write(tmp_path, "base: c.yaml\n"))


def test_shipped_searches_build_on_their_recipes_and_keep_its_length():
    for name in ("cifar10", "cifar100"):
        recipe = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        search = load_config(os.path.join(ROOT, "configs", f"tune-{name}.yaml"))
        assert from_dict({**to_dict(search), "tune": to_dict(recipe)["tune"]}) == recipe  # only the search differs
        assert search.tune.trial_workers == 1 and search.tune.max_epochs < recipe.train.epochs


def test_search_space_is_validated():
    bad = {"tune.search_space": {"optim.nope": {"type": "uniform", "low": 0, "high": 1}}}
    with pytest.raises(ConfigError, match="tune.search_space.optim.nope: unknown field"):
        load_config(None, bad)
    bad = {"tune.search_space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}}
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        load_config(None, bad)


def test_replace_validates():
    cfg = Config()
    assert replace(cfg, {"optim.lr": 0.3}).optim.lr == 0.3
    with pytest.raises(ConfigError, match="optim.lr"):
        replace(cfg, {"optim.lr": 0.0})


def test_parse_overrides_types():
    assert parse_overrides(["--a.b", "3", "--a.c=null", "--a.d", "[1, 2]", "--a.e", "text"]) == {
        "a.b": 3,
        "a.c": None,
        "a.d": [1, 2],
        "a.e": "text",
    }


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_checkpoint_cadence_about_ten_per_run_and_always_the_last_epoch():
    from resnet_ray.config import TrainConfig

    assert [e for e in range(1, 115) if TrainConfig(epochs=114).checkpoint_due(e)] == [
        12,
        24,
        36,
        48,
        60,
        72,
        84,
        96,
        108,
        114,
    ]
    assert [e for e in range(1, 4) if TrainConfig(epochs=3).checkpoint_due(e)] == [1, 2, 3]
    assert [e for e in range(1, 6) if TrainConfig(epochs=5, checkpoint_every=2).checkpoint_due(e)] == [2, 4, 5]
    with pytest.raises(ConfigError, match="train.checkpoint_every: must be >= 1"):
        load_config(None, {"train.checkpoint_every": 0})


def test_jobs_read_a_config_from_a_uri(tmp_path):
    from resnet_ray import cli

    (tmp_path / "best_config.yaml").write_text("optim:\n  lr: 0.123\n")
    args = cli.parse(cli.parser("x"), ["--config", f"file://{tmp_path}/best_config.yaml", "--train.epochs", "3"])
    cfg = cli.config_from(*args)
    assert cfg.optim.lr == 0.123 and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="missing.yaml: not found"):
        cli.config_from(*cli.parse(cli.parser("x"), ["--config", f"file://{tmp_path}/missing.yaml"]))


# ---------------------------------------------------------------------------
# model switches and the step schedule (He et al. 2016a/b)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.arch": "resnet56"},
            "model.weights: imagenet weights exist only for resnet18, resnet34, resnet50 (torchvision); use none for "
            "resnet56",
        ),
        (
            {"model.arch": "resnet18", "model.block": "bottleneck"},
            "model.block: bottleneck cannot apply to torchvision ",
        ),
        ({"model.arch": "resnet50", "model.block": "basic"}, "model.block: basic cannot apply to torchvision resnet50"),
        ({"model.arch": "resnet18", "model.shortcut": "none"}, "model.shortcut: none cannot apply to torchvision"),
        ({"model.arch": "resnet34", "model.shortcut": "identity"}, "model.shortcut: identity cannot apply"),
        ({"model.arch": "resnet18", "model.preact": True}, "model.preact: cannot apply to torchvision resnet18"),
        ({"model.arch": "resnet50", "model.norm": "none"}, "model.norm: none cannot apply to torchvision resnet50"),
        (
            {"model.arch": "resnet20", "model.weights": "none", "model.norm": "none", "model.zero_init_residual": True},
            "model.zero_init_residual: needs model.norm batch",
        ),
        (
            {"model.arch": "plain20", "model.weights": "none", "model.zero_init_residual": True},
            "model.zero_init_residual: needs shortcuts",
        ),
        (
            {"model.arch": "resnet32", "model.weights": "none", "model.block": "bottleneck"},
            "model.block: bottleneck blocks stack 9n+2 layers; resnet32 has 32",
        ),
        ({"model.arch": "resnet20", "model.weights": "none", "model.shortcut": "C"}, "model.shortcut: 'C' is not one"),
        ({"model.arch": "resnet20", "model.weights": "none", "model.norm": "layer"}, "model.norm: 'layer' is not one"),
        ({"model.arch": "resnet20", "model.weights": "none", "model.init": "lecun"}, "model.init: 'lecun' is not one"),
        (
            {"model.arch": "resnet20", "model.weights": "none", "model.preact": "yes"},
            "model.preact: expected true/false",
        ),
        ({"model.arch": "resnet19"}, "model.arch: 'resnet19' is not one of"),
        ({"optim.schedule": "poly"}, "optim.schedule: 'poly' is not one of 'cosine', 'step'"),
        ({"optim.schedule": "step"}, "optim.milestones: the step schedule needs at least one"),
        ({"optim.milestones": [0.5]}, "optim.milestones: only the step schedule has milestones"),
        ({"optim.schedule": "step", "optim.milestones": [0.75, 0.5]}, "optim.milestones: must increase"),
        ({"optim.schedule": "step", "optim.milestones": [0.5, 0.5]}, "optim.milestones: must increase"),
        ({"optim.schedule": "step", "optim.milestones": [32000]}, "optim.milestones: must be fractions"),
        ({"optim.schedule": "step", "optim.milestones": 0.5}, "optim.milestones: expected a list"),
        ({"optim.schedule": "step", "optim.milestones": [0.5], "optim.gamma": 0}, "optim.gamma: must be in (0, 1]"),
    ],
)
def test_model_switches_and_schedules_refuse_what_cannot_apply_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_null_switches_are_the_archs_own_and_older_configs_load_unchanged():
    from resnet_ray.architectures import ARCHS
    from resnet_ray.config import ModelConfig

    old = to_dict(Config())
    for key in ("shortcut", "block", "preact", "norm", "init", "zero_init_residual"):
        del old["model"][key]  # a config.yaml / model.json written before the switches existed
    for key in ("schedule", "milestones", "gamma"):
        del old["optim"][key]
    assert from_dict(old) == Config()
    own = {
        arch: tuple(ModelConfig(arch=arch, weights="none").own(k) for k in ("shortcut", "block", "preact"))
        for arch in ARCHS
    }
    assert own["resnet18"] == own["resnet34"] == ("projection", "basic", False)
    assert own["resnet50"] == ("projection", "bottleneck", False)
    assert own["resnet20"] == own["resnet110"] == ("identity", "basic", False)
    assert own["plain56"] == ("none", "basic", False)
    assert own["resnet164"] == ("projection", "bottleneck", True)
    assert ModelConfig(arch="resnet50").own("zero_init_residual") is True  # torchvision: as before
    assert ModelConfig(arch="resnet20", weights="none").own("zero_init_residual") is False  # the paper
    resolved = ModelConfig(arch="plain20", weights="none", preact=True).resolved()
    assert (resolved.shortcut, resolved.block, resolved.preact, resolved.zero_init_residual) == (
        "none",
        "basic",
        True,
        False,
    )
    cfg = load_config(None, {"model.arch": "resnet20", "model.weights": "none", "model.shortcut": "projection"})
    assert from_dict(to_dict(cfg)) == cfg and cfg.model.shortcut == "projection"


def test_the_paper_recipe_is_he_et_al_section_4_2():
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10-resnet-paper.yaml"))
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.arch, m.weights, m.image_size, m.own("shortcut"), m.init) == ("resnet20", "none", 32, "identity", "he")
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 0.9, False, 1e-4)
    assert (o.schedule, o.milestones, o.gamma, o.warmup_epochs, o.label_smoothing) == ("step", (0.5, 0.75), 0.1, 0, 0)
    assert cfg.global_batch_size == o.reference_batch_size == 128
    assert (t.augment, t.crop_padding, t.hflip, t.ema_decay, cfg.data.val_fraction) == ("crop", 4, True, None, 0.1)
    steps = 45000 // 128 * t.epochs  # 351 steps per epoch on the 45k split
    assert steps == pytest.approx(64000, rel=0.01)
    cpu = load_config(os.path.join(ROOT, "configs", "cifar10-resnet-cpu.yaml"))
    assert not cpu.scaling.use_gpu and cpu.scaling.num_workers == 1 and cpu.scaling.cpus_per_worker == 2
    assert 15 <= cpu.train.epochs <= 30 and cpu.model == cfg.model
    assert cpu.optim.warmup_epochs * 351 == pytest.approx(200, rel=0.05)
    assert {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))} >= {
        "cifar10-resnet-paper.yaml",
        "cifar10-resnet-cpu.yaml",
    }  # so test_every_shipped_config_parses covers them
