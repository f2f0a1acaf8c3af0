"""The MLflow pyfunc model of a checkpoint: ``OODPyfuncModel`` and ``log_ood_model``.

The logged model carries the checkpoint folder as artifact "checkpoint" and a copy of the
``ood_ray`` package as code, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work
where ``ood_ray`` is not installed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema

from ..checkpoint import load_model_dir, model_temperature
from .predictor import COLUMNS, OODPredictor

#: Distributions pinned in a logged model's requirements (ray is deliberately not among them).
SERVING_PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "scipy",
    "scikit-learn",
    "pyyaml",
    "mlflow",
)


class OODPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper of ``OODPredictor``; the checkpoint folder is the artifact "checkpoint".

    ``predict`` accepts a numpy array of uint8 pixels (``N×H×W``, ``N×C×H×W`` or ``N×H×W×C``; the
    nested lists of a JSON ``{"inputs": ...}`` request too) or a pandas DataFrame with a column
    ``image`` of encoded PNG/JPEG bytes or base64 strings of them (a ``{"dataframe_split": ...}``
    request to ``mlflow models serve``), and returns the DataFrame of ``OODPredictor.predict``.
    Strings are base64 only, never file paths: a client of the scoring server must not make it
    open (or reveal) files of the server's machine.

    ``params={"delta": ...}`` overrides δ for one call; MLflow passes params on only when the
    model's signature has a params schema (log with ``input_example=(example, {"delta": 0.15})``),
    and otherwise drops them with a warning.
    """

    # No type hints on predict, on purpose: MLflow 3 would build a signature (and validate every
    # input) from them, and we take both arrays and DataFrames. Without hints MLflow warns at class
    # creation ("Add type hints to the `predict` method..."); this flag, which MLflow's own
    # ChatModel classes set, skips that check and its warning. Nothing else reads it.
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.predictor = OODPredictor.from_dir(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        predictor = self.predictor
        if params and "delta" in params:
            predictor = predictor.with_delta(params["delta"])
        return predictor.predict(model_input, paths=False)


def _pinned(packages: Iterable[str]) -> list[str]:
    pins = []
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+')[0]}")  # a local tag such as +cpu is on no index
    return pins


def _copy_package(dest: Path) -> Path:
    """A clean copy of the ``ood_ray`` package (no ``__pycache__``) for ``code_paths``."""
    src = Path(__file__).resolve().parent.parent  # the ood_ray package
    target = dest / src.name
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    return target


def output_schema() -> Schema:
    """The schema of ``OODPredictor.predict``'s DataFrame (``delta`` is null when δ is off)."""
    types = {
        "predicted_class": "long",
        "class_name": "string",
        "label": "string",
        "unknown": "boolean",
        "score_name": "string",
        "score": "double",
        "threshold_score": "string",
        "threshold_value": "double",
        "delta": "double",
    }
    return Schema([ColSpec(types[c], c, required=c != "delta") for c in COLUMNS])


def _split_example(example):
    """``(data, params)`` from an input example that may be a ``(data, params_dict)`` pair."""
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict):
        return example
    return example, None


def log_ood_model(
    checkpoint_dir: str | os.PathLike,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example=None,
):
    """Log a checkpoint folder as an MLflow pyfunc model in the active run; returns its ModelInfo.

    The model is ``OODPyfuncModel`` with the folder as artifact "checkpoint" and a copy of the
    ``ood_ray`` package as code (so it loads where ``ood_ray`` is not installed), pinned
    requirements of the serving packages (no ray), and ``metadata`` with the method, default and
    threshold score, δ, class names, image size, mode, backbone and (when the method declares one,
    ``Method.temperature``) the calibration temperature.

    Without ``input_example`` the model has no signature and MLflow passes any input through:
    arrays and DataFrames of encoded images both work. With one, the example is checked by
    predicting on it, and the signature's input schema comes from it and restricts what the model
    accepts afterwards: a numpy example gives a uint8 tensor schema, a DataFrame with an ``image``
    column of PNG bytes a binary column (HTTP clients then send base64 strings). Pass
    ``(example, {"delta": 0.15})`` to add a params schema, the only way ``params={"delta": ...}``
    reaches the model. The output schema is always ``output_schema()``.
    """
    if mlflow.active_run() is None:
        raise RuntimeError(
            "log_ood_model must be called inside an active MLflow run (mlflow.start_run())"
        )
    directory = Path(checkpoint_dir)
    model, meta, cfg = load_model_dir(directory)  # fail here, not when someone loads the model
    predictor = OODPredictor(model, meta, cfg)
    info = {
        "method": meta["method"],
        "default_score": predictor.default_score,
        "threshold_score": predictor.threshold_score,
        "delta": predictor.delta,
        "class_names": predictor.class_names,
        "image_size": list(predictor.image_size),
        "mode": predictor.mode,
        "backbone": meta["backbone"],
    }
    temperature = model_temperature(model, meta)
    if temperature is not None and math.isfinite(temperature):
        info["temperature"] = temperature
    signature = None
    if input_example is not None:
        data, params = _split_example(input_example)
        if params and "delta" in params:
            OODPredictor(model, meta, cfg, delta=params["delta"])  # checks the value
        predictor.predict(data)  # a clear error now rather than a failed signature inference
        inferred = infer_signature(data, params=params)
        signature = ModelSignature(inferred.inputs, output_schema(), inferred.params)
    with tempfile.TemporaryDirectory() as tmp:
        code = _copy_package(Path(tmp))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=OODPyfuncModel(),
            artifacts={"checkpoint": str(directory.resolve())},
            code_paths=[str(code)],
            pip_requirements=_pinned(SERVING_PACKAGES),
            registered_model_name=registered_model_name,
            input_example=input_example,
            signature=signature,
            metadata=info,
        )
