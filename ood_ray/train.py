"""``ood-ray train``: one training run on Ray Train, recorded in MLflow.

``run_training`` (the driver) checks config, data and MLflow, opens an MLflow run and builds a
``TorchTrainer`` (``ray_train.make_trainer``) whose workers run ``engine.train_loop``; each epoch
the workers train on their share of the shards, evaluate the whole val split (gathered across
ranks), checkpoint and report; the controller-side ``EpochLogger`` logs each report to MLflow.
After the last epoch the driver logs the final model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import META_FILE, ExportedModel, load_model_dir
from .config import TrainConfig
from .engine.build import load_benchmark
from .methods import get_method
from .progress import say
from .ray_train import ensure_ray, make_trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says in which epoch and what to change."""


@dataclass
class TrainOutcome:
    run_id: str
    metrics: dict
    checkpoint_path: str
    tracking_uri: str
    experiment: str
    wall_time_s: float
    ood_sets: list[str]  # the test OOD sets, in benchmark order (their metric keys: ood_ray.metric_names)


def run_training(cfg: TrainConfig, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Train ``cfg`` on Ray Train and record it in MLflow (its run gets ``tags`` too, e.g. a parent
    run); returns the run and final metrics."""
    from mlflow.tracking import MlflowClient  # driver only: Ray workers start faster without mlflow

    from . import tracking
    from .tracking import provenance
    from .tracking.epochs import EpochLogger

    t0 = time.perf_counter()
    cfg.validate()
    bench = load_benchmark(cfg, verify=True)
    if cfg.pretrained:  # found (downloaded into the cache when allowed) before any Ray work starts
        from .pretrained import resolve

        wf = resolve(cfg.backbone, cfg.pretrained, say=say)
        say(f"starting from {wf.weights or wf.path} (sha256 {wf.sha256[:12]}...)")
    tracking.check_tracking(cfg.mlflow_uri)
    client = MlflowClient(cfg.mlflow_uri)
    exp_id = tracking.ensure_experiment(client, cfg.experiment)
    run = tracking.open_run(client, exp_id, cfg.run_name, tags={"ood_ray.method": cfg.method, "ood_ray.backbone": cfg.backbone, "ood_ray.data": bench.path, **(tags or {})})
    run_id = run.info.run_id
    say(f"MLflow run {run_id} in experiment {cfg.experiment!r} at {cfg.mlflow_uri}")
    client.log_batch(run_id, params=tracking.params_of(cfg.to_dict()))
    provenance.record(client, run_id, bench)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, cfg.save(Path(tmp) / "config.json"))
    try:
        ensure_ray()
        result = make_trainer(cfg, f"train-{run_id}", [EpochLogger(cfg.mlflow_uri, run_id)], bench=bench).fit()
        if result.metrics.get("diverged"):
            raise TrainingDiverged(result.metrics["diverged"])
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        tracking.set_tag(client, run_id, "ood_ray.checkpoint", result.checkpoint.path)
        with result.checkpoint.as_directory() as d:
            model, meta, _ = load_model_dir(d)
            client.log_artifact(run_id, str(Path(d) / META_FILE))
        for key, value in (meta.get("pretrained") or {}).items():
            if value is not None:
                tracking.set_tag(client, run_id, f"ood_ray.pretrained.{key}", str(value))
        prep = model.preprocess  # the exported model takes the prepared input (size, channels, normalization)
        example = np.zeros((2, prep.channels, *prep.input_size(bench.train.image_size)), dtype=np.float32)
        import mlflow

        mlflow.set_tracking_uri(cfg.mlflow_uri)
        with mlflow.start_run(run_id=run_id):
            tracking.log_pytorch_model(ExportedModel(model, get_method(cfg.method, cfg.method_params)), example)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        tracking.set_tag(client, run_id, "ood_ray.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    wall = time.perf_counter() - t0
    client.log_metric(run_id, "wall_time_s", wall)
    return TrainOutcome(run_id, dict(result.metrics), result.checkpoint.path, cfg.mlflow_uri, cfg.experiment, wall, list(bench.ood_test))
