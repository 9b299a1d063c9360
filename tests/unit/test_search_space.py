"""A search's space is validated before any trial starts (the search itself: tests/integration/test_multinode_s3.py)."""

import pytest
from conftest import tiny_config

from resnet_ray.config import ConfigError
from resnet_ray.tune import validate_search_space


def test_search_space_values_are_validated_before_any_trial(data_root, tmp_path):
    cfg = tiny_config(
        data_root,
        str(tmp_path),
        **{"tune.search_space": {"optim.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}}},
    )
    with pytest.raises(ConfigError, match="tune.search_space.optim.momentum: 1.5 makes an invalid config"):
        validate_search_space(cfg)
