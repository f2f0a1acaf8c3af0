"""PBT sweeps: a poor trial continues from a good trial's checkpoint with perturbed values, on real
Ray Tune, a real sqlite MLflow and the digits-ood shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import child_runs, make_sweep
from mlflow.tracking import MlflowClient

from ood_ray.config import ConfigError
from ood_ray.tuning.pbt import Clip, make_pbt, mutable_params, space_distributions
from ood_ray.tuning.sweep import run_sweep


def test_pbt_settings_are_checked_and_the_mutations_come_from_the_space(digits_ood, tmp_path):
    with pytest.raises(ConfigError, match="scheduler='pbt'.*--trial-runner tune"):
        make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pbt", pbt_interval=1, trial_runner="train").validate()
    with pytest.raises(ConfigError, match=r"pbt_interval=2: .*\[1, epochs - 1 = 1\]"):
        make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pbt").validate()  # 2 epochs: nothing after the last
    with pytest.raises(ConfigError, match="scheduler='pb2'.*--trial-runner tune"):
        make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pb2", pbt_interval=1, trial_runner="train").validate()
    with pytest.raises(ConfigError, match=r"pbt_interval=2: "):
        make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pb2").validate()
    with pytest.raises(ConfigError, match="scheduler='hyperband'"):
        make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="hyperband").validate()
    assert make_sweep(tmp_path, digits_ood, "softmax", asha=False).validate().scheduler_kind == "none"  # --no-asha as before
    assert make_sweep(tmp_path, digits_ood, "softmax").validate().scheduler_kind == "asha"
    # floats of the method's search space; the confidence λ only seeds its state, so it stays
    assert mutable_params("logitnorm", space_distributions("logitnorm", 0.05)) == ["tau"]
    assert mutable_params("confidence", space_distributions("confidence", 0.05)) == ["budget"]
    assert mutable_params("dismax", space_distributions("dismax", 0.05)) == ["entropic_scale"]  # α is categorical
    scheduler, _, space = make_pbt(make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pbt", base={"epochs": 4}).validate())
    assert set(scheduler._hyperparam_mutations) == {"lr", "method_params"} and set(space["method_params"]) == {"tau"}
    assert Clip({"lr": (0.005, 0.2), "tau": (0.005, 0.5)})({"lr": 0.24, "method_params": {"tau": 0.004}}) == {"lr": 0.2, "method_params": {"tau": 0.005}}


class Member:
    """What PB2's explore step reads of a trial: its name and config (no Ray needed)."""

    def __init__(self, name: str, config: dict):
        self.name, self.config = name, config

    def __str__(self) -> str:
        return self.name


@pytest.mark.filterwarnings("ignore:The optimal value found:sklearn.exceptions.ConvergenceWarning")
def test_pb2_chooses_new_values_within_the_spaces_ranges_once_it_has_data(digits_ood, tmp_path):
    # the population's reward history as Ray's PB2 keeps it (one row per report): two trials that
    # reported at epochs 1-3 with fixed values. The GP then picks the poor trial's new values
    import pandas as pd

    scheduler, _, _ = make_pbt(make_sweep(tmp_path, digits_ood, "logitnorm", scheduler="pb2", base={"epochs": 6, "lr": 0.01}).validate())
    assert type(scheduler).__name__ == "SweepPB2" and scheduler._hyperparam_bounds == {"lr": [0.001, 0.04], "method_params": {"tau": [0.005, 0.5]}}
    good = Member("good", {"lr": 0.02, "weight_decay": 5e-4, "method_params": {"tau": 0.1}})
    poor = Member("poor", {"lr": 0.002, "weight_decay": 5e-4, "method_params": {"tau": 0.3}})
    rows = [[m.name, t, m.config["lr"], m.config["method_params"]["tau"], r] for m, rewards in ((good, (0.5, 0.7, 0.8)), (poor, (0.2, 0.25, 0.3))) for t, r in zip((1, 2, 3), rewards, strict=True)]
    scheduler.data = pd.DataFrame(rows, columns=["Trial", "Time", "lr", "method_params/tau", "Reward"])
    chosen = [scheduler._get_new_config(poor, good)[0] for _ in range(3)]
    for config in chosen:
        assert 0.001 <= config["lr"] <= 0.04 and 0.005 <= config["method_params"]["tau"] <= 0.5
        assert config["weight_decay"] == 5e-4  # not among the values PB2 changes
    assert any((c["lr"], c["method_params"]["tau"]) != (0.02, 0.1) for c in chosen)  # not a copy of the donor's


def last_at(client, run_id, key, step):
    """The latest value of a metric at ``step`` (an epoch trained again after an exploit has two)."""
    return max((m for m in client.get_metric_history(run_id, key) if m.step == step), key=lambda m: m.timestamp).value


@pytest.mark.parametrize("scheduler", ["pbt", "pb2"])
def test_pbt_exploit_continues_from_the_donors_checkpoint(ray_session, digits_ood, tmp_path, scheduler):
    # a good trial (lr 0.005: val accuracy 0.4, 0.7 after epochs 1, 2) and one that cannot learn
    # (lr 1e-7: 0.1-0.2); the accuracy guard makes the objective rank them by accuracy. Only one
    # fits the 2 CPUs at a time (1.5 each), so PBT has them take turns epoch by epoch, whichever
    # starts first: once both have reported, the poor one continues from the good one's checkpoint
    # with perturbed lr and τ (ranges: lr in [0.001, 0.04] around the base 0.01)
    good = {"lr": 0.005, "weight_decay": 5e-4, "tau": 0.04}
    bad = {"lr": 1e-7, "weight_decay": 5e-4, "tau": 0.04}
    sweep = make_sweep(
        tmp_path, digits_ood, "logitnorm", scheduler=scheduler, pbt_interval=1, include_default=False, points_to_evaluate=[good, bad],
        base={"epochs": 3, "min_val_acc": 0.999, "lr": 0.01, "cpus_per_worker": 1.5},
    )
    out = run_sweep(sweep)
    assert [t["status"] for t in out.trials] == ["completed", "completed"], [t["error"] for t in out.trials]
    client = MlflowClient(sweep.base.mlflow_uri)
    runs = {r.data.tags["ood_ray.trial_id"]: r for r in child_runs(sweep.base.mlflow_uri, out.parent_run_id)}
    first = {tid: float(r.data.params["lr"]) for tid, r in runs.items()}  # the values each trial started with
    good_id = next(t for t, lr in first.items() if lr == 0.005)
    bad_id = next(t for t, lr in first.items() if lr == 1e-7)
    run = runs[bad_id]
    assert int(run.data.tags["ood_ray.pbt.exploits"]) >= 1
    record = json.loads(run.data.tags["ood_ray.pbt.exploit.1"])
    epoch = record["epoch"]
    # what the loop found in the checkpoint it was given: the good trial's, at the epoch before
    assert record["from_trial"] == good_id and 1 <= record["from_epoch"] == epoch - 1 < 3
    # the scheduler's own log of the trial's exploits: the values it gave the trial
    policy = [json.loads(line) for line in Path(out.experiment_path, f"pbt_policy_{bad_id}.txt").read_text().splitlines()]
    new_lr, new_tau = policy[0][5]["lr"], policy[0][5]["method_params"]["tau"]
    assert 0.001 <= new_lr <= 0.04 and 0.005 <= new_tau <= 0.5  # within the search space's ranges
    old_lr, old_tau = 0.005, 0.04  # the donor's
    if scheduler == "pbt":  # perturbed (x0.8, x1.2 or resampled)
        assert record["changed"]["lr"] == [old_lr, new_lr] and new_lr != old_lr
        assert record["changed"]["tau"] == [old_tau, new_tau] and new_tau != old_tau
    else:  # PB2's GP has no data until the donor reported twice with the same values: it may copy them
        assert record["changed"] == {k: v for k, v in {"lr": [old_lr, new_lr], "tau": [old_tau, new_tau]}.items() if v[0] != v[1]}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "pbt_exploits")][0] == (epoch, 1)
    assert last_at(client, run.info.run_id, "start_epoch", epoch) == epoch - 1  # it resumed there
    # the optimizer runs at the new rate: at the same step of the same schedule, new/old of the donor's
    donor_lr = last_at(client, runs[good_id].info.run_id, "lr", epoch)
    assert last_at(client, run.info.run_id, "lr", epoch) == pytest.approx(donor_lr * new_lr / old_lr, rel=1e-6)
    # the poor trial ended as a copy of the good one (plus perturbations): it learned
    bad_trial = next(t for t in out.trials if t["trial_id"] == bad_id)
    assert bad_trial["val_acc"] > 0.5
