"""Training end to end on a real local Ray with 2 workers, real shards and a sqlite MLflow store."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ood_ray.checkpoint import load_model_dir as model_from_checkpoint
from ood_ray.config import TrainConfig
from ood_ray.data.manifest import Benchmark
from ood_ray.engine.evaluate import evaluate_split
from ood_ray.methods import get_method
from ood_ray.train import run_training


def config(digits_ood, tmp_path, mlflow_uri, **kw):
    base = dict(data=str(digits_ood), epochs=3, num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"), mlflow_uri=mlflow_uri, experiment="test", max_failures=2)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def trained(ray_session, digits_ood, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = config(digits_ood, tmp, uri, epochs=4)
    return cfg, run_training(cfg)


def test_run_is_recorded_in_mlflow(trained):
    cfg, out = trained
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    # every config value is a param
    for key, value in cfg.to_dict().items():
        if key != "method_params":
            assert run.data.params[key] == str(value), key
    # one point per epoch, in order, no duplicates
    hist = client.get_metric_history(out.run_id, "val_acc")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(out.run_id, "epoch")] == [1, 2, 3, 4]
    # final metrics per OOD set, val and test, near and far
    final = run.data.metrics
    for split in ("val", "test"):
        for name in ("photos", "faces", "gaussian", "uniform", "blobs", "letters"):
            for metric in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_in", "detection_error"):
                assert f"{split}_ood_{name}_{metric}" in final
        for group in ("near", "far"):
            assert 0.0 <= final[f"{split}_{group}_auroc"] <= 1.0
    # the baseline learned something: digits are easy
    assert final["test_acc"] > 0.85, final["test_acc"]
    arts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.json", "model.json"} <= arts


def test_logged_model_matches_checkpoint(trained):
    cfg, out = trained
    mlflow.set_tracking_uri(out.tracking_uri)
    logged = mlflow.pytorch.load_model(f"runs:/{out.run_id}/model")
    model, meta, _ = model_from_checkpoint(out.checkpoint_path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(logged(x), model(x), atol=1e-5)
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["method"] == "softmax"


def test_two_rank_eval_equals_single_process(trained):
    """The reported val/test metrics (2 ranks, gathered) equal a 1-process evaluation."""
    cfg, out = trained
    model, _, _ = model_from_checkpoint(out.checkpoint_path)
    bench = Benchmark.load(cfg.data)
    single = evaluate_split(model, get_method("softmax"), bench, "test", rank=0, world=1, device="cpu", batch_size=97)
    for key in ("test_acc", "test_nll", "test_ece", "test_auroc", "test_fpr95", "test_ood_letters_fpr95_in", "test_far_aupr_out"):
        assert out.metrics[key] == pytest.approx(single[key], abs=1e-5), key


def test_resume_after_worker_killed(ray_session, digits_ood, tmp_path, mlflow_uri):
    """SIGKILL a Train worker after the first checkpoint: the run resumes and finishes all epochs."""
    from ray.util.state import list_actors

    cfg = config(digits_ood, tmp_path, mlflow_uri, epochs=8)
    box = {}
    t = threading.Thread(target=lambda: box.update(out=run_training(cfg)), daemon=True)
    t.start()
    deadline = time.time() + 240
    client = MlflowClient(mlflow_uri)

    def reported_epochs() -> float:  # logged by the controller once a report (and checkpoint) is registered
        exp = client.get_experiment_by_name("test")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return max((r.data.metrics.get("epoch", 0) for r in runs), default=0)

    while reported_epochs() < 2:
        assert time.time() < deadline and t.is_alive(), "no epoch was reported"
        time.sleep(0.1)
    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = [a for a in list_actors(address=ray_session.get_runtime_context().gcs_address, filters=alive) if a.pid]
    assert workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    t.join(timeout=400)
    assert "out" in box, "training did not finish after the worker was killed"
    out = box["out"]
    assert client.get_run(out.run_id).info.status == "FINISHED"
    assert out.metrics["epoch"] == 8
    starts = [m.value for m in client.get_metric_history(out.run_id, "start_epoch")]
    assert max(starts) > 0, "no resume from a checkpoint happened"
    epochs = sorted(m.value for m in client.get_metric_history(out.run_id, "epoch"))
    assert epochs == sorted(set(epochs)) and set(epochs) == set(range(1, 9))
    assert np.isfinite(out.metrics["test_auroc"])


def test_two_workers_match_one_worker(trained, tmp_path):
    """2 workers x 16 and 1 worker x 32 (same global batch, seed, epochs) reach the same metrics.

    The runs are not bitwise equal: each rank reads other shards, so batches are composed
    differently, and BatchNorm sees 16 instead of 32 images per step. The tolerances are the
    seed-to-seed spread of this setup measured with 1 worker (seeds 0-2 after 4 epochs: val/test
    accuracy within 0.015, MSP AUROC within 0.16, which varies most), with margin. The running
    train loss differs more than seeds make it differ (0.245 with 2 workers vs 0.170 with 1,
    seeds giving 0.17-0.20): BatchNorm normalizes each rank's 16 images instead of 32, so the loss
    is compared only loosely (0.12); the held-out metrics are what must agree.
    The 1-worker run is the same training loop in this process (``train_local``).
    """
    from ood_ray.engine import train_local

    cfg, out = trained
    one = TrainConfig.from_dict({**cfg.to_dict(), "num_workers": 1, "storage_path": str(tmp_path / "ray")})
    assert one.batch_size == cfg.batch_size and one.per_worker_batch == 2 * cfg.per_worker_batch
    ref = train_local(one, tmp_path / "local")[-1]
    two = out.metrics
    # about one pass over train per epoch each; 2 ranks also drop their difference in shard sizes
    assert two["train_images"] == pytest.approx(ref["train_images"], rel=0.1)
    for key, tol in {"val_acc": 0.03, "test_acc": 0.03, "train_loss": 0.12, "val_auroc": 0.2, "test_auroc": 0.2}.items():
        assert abs(two[key] - ref[key]) <= tol, (key, two[key], ref[key])


def test_skip_bad_samples_on_two_workers_counts_them_in_mlflow(ray_session, digits_ood, tmp_path, mlflow_uri):
    import shutil

    from ood_ray.data.manifest import DataError

    data = tmp_path / "data"
    shutil.copytree(digits_ood.parent, data)
    shard = data / "id-train" / "id-train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    # without the opt-in: refused before any training, naming the shard
    with pytest.raises(DataError, match="id-train-000003.tar"):
        run_training(config(data / "benchmark.json", tmp_path, mlflow_uri, epochs=2))
    cfg = config(data / "benchmark.json", tmp_path, mlflow_uri, epochs=2, skip_bad_samples=True)
    out = run_training(cfg)  # 2 ranks: the one that reads the damaged shard runs out first
    client = MlflowClient(mlflow_uri)
    assert client.get_run(out.run_id).info.status == "FINISHED"
    counts = [m.value for m in client.get_metric_history(out.run_id, "skipped_samples")]
    per_set = [m.value for m in client.get_metric_history(out.run_id, "skipped_id-train")]
    count = Benchmark.load(data / "benchmark.json").train.shards[3].count
    assert len(counts) == 2 and counts == per_set and 0 < counts[0] == counts[1] <= count
    assert out.metrics["val_acc"] > 0.5
