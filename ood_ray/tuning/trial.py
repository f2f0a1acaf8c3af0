"""One sweep trial, as Ray Tune runs it: the trainable and the config it builds.

Kept apart from ``sweep.py`` (the sweep driver) so that a trial's process imports only what
training needs: no MLflow, no Optuna, no plotting (about a second less for every new trial actor).
"""

from __future__ import annotations

from ray import tune

from .. import console, ray_compat
from ..config import TrainConfig

if console.is_quiet():  # on import, before Tune restores the first trial of this process from a checkpoint
    ray_compat.quiet_restore_log()


def trial_config(config: dict) -> TrainConfig:
    """The TrainConfig of one trial: the base settings plus the suggested values."""
    d = dict(config["base"])
    d["lr"] = config["lr"]
    d["weight_decay"] = config["weight_decay"]
    d["method_params"] = {**d.get("method_params", {}), **config["method_params"]}
    d["seed"] = int(config.get("trial_seed", d["seed"]))
    return TrainConfig.from_dict(d)


def run_trial(config: dict, benchmark: dict | None = None) -> None:
    """Tune trainable: one trial, trained in this process or by a Ray Train run.

    ``config["runner"] == "tune"`` (one-worker trials): the training loop runs right here with a
    ``TuneWorker``; every epoch is one ``tune.report`` with its checkpoint, and Tune's
    ``FailureConfig`` and ``--resume`` restart the trial from that checkpoint. Otherwise a
    ``TorchTrainer`` runs the loop on ``num_workers`` Train workers and its reports reach Tune
    through ``TuneReportCallback``. Both paths run the same ``engine.train_loop``.

    ``benchmark`` is the sweep driver's ``Benchmark.to_spec()``, passed with ``tune.with_parameters``
    (through the object store, not the trial config), so no node but the driver's reads benchmark.json.
    """
    from ..data.manifest import Benchmark

    cfg = trial_config(config)
    bench = Benchmark.from_spec(benchmark) if benchmark else None
    if config.get("runner", "train") == "tune":
        from .. import ray_compat
        from ..engine import train_loop
        from ..ray_train import TuneWorker

        ray_compat.set_trial_reuse_timeout(600)  # the next trial may wait for an evaluation to end
        train_loop(cfg, TuneWorker("cuda" if config["gpus_per_worker"] > 0 else "cpu"), bench)
        return

    from ray.tune.integration.ray_train import TuneReportCallback

    from .. import ray_compat
    from ..ray_train import make_trainer

    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, f"{config['sweep_name']}-{trial_id}", [TuneReportCallback()], gpus_per_worker=config["gpus_per_worker"], bench=bench, echo_epochs=not console.is_quiet())
    trainer.fit()
    ray_compat.wait_for_forwarded_reports(ray_compat.tune_session())
