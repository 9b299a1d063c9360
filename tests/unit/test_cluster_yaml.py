"""cluster.yaml: valid for Ray's own launcher schema, secure by default, and big enough for every shipped config."""

import copy
import glob
import math
import os

import pytest
import yaml

from resnet_ray.config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_rays_schema_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_validation_is_not_a_rubber_stamp(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_1x"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_only_ssh_is_open_and_dashboard_binds_to_localhost(cluster):
    ports = [(p["FromPort"], p["ToPort"]) for p in cluster["provider"]["security_group"]["IpPermissions"]]
    assert ports == [(22, 22)]
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--num-cpus=0" in head


def _worker_types(cluster):
    return [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]


def _slots(cluster, cpus, gpus):
    """How many (cpus, gpus) bundles the cluster can hold at its maximum size."""
    total = 0
    for node in _worker_types(cluster):
        res = node["resources"]
        per_node = math.floor(res.get("CPU", 0) / cpus) if cpus else math.inf
        if gpus:
            per_node = min(per_node, math.floor(res.get("GPU", 0) / gpus))
        total += node["max_workers"] * (per_node if per_node != math.inf else 1)
    return total


CONFIGS = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))) if "local" not in os.path.basename(p)]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_node_types_can_hold_every_shipped_config(cluster, path):
    cfg = load_config(path)
    s = cfg.scaling
    gpus = s.gpus_per_worker if s.use_gpu else 0
    # a search's trials at once, and the full-length run (best_config.yaml) on its own
    trials = (cfg.tune.trial_workers or s.num_workers) * cfg.tune.max_concurrent_trials if cfg.tune.search_space else 0
    assert _slots(cluster, s.cpus_per_worker, gpus) >= max(s.num_workers, trials), path
    # at least one node type fits a single worker, and the resource keys are integers as Ray requires
    assert any(
        n["resources"].get("CPU", 0) >= s.cpus_per_worker and n["resources"].get("GPU", 0) >= gpus
        for n in _worker_types(cluster)
    )
    if cfg.eval.gpus_per_actor:
        assert _slots(cluster, cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor) >= cfg.eval.num_actors
    for node in cluster["available_node_types"].values():
        assert all(isinstance(v, int) for v in node["resources"].values())


def test_a_run_of_four_gpu_workers_fits_on_one_node(cluster):
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10.yaml"))
    assert any(
        n["resources"].get("GPU", 0) >= cfg.scaling.num_workers
        and n["resources"]["CPU"] >= cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        for n in _worker_types(cluster)
    )


def test_spot_workers_have_an_on_demand_twin_and_the_head_is_on_demand(cluster):
    """Drivers and Train controllers stay on the on-demand head; each spot type has an on-demand type of the same
    shape that Ray's autoscaler takes once the spot type is at its max_workers (on equal fit it takes the type
    whose name sorts last: the spot one first)."""
    types = cluster["available_node_types"]

    def spot(node):
        return node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"

    assert not spot(types[cluster["head_node_type"]])
    spot_types = [name for name, node in types.items() if spot(node)]
    assert spot_types
    for name in spot_types:
        twins = [
            other
            for other, node in types.items()
            if not spot(node) and other != cluster["head_node_type"] and node["resources"] == types[name]["resources"]
        ]
        assert twins and all(name > twin for twin in twins), (name, twins)
    assert any("resnet_ray.spot_watch" in command for command in cluster["worker_start_ray_commands"])
