"""Shared fixtures and helpers: one local Ray per session, the embedded benchmark built once,
sqlite MLflow, small shard sets, checkpoints and sweeps.

Tests that start Ray carry the ``ray`` marker (given here to every test that uses the
``ray_session`` fixture); ``pytest -m "not ray"`` runs the rest, and a test without the marker that
starts Ray fails, naming the marker.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

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


def write_toy(out_dir, n=40, classes=3, maxcount=10, role="train", size=(8, 8), seed=0, name="toy", shuffle_seed=None):
    """A small real shard set written by the project's writer; in key order by default (shard
    ``i`` holds keys ``i*maxcount ...``: tests of damaged shards rely on that), which is fine for
    labels drawn at random."""
    from ood_ray.data.writer import write_array_shards

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n) if role in ("train", "val", "test") else np.full(n, -1)
    names = [f"c{i}" for i in range(classes)] if role in ("train", "val", "test") else []
    return write_array_shards(images, labels, out_dir, name=name, role=role, class_names=names, maxcount=maxcount, progress=False, shuffle_seed=shuffle_seed)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_marker_is_honest(request):
    """A test not marked ``ray`` must not start Ray (so ``-m "not ray"`` stays Ray-free)."""
    import sys

    def started() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = started()
    yield
    if not before and started() and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} started Ray: use the ray_session fixture (it adds the 'ray' marker)")


# --- helpers shared by several test modules ---------------------------------------------------


def png(image=(8, 8), mode="L") -> bytes:
    """PNG bytes of a uint8 array (mode L), or of a blank image of size ``image`` = (w, h)."""
    buf = io.BytesIO()
    img = Image.fromarray(image, mode="L") if isinstance(image, np.ndarray) else Image.new(mode, image)
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_raw_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))



def hand_manifest(tmp_path, members, role="train", count=1):
    from ood_ray.data.manifest import Manifest

    write_raw_tar(tmp_path / "s-000000.tar", members)
    d = {"name": "s", "role": role, "image_size": [8, 8], "mode": "L", "class_names": ["a", "b"] if role == "train" else [], "shards": [{"url": "s-000000.tar", "count": count}]}
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    return Manifest.load(tmp_path)


PARAMS = {
    "softmax": {},
    "outlier_exposure": {"lam": 0.3},
    "confidence": {"epsilon": 0.002},  # input preprocessing: scoring needs input gradients
    "dismax": {"alpha": 0.5},
    "logitnorm": {"tau": 0.1},
}
SIZE = (8, 8)
CLASSES = [str(i) for i in range(10)]


def make_checkpoint(directory, method_name: str, seed: int = 0):
    """A tiny untrained checkpoint folder as training writes it (state.pt, config.json, model.json)."""
    from ood_ray.checkpoint import CONFIG_FILE, META_FILE, STATE_FILE, model_meta
    from ood_ray.config import TrainConfig
    from ood_ray.methods import get_method
    from ood_ray.models import Classifier, build_backbone

    params = PARAMS[method_name]
    torch.manual_seed(seed)
    method = get_method(method_name, params)
    backbone = build_backbone("small_cnn", 1, SIZE)
    model = Classifier(backbone, method.make_head(backbone.num_features, len(CLASSES)))
    model.train()
    with torch.no_grad():  # BatchNorm running statistics away from their defaults
        model(torch.randn(16, 1, *SIZE))
    if method_name == "dismax":
        model.head.temperature.fill_(0.7)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "epoch": 0, "method_state": method.initial_state()}
    torch.save(state, directory / STATE_FILE)
    cfg = TrainConfig(method=method_name, method_params=params).to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    meta = model_meta(TrainConfig(method=method_name, method_params=params), CLASSES, SIZE, "L")
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory, model.eval(), method


def images(n=13, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SIZE), dtype=np.uint8)




def make_sweep(tmp_path, data, method, **kw):
    from ood_ray.config import TrainConfig
    from ood_ray.tuning.config import SweepConfig

    base = dict(data=str(data), epochs=2, num_workers=1, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="sweeps", delta_tpr=0.95)
    base.update(kw.pop("base", {}))
    kw.setdefault("register_name", "")
    return SweepConfig(method=method, base=TrainConfig.from_dict(base), num_trials=kw.pop("num_trials", 2), **kw)


def child_runs(uri, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


RUNNERS = ["tune", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
