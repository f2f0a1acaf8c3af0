"""Model URIs -> ``OODPredictor``: ``load_predictor`` and ``predict`` (``ood-ray predict``).

A model is an MLflow model logged by ``log_ood_model`` (``models:/<name>/<version>``,
``models:/<name>@<alias>``, ``runs:/<run_id>/model``, a local model folder) or a checkpoint folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from ..checkpoint import META_FILE, load_model_dir
from ..config import TrackingError, default_tracking_uri
from ..tracking.store import check_server, sqlite_file
from .predictor import COLUMNS, OODPredictor


class ModelLoadError(RuntimeError):
    """A model URI cannot be resolved, downloaded or loaded; the message names the URI."""


#: URI schemes whose artifacts are found through the tracking store (or its registry).
_STORE_SCHEMES = ("models", "runs", "mlflow-artifacts")


def _check_store(uri: str, model_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming both URIs, when the tracking store is unreachable or does not exist.

    A tracking server is asked for ``/health`` with a timeout (MLflow's own client retries for
    minutes); a sqlite store must exist (MLflow would create an empty one and then report the
    model as not found).
    """
    try:
        check_server(uri, timeout)
    except TrackingError as e:
        raise ModelLoadError(f"cannot load model {model_uri}: {e}") from None
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        raise ModelLoadError(
            f"cannot load model {model_uri}: MLflow store {uri} does not exist (no file {db}); pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )


def _resolve_uri(model_uri: str, tracking: str, registry: str) -> str:
    """The artifact location behind a ``models:/`` or ``runs:/<run_id>/<model name>`` URI, looked
    up in the given stores (other URIs are returned as they are).

    ``mlflow.artifacts.download_artifacts`` resolves ``models:/`` URIs, and the logged model
    behind a ``runs:/`` URI, in the *global* tracking / registry store whatever its
    ``tracking_uri`` and ``registry_uri`` arguments say (MLflow 3.17), so they are resolved here
    with an explicit client; the download then only sees a plain artifact location.
    """
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=registry)
    scheme = urlparse(model_uri).scheme
    if scheme == "models":
        base, sub = ModelsArtifactRepository.split_models_uri(model_uri)
        ids = get_model_name_and_version(client, base)
        if len(ids) == 1:
            location = client.get_logged_model(ids[0]).artifact_location
        else:
            location = client.get_model_version_download_uri(*ids)
    elif scheme == "runs":
        run_id, rel = RunsArtifactRepository.parse_runs_uri(model_uri)
        experiment = client.get_run(run_id).info.experiment_id  # "Run ... not found" early
        name, _, sub = (rel or "").partition("/")
        models = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"name = '{name}'"
        )
        match = next((m for m in models if m.source_run_id == run_id), None)
        if match is None:  # a model logged as plain run artifacts
            return model_uri
        location = match.artifact_location
    else:
        return model_uri
    return f"{location.rstrip('/')}/{sub}" if sub else location


def _checkpoint_of(local: Path, model_uri: str) -> Path:
    """The checkpoint folder inside a downloaded (or local) model: the folder itself when it is a
    checkpoint, else the pyfunc artifact "checkpoint" that ``log_ood_model`` stores."""
    if (local / META_FILE).is_file():
        return local
    if not (local / "MLmodel").is_file():
        raise ModelLoadError(
            f"{model_uri}: neither an MLflow model (no MLmodel file) nor an ood-ray checkpoint folder (no {META_FILE})"
        )
    try:
        flavor = Model.load(str(local)).flavors.get("python_function", {})
    except Exception as e:  # noqa: BLE001 - a malformed MLmodel file
        raise ModelLoadError(f"{model_uri}: cannot read its MLmodel file ({e})") from None
    rel = ((flavor.get("artifacts") or {}).get("checkpoint") or {}).get("path")
    if not rel:
        raise ModelLoadError(
            f"{model_uri}: not an ood-ray model (no 'checkpoint' artifact in its MLmodel; such models are logged by ood_ray.serving.log_ood_model)"
        )
    return local / rel


def load_predictor(
    model_uri: str | os.PathLike,
    tracking_uri: str | None = None,
    *,
    delta: float | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> OODPredictor:
    """Load an ood-ray model from MLflow (or a folder) as an ``OODPredictor``, once.

    ``model_uri`` is anything ``mlflow.artifacts.download_artifacts`` resolves to a model logged by
    ``log_ood_model`` (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/<name>/latest``, ``models:/<model_id>``, ``runs:/<run_id>/model``), a local MLflow
    model folder, or a checkpoint folder (``state.pt``, ``config.json``, ``model.json``).
    Registry and tracking URIs are ``tracking_uri``, by default
    ``ood_ray.config.default_tracking_uri()`` (``$MLFLOW_TRACKING_URI`` or the project's sqlite
    store; ``$MLFLOW_REGISTRY_URI`` is honoured then). MLflow's global state is left alone.

    Only the checkpoint artifact is read, as ``OODPredictor.from_dir`` reads it (the pickled
    ``OODPyfuncModel`` is not unpickled and ``sys.path`` is not changed); the download goes to a
    temporary folder that is removed once the model is in memory. ``delta`` replaces the
    model's δ (None keeps it).

    Raises ModelLoadError naming the URI when the store is unreachable or missing, the model,
    version, alias or run does not exist, or the model is not an ood-ray model; ValueError for
    a ``delta`` outside the threshold score's range ([0, 1] for a probability; any number for a
    post-hoc detector's score).
    """
    kwargs = {"batch_size": batch_size, "device": device}
    if delta is not None:
        kwargs["delta"] = delta
    local = Path(model_uri)
    if isinstance(model_uri, os.PathLike) or local.is_dir() or len(urlparse(model_uri).scheme) < 2:
        if not local.is_dir():
            raise ModelLoadError(
                f"model folder not found: {local} (or give an MLflow URI such as models:/<name>/<version>)"
            )
        return _from_checkpoint(_checkpoint_of(local, str(local)), str(local), kwargs)
    model_uri = str(model_uri)
    explicit = tracking_uri is not None
    tracking = tracking_uri or default_tracking_uri()
    registry = (None if explicit else os.environ.get("MLFLOW_REGISTRY_URI")) or tracking
    scheme = urlparse(model_uri).scheme
    if scheme in _STORE_SCHEMES:
        _check_store(registry if scheme == "models" else tracking, model_uri)
    with tempfile.TemporaryDirectory(prefix="ood-ray-model-") as tmp:
        try:
            uri = _resolve_uri(model_uri, tracking, registry)
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=tracking, registry_uri=registry
            )
        except MlflowException as e:  # RestException included
            raise ModelLoadError(
                f"cannot load model {model_uri} from {tracking}: {e.message}"
            ) from None
        except OSError as e:  # e.g. the store names an artifact folder missing on this machine
            raise ModelLoadError(
                f"cannot download model {model_uri} from {tracking}: {type(e).__name__}: {e}"
            ) from None
        return _from_checkpoint(_checkpoint_of(Path(path), model_uri), model_uri, kwargs)


def _from_checkpoint(directory: Path, model_uri: str, kwargs: dict) -> OODPredictor:
    try:
        model, meta, cfg = load_model_dir(directory)
    except (FileNotFoundError, ValueError) as e:
        raise ModelLoadError(f"{model_uri}: {e}") from None
    return OODPredictor(model, meta, cfg, **kwargs)  # a bad delta: ValueError


def predict(
    model: str | os.PathLike | OODPredictor,
    images: Iterable,
    tracking_uri: str | None = None,
    delta: float | None = None,
) -> list[dict[str, Any]]:
    """Predict with an ood-ray model: one dict per image, in order.

    ``model`` is a model URI or folder (loaded once with ``load_predictor``; to predict several
    times, call ``load_predictor`` yourself and pass the ``OODPredictor``). ``images`` is a list
    of file paths (``str`` or ``Path``), PIL images, PNG/JPEG bytes or numpy arrays of one image
    each (see ``OODPredictor.image_array``), or an ``N×H×W[×C]`` array. Images are converted to
    the model's mode but never resized; errors name the file. ``delta`` replaces the model's δ
    for this call (None keeps it; 0 makes every image known for the probability scores, which are
    never negative; a post-hoc detector's score can be, e.g. knn and mahalanobis).

    Each dict has ``image`` (the path as given, None for in-memory images) and the columns of
    ``COLUMNS`` as plain Python values (JSON-ready): ``class_name``, ``score_name`` and
    ``score`` (the method's default score), ``threshold_score`` and ``threshold_value`` (the
    score δ applies to), ``delta`` (None when off), ``unknown`` (threshold_value < δ, or a score
    that is NaN or infinite) and ``label`` (class_name, or "unknown").
    """
    single = isinstance(images, str | os.PathLike | Image.Image | bytes | bytearray)
    if single or (isinstance(images, np.ndarray | torch.Tensor) and images.ndim < 3):
        raise TypeError("images must be a list of images (wrap a single one in a list)")
    if isinstance(model, OODPredictor):
        predictor = model if delta is None else model.with_delta(delta)
    else:
        predictor = load_predictor(model, tracking_uri, delta=delta)
    items = list(images)
    names = [str(i) if isinstance(i, str | os.PathLike) else None for i in items]
    arrays = [predictor.image_array(item) for item in items]
    c, (h, w) = predictor.channels, predictor.image_size
    batch = np.stack(arrays) if arrays else np.zeros((0, c, h, w), np.uint8)
    df = predictor.predict(batch)
    rows = []
    for name, rec in zip(names, df.to_dict("records"), strict=True):
        row: dict[str, Any] = {"image": name}
        for k in COLUMNS:
            v = rec[k]
            row[k] = v.item() if isinstance(v, np.generic) else v
        row["delta"] = predictor.delta
        rows.append(row)
    return rows
