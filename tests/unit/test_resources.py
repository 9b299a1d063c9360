"""Resource checks on fake clusters: what fits, what is resized with a warning, what stops with the numbers."""

import logging
import os

import pytest

from resnet_ray.config_files import load_config
from resnet_ray.resources import ResourceError, check_training, size_actor_pool, trial_concurrency

ONE_2CPU = [{"CPU": 2.0, "memory": 8e9}]
GPU_NODES = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def test_training_workers_must_fit_on_nodes_that_have_their_resources():
    check_training(2, {"CPU": 1.0}, ONE_2CPU, streaming_reads=False)
    check_training(2, {"CPU": 1.0, "GPU": 1.0}, GPU_NODES, streaming_reads=False)
    with pytest.raises(ResourceError, match=r"3 workers x \{CPU: 1\} do not fit; at most 2 fit .*1 node: 2 CPU"):
        check_training(3, {"CPU": 1.0}, ONE_2CPU, streaming_reads=False)
    # 2 GPUs in the cluster, but a 2-GPU worker fits on no single node
    with pytest.raises(ResourceError, match=r"at most 0 fit .*2 nodes: 8 CPU \+ 1 GPU, 8 CPU \+ 1 GPU"):
        check_training(1, {"CPU": 1.0, "GPU": 2.0}, GPU_NODES, streaming_reads=False)


def test_streaming_training_reads_need_a_cpu_beside_the_workers():
    with pytest.raises(ResourceError, match="data.cache false"):
        check_training(2, {"CPU": 1.0}, ONE_2CPU, streaming_reads=True)
    check_training(2, {"CPU": 0.5}, ONE_2CPU, streaming_reads=True)


def test_actor_pool_never_takes_every_cpu_of_the_only_node(caplog):
    with caplog.at_level(logging.WARNING, logger="resnet_ray.resources"):
        pool = size_actor_pool(2, 1.0, 0.0, ONE_2CPU)
    assert pool.actors == 1  # 2 actors x 1 CPU would leave Ray Data's read task waiting forever
    assert "eval.num_actors: 2 actors" in caplog.text and "using 1" in caplog.text
    assert pool.threads == 2  # the one actor uses both cores once the reads are done


def test_actor_pool_that_fits_is_kept_and_gpu_actors_follow_the_gpus(caplog):
    with caplog.at_level(logging.WARNING, logger="resnet_ray.resources"):
        assert size_actor_pool(2, 1.0, 0.0, [{"CPU": 4.0}]).actors == 2
        assert size_actor_pool(2, 1.0, 1.0, GPU_NODES) == size_actor_pool(2, 1.0, 1.0, GPU_NODES)
        assert size_actor_pool(2, 1.0, 1.0, GPU_NODES).threads == 1
    assert caplog.text == ""
    assert size_actor_pool(4, 1.0, 1.0, GPU_NODES).actors == 2


def test_actor_pool_that_cannot_start_at_all_fails_with_the_numbers():
    with pytest.raises(ResourceError, match=r"eval: one actor needs \{CPU: 2\} and Ray Data's reads 1 CPU"):
        size_actor_pool(1, 2.0, 0.0, ONE_2CPU)
    with pytest.raises(ResourceError, match="GPU: 1"):
        size_actor_pool(1, 1.0, 1.0, [{"CPU": 16.0}])


def test_trial_concurrency_counts_each_trials_driver_and_workers(caplog):
    assert trial_concurrency(2, 1, {"CPU": 1.0}, [{"CPU": 4.0}], streaming_reads=False) == 2
    with caplog.at_level(logging.WARNING, logger="resnet_ray.resources"):
        assert trial_concurrency(2, 1, {"CPU": 1.0}, ONE_2CPU, streaming_reads=False) == 1
    assert "tune.max_concurrent_trials: 2 trials x 2 CPU" in caplog.text and "running 1 at a time" in caplog.text
    assert trial_concurrency(8, 1, {"CPU": 1.0, "GPU": 1.0}, GPU_NODES, streaming_reads=False) == 2
    with pytest.raises(ResourceError, match=r"one trial needs 3 CPU \(1 for its driver \+ 2 workers"):
        trial_concurrency(1, 2, {"CPU": 1.0}, [{"CPU": 2.5}], streaming_reads=False)


def cpu_recipes() -> list[str]:
    """The shipped training and search configs that train on CPUs (the others need a GPU)."""
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml") and n != "serve.yaml")
    return [n for n in names if not load_config(os.path.join(CONFIGS, n)).scaling.use_gpu]


@pytest.mark.parametrize("name", cpu_recipes())
def test_every_cpu_recipe_fits_a_two_core_machine_with_local(name, monkeypatch):
    """What `python jobs/<train|tune>.py --local --config configs/<name>` checks before it starts, on a 2-core
    machine and without --num-cpus: no refusal for any recipe meant for a CPU."""
    from resnet_ray.tune import local_cpus_for

    cfg = load_config(os.path.join(CONFIGS, name))
    monkeypatch.setenv("RESNET_RAY_NUM_CPUS", "2")  # this machine's cores, as runtime.local_cpus reads them
    streaming = not cfg.data.cache
    per_worker = cfg.scaling.resources_per_worker
    if name.startswith("tune-"):
        cpus = local_cpus_for(cfg)
        workers = cfg.tune.trial_workers or cfg.scaling.num_workers
        assert trial_concurrency(cfg.tune.max_concurrent_trials, workers, per_worker, [{"CPU": cpus}], streaming) >= 1
    else:
        check_training(cfg.scaling.num_workers, per_worker, [{"CPU": 2.0}], streaming)


def test_a_local_search_counts_each_trials_idle_driver_on_top_of_the_cores():
    from resnet_ray.resources import local_search_cpus

    cpus, line = local_search_cpus(2, 1, 1, {"CPU": 2.0}, streaming_reads=False)  # the degradation grid
    assert cpus == 3 and line.startswith("local mode: 3 logical CPUs, this machine's 2 cores for 1 trial(s)")
    assert local_search_cpus(4, 8, 1, {"CPU": 1.0}, streaming_reads=True)[0] == 4 + 3  # 3 trials' workers + reads
    assert local_search_cpus(8, 2, 1, {"CPU": 1.0}, streaming_reads=False)[0] == 8 + 2  # at most max_concurrent
