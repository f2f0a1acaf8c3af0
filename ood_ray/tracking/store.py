"""The MLflow store: checking it, experiments, params, metrics, torch models.

Only driver-side processes write (the job's driver and the Ray Train controller, both on the head
node), so a sqlite store is safe; multi-node clusters point ``--mlflow-uri`` at a tracking server.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ..config import TrackingError, redact

MAX_PARAM_LEN = 6000


def is_unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the tracking store did not answer (rather than a bug or a bad request)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError | TimeoutError):
        return True
    if isinstance(e, MlflowException):
        text = str(e)
        return any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out", "API request to", "database is locked", "unable to open database"))
    return False


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer ``/health`` within ``timeout`` (MLflow's own client
    retries for minutes); raises TrackingError naming the URI. Other URIs pass."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({type(e).__name__}: {e})") from None
    if r.status_code != 200:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {r.status_code}")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when the tracking store cannot be reached or created."""
    check_server(uri, timeout)
    if urlparse(uri).scheme in ("http", "https"):
        return
    db = sqlite_file(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create folder {db.parent} ({e})") from None
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise TrackingError(f"MLflow store {uri} cannot be used ({type(e).__name__}: {e})") from None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside it (``mlartifacts/``), not in the current directory.

    MLflow's default for a new experiment is ``./mlruns`` relative to whatever the working
    directory is, which Ray changes. Tracking servers manage their own artifact store.
    """
    db = sqlite_file(uri)
    return str(db.parent / "mlartifacts") if db is not None else None


#: MLflow's UI opens an experiment by its kind; without this tag MLflow 3 shows its GenAI screen
#: (traces, judges) instead of the runs table of model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def ui_url(experiment_id: str, run_id: str | None = None, ui: str = DEFAULT_UI) -> str:
    """The MLflow UI page of an experiment's runs table (or of one run) in its model-training view.

    MLflow 3.17 opens a bare experiment address (``#/experiments/<id>``) on its GenAI overview in a
    new browser, whatever the experiment's kind tag says, so links name the runs view and the
    ``machine_learning`` workflow explicitly."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def browse_hint(uri: str, experiment: str) -> str:
    """How to look at ``experiment`` of store ``uri``: the ``mlflow ui`` command and the page."""
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    page = f"; then open {ui_url(exp.experiment_id)}" if exp is not None else ""
    return f"browse: mlflow ui --backend-store-uri {redact(uri)}{page}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing; tagged as model training either way
    (unless it already has a kind of its own)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def params_of(config: dict) -> list[Param]:
    """MLflow params of a (nested) config; credentials in URIs are masked."""
    return [Param(k, redact(str(v))[:MAX_PARAM_LEN]) for k, v in sorted(flatten(config).items())]


def set_tag(client: MlflowClient, run_id: str, key: str, value) -> None:
    """``client.set_tag`` with credentials in the value masked (paths, URIs, error messages)."""
    client.set_tag(run_id, key, redact(str(value)))


def numeric_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    ts = int(time.time() * 1000)
    batch = [Metric(k, v, ts, step) for k, v in numeric_metrics(metrics).items()]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i : i + 500])


def log_pytorch_model(model, input_example, name: str = "model", registered_model_name: str | None = None):
    """Log an (unwrapped) torch model; MLflow 3 exports it with torch.export from the example.

    The example needs a batch of at least 2: torch.export fixes a batch dimension of 1.
    """
    model = getattr(model, "module", model).eval()
    return mlflow.pytorch.log_model(
        model, name=name, input_example=input_example, registered_model_name=registered_model_name
    )
