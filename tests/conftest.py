"""Shared fixtures: one local Ray per session, the embedded benchmark built once, sqlite MLflow."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that needs it (dashboard on: see DESIGN)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True, include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_ood(tmp_path_factory):
    """The embedded digits-ood benchmark, built once per session; returns benchmark.json."""
    from ood_ray.data.default import build_default

    return build_default(tmp_path_factory.mktemp("digits-ood"), seed=0)


@pytest.fixture()
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def write_toy(out_dir, n=40, classes=3, maxcount=10, role="train", size=(8, 8), seed=0, name="toy"):
    """A small real shard set written by the project's writer."""
    from ood_ray.data.writer import write_array_shards

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n) if role in ("train", "val", "test") else np.full(n, -1)
    names = [f"c{i}" for i in range(classes)] if role in ("train", "val", "test") else []
    return write_array_shards(images, labels, out_dir, name=name, role=role, class_names=names, maxcount=maxcount, progress=False)
