"""Rank splitting: equal batch counts on every rank, disjoint coverage, decode checks."""

from __future__ import annotations

import pytest
from conftest import write_toy

from ood_ray.data.manifest import Manifest
from ood_ray.data.streams import (
    batches_per_epoch,
    eval_batches,
    outlier_batches,
    plan_epoch,
    samples_per_rank,
    train_batches,
)


def keys_of(batches):
    out, count = [], 0
    for _x, _y, k in batches:
        out.extend(k)
        count += 1
    return out, count


@pytest.mark.parametrize("n,maxcount", [(95, 10), (40, 10), (33, 16), (25, 100)])
def test_two_ranks_equal_batches_and_disjoint(tmp_path, n, maxcount):
    m = write_toy(tmp_path, n=n, maxcount=maxcount)
    world, bs = 2, 4
    for epoch in range(3):
        expected = batches_per_epoch(m, world, bs, epoch)
        per_rank = [keys_of(train_batches(m, r, world, bs, epoch)) for r in range(world)]
        counts = [c for _, c in per_rank]
        assert counts == [expected] * world
        k0, k1 = (set(k) for k, _ in per_rank)
        assert not k0 & k1, "a sample went to both ranks"
        assert all(len(set(k)) == len(k) for k, _ in per_rank), "a sample repeated within an epoch"
        # coverage: only each rank's surplus over the smallest rank plus a partial batch is skipped
        spr = samples_per_rank(m, world, epoch)
        assert len(k0 | k1) == world * expected * bs
        assert n - len(k0 | k1) <= sum(s - min(spr) for s in spr) + world * (bs - 1)


def test_plan_covers_every_sample_once(tmp_path):
    m = write_toy(tmp_path, n=57, maxcount=10)  # 6 shards: 3 rounds of 2 ranks? no: 6 % 4 = 2 shared
    for world in (1, 2, 3, 4):
        assert sum(samples_per_rank(m, world, epoch=1)) == 57
        got = []
        for r in range(world):
            got += [k for _, _, ks in eval_batches(m, r, world, 8) for k in ks]
        assert sorted(got) == sorted(f"{i:07d}" for i in range(57))


def test_epochs_reshuffle(tmp_path):
    m = write_toy(tmp_path, n=60, maxcount=10)
    a, _ = keys_of(train_batches(m, 0, 2, 4, epoch=0))
    b, _ = keys_of(train_batches(m, 0, 2, 4, epoch=1))
    a2, _ = keys_of(train_batches(m, 0, 2, 4, epoch=0))
    assert a == a2, "same epoch and seed must give the same order"
    assert a != b


def test_plan_is_deterministic_across_processes(tmp_path):
    m = write_toy(tmp_path, n=60, maxcount=10)
    assert plan_epoch(m, 1, 2, epoch=3, seed=5) == plan_epoch(Manifest.load(m.path), 1, 2, epoch=3, seed=5)


def test_outlier_stream_is_endless_and_rank_disjoint(tmp_path):
    m = write_toy(tmp_path, n=30, maxcount=10, role="outlier")
    streams = [outlier_batches(m, r, 2, 8) for r in range(2)]
    seen = [set(), set()]
    for _ in range(10):  # 80 samples per rank > 15 available: must wrap around
        for r in range(2):
            x, y, k = next(streams[r])
            assert x.shape == (8, 1, 8, 8) and (y == -1).all()
            seen[r].update(k)
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 30


def test_loader_workers_give_same_batch_count(tmp_path):
    m = write_toy(tmp_path, n=90, maxcount=10)
    n = batches_per_epoch(m, 2, 4, 0)
    _, c = keys_of(train_batches(m, 0, 2, 4, 0, loader_workers=2))
    assert c == n


def test_too_small_for_world(tmp_path):
    m = write_toy(tmp_path, n=5, maxcount=10)
    with pytest.raises(ValueError, match="too few"):
        batches_per_epoch(m, 2, 4)


def _count_batches_per_worker(config):
    """Runs on each Ray Train worker: one epoch of the project's stream, keys written per rank."""
    import json

    import ray.train

    from ood_ray.data.manifest import Manifest
    from ood_ray.data.streams import train_batches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    m = Manifest.load(config["manifest"])
    for epoch in range(2):
        keys = [k for _, _, ks in train_batches(m, rank, world, config["batch"], epoch) for k in ks]
        with open(f"{config['out']}/rank{rank}-epoch{epoch}.json", "w") as f:
            json.dump(keys, f)
        ray.train.report({"epoch": epoch})  # a barrier: would hang if a rank had fewer batches


def test_two_ray_train_workers_get_equal_disjoint_batches(ray_session, tmp_path):
    """Real Ray Train, 2 workers, uneven shards (9 shards of 10 + 1 of 7)."""
    import json
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    m = write_toy(tmp_path / "shards", n=97, maxcount=10)
    out = tmp_path / "keys"
    out.mkdir()
    trainer = TorchTrainer(
        _count_batches_per_worker,
        train_loop_config={"manifest": m.path, "batch": 8, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="equal-batches"),
    )
    trainer.fit()
    for epoch in range(2):
        k0, k1 = (json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2))
        assert len(k0) == len(k1) == batches_per_epoch(m, 2, 8, epoch) * 8
        assert not set(k0) & set(k1)
        assert len(set(k0) | set(k1)) >= 97 - 2 * 8 - 10  # skipped: a partial batch per rank + imbalance


def test_counted_shares_equal_the_plan():
    """``samples_per_rank`` (O(shards), used for every epoch's batch count) equals what the plan
    of each rank keeps, over random shard counts, world sizes and epochs."""
    import numpy as np

    from ood_ray.data.manifest import Manifest
    from ood_ray.data.streams import plan_epoch, samples_per_rank

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, world = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        m = Manifest.from_dict({"name": "x", "role": "train", "image_size": [8, 8], "mode": "L", "class_names": ["a"], "shards": [{"url": f"/s{i}.tar", "count": int(rng.integers(0, 40))} for i in range(n)]})
        for epoch in range(3):
            planned = [sum(sum(1 for j in range(t.count) if t.keeps(j)) for t in plan_epoch(m, r, world, epoch, 5)) for r in range(world)]
            assert samples_per_rank(m, world, epoch, 5) == planned
