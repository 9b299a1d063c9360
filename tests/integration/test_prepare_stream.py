"""Streaming prepare on the session's Ray: tasks on the cluster write the same dataset as local threads
(an image folder, and a Parquet source through its staging buckets)."""

import glob
import os

import pyarrow.parquet as pq
import pytest
from conftest import make_image_folder, make_parquet_source

from resnet_ray.config import DataConfig
from resnet_ray.data import layout, writer
from resnet_ray.data import prepare as prep

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_shards_on_ray_equal_shards_on_threads(ray_session, tmp_path, monkeypatch, kind):
    if kind == "imagefolder":
        source = make_image_folder(tmp_path / "src", corrupt={(1, 2)})
    else:
        source = make_parquet_source(tmp_path / "src", corrupt_rows={7})
    values = dict(source=kind, path=str(source), image_size=16, on_bad_image="skip")
    on_ray = []
    real = writer._run_on_ray
    monkeypatch.setattr(writer, "_run_on_ray", lambda *a, **k: on_ray.append(1) or real(*a, **k))
    monkeypatch.setattr(layout, "rows_per_shard", lambda size: 12)
    ray_dir = prep.prepare(DataConfig(root=str(tmp_path / "ray"), **values))
    assert on_ray  # the tasks ran on Ray
    monkeypatch.setattr(writer, "_ray_connected", lambda: False)
    thread_dir = prep.prepare(DataConfig(root=str(tmp_path / "threads"), **values))
    a, b = prep.read_metadata(ray_dir), prep.read_metadata(thread_dir)
    assert a["bad_images"] == b["bad_images"] and a["bad_images"]["count"] == 1
    for key in ("counts", "source_checksum", "classes", "mean", "std"):
        assert a[key] == b[key], key
    for split in a["counts"]:
        parts = [sorted(glob.glob(os.path.join(d, split, "*.parquet"))) for d in (ray_dir, thread_dir)]
        assert [os.path.basename(p) for p in parts[0]] == [os.path.basename(p) for p in parts[1]]
        for x, y in zip(*parts):
            assert pq.read_table(x).equals(pq.read_table(y))


def test_shard_tasks_that_never_finish_stop_with_a_diagnosis(ray_session, tmp_path, monkeypatch):
    from resnet_ray.watchdog import StallError

    source = make_image_folder(tmp_path / "src", per_class=(12, 12))
    monkeypatch.setattr(writer, "STALL_S", 0.001)  # no task can finish that fast
    with pytest.raises(StallError, match="prepare: no shard task finished in 0 s; free .* CPU"):
        prep.prepare(DataConfig(source="imagefolder", path=str(source), root=str(tmp_path / "root"), image_size=8))
    assert [e for e in os.listdir(tmp_path / "root" / "imagefolder") if not e.endswith(".lock")] == []
