"""What the "Don't know" demo page shows, without Streamlit: models, samples, answers, provenance.

``ood_ray/serving/demo_app.py`` is the page; everything it computes lives here, so it is tested
as plain Python and the page stays a layout. ``ood-ray demo`` (``cli.cmd_demo``) serves the page
with Streamlit in its own process (``serve``) and passes its settings in the environment variables
of ``ENV``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from mlflow.tracking import MlflowClient

from .load import ModelLoadError
from .predictor import OODPredictor

#: Settings the page reads from its environment (set by ``ood-ray demo``).
ENV = {"model": "OOD_RAY_DEMO_MODEL", "tracking_uri": "OOD_RAY_DEMO_TRACKING_URI", "ui": "OOD_RAY_DEMO_UI"}
MODEL_PREFIX = "ood-ray-"


@dataclass
class ModelChoice:
    """A registered ood-ray model and its versions, newest first."""

    name: str
    versions: list[str]
    newest_ms: int = 0


def settings() -> dict[str, str | None]:
    return {k: os.environ.get(v) or None for k, v in ENV.items()}


def registered_models(tracking_uri: str) -> list[ModelChoice]:
    """Every ``ood-ray-*`` registered model with its versions; the newest model first.

    Raises ModelLoadError naming the store when it cannot be read."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        found = client.search_registered_models(filter_string=f"name LIKE '{MODEL_PREFIX}%'")
        out = []
        for rm in found:
            versions = client.search_model_versions(f"name = '{rm.name}'")
            versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
            if versions:
                out.append(ModelChoice(rm.name, [v.version for v in versions], max(v.creation_timestamp or 0 for v in versions)))
    except Exception as e:  # noqa: BLE001 - any store failure becomes one message on the page
        raise ModelLoadError(f"cannot list registered models in {tracking_uri}: {type(e).__name__}: {e}") from None
    return sorted(out, key=lambda m: m.newest_ms, reverse=True)


def model_uri(choice: ModelChoice, version: str) -> str:
    if version not in choice.versions:
        raise ModelLoadError(f"model {choice.name!r} has no version {version!r} (versions: {', '.join(choice.versions)})")
    return f"models:/{choice.name}/{version}"


@dataclass
class Answer:
    """The page's answer for one image."""

    name: str
    image: np.ndarray | None  # H×W or H×W×C uint8, for display
    error: str | None = None
    class_name: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    score_name: str = ""
    score: float = float("nan")
    threshold_score: str = ""
    threshold_value: float = float("nan")
    unknown: bool = False


def _display(array: np.ndarray) -> np.ndarray:
    """C×H×W (or H×W) uint8 -> what st.image shows: H×W or H×W×C."""
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else np.moveaxis(array, 0, -1) if array.ndim == 3 else array


def answer(predictor: OODPredictor, items: list[tuple[str, object]], delta: float | None) -> list[Answer]:
    """Classify each ``(name, image)``: an uploaded file's bytes, or a C×H×W uint8 array.

    An image that cannot be read, or has another size or mode than the model takes, gets an
    ``error`` saying so (the size the model takes included), never an exception."""
    pred = predictor.with_delta(delta)
    out: list[Answer] = []
    good: list[tuple[int, np.ndarray]] = []
    for name, item in items:
        try:
            arr = pred.image_array(item, name=name)
        except (ValueError, OSError) as e:
            h, w = predictor.image_size
            hint = "" if "expects" in str(e) else f" (this model takes {h}x{w} images, mode {predictor.mode})"
            out.append(Answer(name, None, error=f"{e}{hint}"))
            continue
        out.append(Answer(name, _display(arr)))
        good.append((len(out) - 1, arr))
    if good:
        batch = np.stack([a for _, a in good])
        raw = pred.outputs(batch)  # one pass of the model (two with input preprocessing)
        rows = pred.frame(raw).to_dict("records")
        z = raw["logits"].astype(np.float64)
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for (i, _), row, p in zip(good, rows, probs, strict=True):
            a = out[i]
            a.class_name, a.unknown = row["class_name"], bool(row["unknown"])
            a.score_name, a.score = row["score_name"], float(row["score"])
            a.threshold_score, a.threshold_value = row["threshold_score"], float(row["threshold_value"])
            a.probabilities = dict(zip(predictor.class_names, map(float, p), strict=True))
    return out


def samples(predictor: OODPredictor, per_set: int = 4) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The first ``per_set`` images of the model's test ID set and of each test OOD set, from the
    benchmark it was trained on (its config's ``data``; the embedded digits-ood when none)."""
    from ..config import TrainConfig
    from ..data.streams import eval_batches
    from ..engine.build import load_benchmark

    cfg = predictor.config or TrainConfig()
    bench = load_benchmark(cfg, verify=False)
    sets = {"ID (test)": bench.test, **{f"OOD: {k}": m for k, m in bench.ood_test.items()}}
    out = {}
    for label, manifest in sets.items():
        for x, _, keys in eval_batches(manifest, 0, 1, per_set):
            out[label] = [(f"{manifest.name}/{k}", img.numpy()) for k, img in zip(keys, x, strict=True)]
            break
    return out


def provenance(predictor: OODPredictor, uri: str, tracking_uri: str, ui: str | None) -> dict:
    """Method, backbone, and where the model came from: its run, sweep and their metrics."""
    cfg = predictor.config
    info: dict = {
        "model": uri,
        "method": predictor.method.name,
        "backbone": cfg.backbone if cfg else "?",
        "score": predictor.default_score,
        "threshold score": predictor.threshold_score,
        **({"detector": predictor.meta["detector"]} if predictor.meta.get("detector") else {}),
        "δ of the model": predictor.meta.get("delta"),
        "metrics": {},
    }
    run_id = None
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("models:/"):
            name, _, version = uri[len("models:/") :].partition("/")
            run_id = client.get_model_version(name, version).run_id
        elif uri.startswith("runs:/"):
            run_id = uri[len("runs:/") :].split("/")[0]
        if run_id:
            run = client.get_run(run_id)
            info["run"] = f"{run.info.run_name} ({run_id})"
            info["metrics"].update({k: v for k, v in run.data.metrics.items() if k in ("val_acc", "val_auroc", "val_fpr95", "test_acc", "test_auroc", "test_fpr95")})
            parent_id = run.data.tags.get("mlflow.parentRunId")
            if parent_id:
                parent = client.get_run(parent_id)
                info["sweep"] = parent.data.tags.get("ood_ray.sweep", parent.info.run_name)
                info["metrics"].update({k: v for k, v in parent.data.metrics.items() if k in ("best_val_acc", "best_val_auroc", "best_test_acc", "best_test_auroc", "best_test_fpr95")})
            if ui:
                from ..tracking.store import ui_url

                info["link"] = ui_url(run.info.experiment_id, run_id, ui)
    except Exception as e:  # noqa: BLE001 - provenance is informative; say why it is missing
        info["note"] = f"run details unavailable: {type(e).__name__}: {e}"
    return info


class _SurvivesClosedReader:
    """A text stream (stdout, stderr) that writes into /dev/null once the reader of its pipe is gone."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()
            self._stream.flush()  # what was buffered goes to /dev/null

    def __getattr__(self, name):
        return getattr(self._stream, name)


def serve(app: str, port: int, address: str) -> int:
    """Serve the page ``app`` with Streamlit in this process until SIGTERM or SIGINT; its exit code.

    In this process rather than a child, so that a signal to ``ood-ray demo`` (a process manager,
    ``docker stop``, Ctrl-C) reaches the server itself and nothing is left serving. Its stdout and
    stderr survive their reader going away (``ood-ray demo | tee log`` ended, a parent gone):
    Streamlit prints "Stopping..." before it stops, and that print failing on a closed pipe
    (BrokenPipeError in its signal handler) used to leave the server running, deaf to SIGTERM.
    """
    from streamlit.web import cli as streamlit_cli

    args = ["run", app, "--server.port", str(port), "--server.address", address, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    saved = sys.stdout, sys.stderr, sys.argv
    sys.stdout, sys.stderr = _SurvivesClosedReader(sys.stdout), _SurvivesClosedReader(sys.stderr)
    sys.argv = ["streamlit", *args]
    try:
        streamlit_cli.main(args=args, prog_name="streamlit")
    except SystemExit as e:  # click ends its command with sys.exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr, sys.argv = saved
    return 0
