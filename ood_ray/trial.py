"""One sweep trial, as Ray Tune runs it: the trainable and the config it builds.

Kept apart from ``tune.py`` (the sweep driver) so that a trial's process imports only what
training needs: no MLflow, no Optuna, no plotting (about a second less for every new trial actor).
"""

from __future__ import annotations

import os
import time

from ray import tune

from .config import TrainConfig


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
    through ``TuneReportCallback``. Both paths run the same ``train.train_loop``.

    ``benchmark`` is the sweep driver's ``Benchmark.to_spec()``, passed with ``tune.with_parameters``
    (through the object store, not the trial config), so no node but the driver's reads benchmark.json.
    """
    from .data.manifest import Benchmark

    cfg = trial_config(config)
    bench = Benchmark.from_spec(benchmark) if benchmark else None
    if config.get("runner", "train") == "tune":
        from .train import TuneWorker, train_loop

        # Tune reuses this process for the next trial once this one's loop has ended; a stopped
        # loop ends within one training step, but an evaluation in progress finishes first, and
        # Tune's default wait for that (2 s) would fail the reuse and so the next trial.
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
        train_loop(cfg, TuneWorker("cuda" if config["gpus_per_worker"] > 0 else "cpu"), bench)
        return

    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import make_trainer, tune_session

    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, f"{config['sweep_name']}-{trial_id}", [TuneReportCallback()], gpus_per_worker=config["gpus_per_worker"], bench=bench)
    trainer.fit()
    wait_for_forwarded_reports(tune_session())


def wait_for_forwarded_reports(session, settle_s: float = 0.2, timeout_s: float = 120.0) -> None:
    """Return only after Tune has taken the Train run's last forwarded report.

    Ray 2.60's Train-to-Tune bridge has a race: TuneReportCallback's last report may still sit in
    the trial's inter-actor queue when ``fit()`` returns; if this function returns first, the
    trainable's main thread later blocks for ever putting that report into a result queue that
    already holds the end-of-trial result, and the sweep hangs (seen under load). The report has
    been handed on when the inter-actor queue and the session's result queue are both empty; the
    check is repeated after ``settle_s`` so a report between the two queues is not missed. (A
    fixed 1 s wait did the same at +0.8 s per trial.)
    """
    queues = (getattr(session, "_inter_actor_queue", None), getattr(session, "result_queue", None))
    if None in queues:  # no session (private API changed) or nothing forwarded: nothing to wait for
        return
    deadline = time.monotonic() + timeout_s
    settled = 0
    while time.monotonic() < deadline and settled < 2:
        if all(q.empty() for q in queues):
            settled += 1
            if settled < 2:
                time.sleep(settle_s)
        else:
            settled = 0
            time.sleep(0.05)
