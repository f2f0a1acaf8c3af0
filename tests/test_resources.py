"""Fractional GPUs and CPUs per worker: what a sweep asks Tune and Train for, and how many trials
share a device. No Ray is started: the requests are read from the objects handed to Ray."""

from __future__ import annotations

import pytest
from conftest import make_sweep

from ood_ray.config import ConfigError
from ood_ray.data.manifest import Benchmark
from ood_ray.ray_train import make_trainer
from ood_ray.tuning.sweep import plan_concurrency, trial_resources


@pytest.mark.parametrize("gpus,trials_per_gpu", [(0.25, 4), (0.5, 2), (1.0, 1)])
def test_one_worker_trials_share_a_gpu(tmp_path, digits_ood, gpus, trials_per_gpu):
    sweep = make_sweep(tmp_path, digits_ood, "softmax", trial_runner="tune", num_trials=8, base={"cpus_per_worker": 1.0}).validate()
    assert trial_resources(sweep, gpus) == {"CPU": 1.0, "GPU": gpus}  # the Tune trial actor is the worker
    assert plan_concurrency(sweep, {"CPU": 16, "GPU": 1}, gpus) == trials_per_gpu
    assert plan_concurrency(sweep, {"CPU": 16, "GPU": 2}, gpus) == 2 * trials_per_gpu
    assert plan_concurrency(sweep, {"CPU": 2, "GPU": 1}, gpus) == min(2, trials_per_gpu)  # CPUs bound it too


def test_train_trials_ask_each_worker_for_its_share(tmp_path, digits_ood):
    sweep = make_sweep(tmp_path, digits_ood, "softmax", trial_runner="train", num_trials=8, base={"num_workers": 2, "cpus_per_worker": 0.5}).validate()
    assert trial_resources(sweep, 0.5) == {"CPU": sweep.trial_cpus}  # the trial driver; workers reserve their own
    # two workers × 0.5 GPU = one GPU per trial; × 0.25 = two trials per GPU
    assert plan_concurrency(sweep, {"CPU": 16, "GPU": 1}, 0.5) == 1
    assert plan_concurrency(sweep, {"CPU": 16, "GPU": 1}, 0.25) == 2
    with pytest.raises(ConfigError, match="gpus_per_worker=0.75 x num_workers=2 needs 1.5 GPUs per trial; the cluster has 1"):
        plan_concurrency(sweep, {"CPU": 16, "GPU": 1}, 0.75)
    trainer = make_trainer(sweep.base, "t", [], gpus_per_worker=0.25, bench=Benchmark.load(digits_ood))
    sc = trainer.scaling_config
    assert sc.use_gpu and sc.num_workers == 2 and sc.resources_per_worker == {"CPU": 0.5, "GPU": 0.25}
    assert sc.total_resources == {"CPU": 1.0, "GPU": 0.5}
    cpu_only = make_trainer(sweep.base, "t", [], gpus_per_worker=0.0, bench=Benchmark.load(digits_ood)).scaling_config
    assert not cpu_only.use_gpu and cpu_only.resources_per_worker == {"CPU": 0.5}
