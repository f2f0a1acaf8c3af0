"""Serving a trained detector: rebuild it from a checkpoint folder, predict with its "don't know" rule.

Layers, each usable alone:

* ``load_model_dir(directory)`` rebuilds the ``Classifier`` from the checkpoint folder alone
  (``state.pt``, ``config.json``, ``model.json``); no dataset or benchmark is read.
* ``OODPredictor`` is the plain Python API: uint8 pixels (arrays, PIL images, files or encoded
  bytes) in, one row per image out, as a pandas DataFrame with the columns of ``COLUMNS``.
* ``OODPyfuncModel`` / ``log_ood_model`` wrap it as an MLflow pyfunc model that carries the
  checkpoint as an artifact and this package as code, so ``mlflow.pyfunc.load_model`` and
  ``mlflow models serve`` work where ``ood_ray`` is not installed.
* ``load_predictor(model_uri)`` / ``predict(model_uri, images)`` go the other way: an MLflow model
  (``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<run_id>/model``, a local
  model folder) or a checkpoint folder -> ``OODPredictor`` -> one dict per image; ``ood-ray
  predict`` is their command line.

An image is "unknown" when the method's threshold score (``msp`` for softmax / OE, ``confidence``
for the confidence branch, ``confidence_pre`` when it preprocesses inputs, ``mps`` for DisMax; as
recorded in ``model.json``) is below δ, the rule of ``ood_ray.evaluate.threshold_metrics``; with
δ = None no image is unknown.

This module imports neither Ray nor the training code: serving needs torch, torchvision, numpy,
pandas, pillow and mlflow (and what ``ood_ray.methods`` imports: scipy, scikit-learn).
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema
from PIL import Image

from .config import TrainConfig
from .methods import Method, get_method
from .models import Classifier, build_backbone

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "model.json"

MODE_CHANNELS = {"L": 1, "RGB": 3}
REQUIRED_META = ("method", "method_params", "backbone", "class_names", "image_size", "mode")
UNKNOWN_LABEL = "unknown"

#: The prediction columns, in order. ``predicted_class`` is the argmax class index and
#: ``class_name`` its name; ``label`` is ``class_name`` or "unknown"; ``score`` is the value of the
#: method's default OOD score ``score_name`` (higher = more in-distribution); ``threshold_value``
#: is the value of the score named ``threshold_score`` that δ (``delta``, None = off) applies to.
COLUMNS = (
    "predicted_class",
    "class_name",
    "label",
    "unknown",
    "score_name",
    "score",
    "threshold_score",
    "threshold_value",
    "delta",
)

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

_KEEP = object()  # "use the checkpoint's δ"


# ---------------------------------------------------------------------------
# checkpoint folder -> model
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_from_dict(d: dict, path: Path) -> TrainConfig:
    """A TrainConfig as saved, without ``validate``: serving must not resolve or check training paths
    (``init_checkpoint``, ``storage_path``, the tracking URI) of the machine that trained."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)} (written by a newer ood_ray?)"
        )
    return TrainConfig(**d)


def _check_meta(meta: dict, path: Path) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    if meta["mode"] not in MODE_CHANNELS:
        raise ValueError(
            f"{path}: mode={meta['mode']!r}; expected one of {', '.join(MODE_CHANNELS)}"
        )
    size = meta["image_size"]
    if not (
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise ValueError(f"{path}: image_size={size!r}; expected [height, width]")
    names = meta["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: class_names={names!r}; expected a non-empty list of strings")
    if not isinstance(meta["method_params"], dict):
        raise ValueError(f"{path}: method_params={meta['method_params']!r}; expected an object")


def method_of(meta: dict) -> Method:
    """The method object of a checkpoint's ``model.json`` dict, with the parameters it was trained with."""
    return get_method(meta["method"], meta["method_params"])


def load_model_dir(directory: str | os.PathLike) -> tuple[Classifier, dict, TrainConfig]:
    """Rebuild a trained model from its checkpoint folder alone, in eval mode, on the CPU.

    Reads ``model.json`` (method and its parameters, backbone, class names, image size, mode),
    ``config.json`` (the TrainConfig, returned as saved: not validated, so paths of the training
    machine are neither resolved nor checked) and ``state.pt`` (``torch.load(weights_only=True)``,
    key ``"model"``). Returns ``(model, meta, cfg)`` with ``meta`` the ``model.json`` dict.

    Raises FileNotFoundError naming the file when one is missing, and ValueError naming the file
    when one is malformed or the weights do not fit the model it describes.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {d}")
    meta_path, cfg_path, state_path = d / META_FILE, d / CONFIG_FILE, d / STATE_FILE
    meta = _read_json(meta_path)
    _check_meta(meta, meta_path)
    cfg = _config_from_dict(_read_json(cfg_path), cfg_path)
    try:
        method = method_of(meta)
        backbone = build_backbone(
            meta["backbone"], MODE_CHANNELS[meta["mode"]], tuple(meta["image_size"])
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta_path}: {e}") from None
    model = Classifier(backbone, method.make_head(backbone.num_features, len(meta["class_names"])))
    if not state_path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {state_path}")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a corrupt or unsafe file
        raise ValueError(
            f"{state_path}: cannot load the weights ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{state_path}: expected a dict with a 'model' state_dict")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{state_path}: weights do not fit the model described in {meta_path.name} ({e})"
        ) from None
    return model.eval(), meta, cfg


def model_temperature(model: torch.nn.Module, meta: dict) -> float | None:
    """A checkpoint's temperature: ``method_params["temperature"]`` or the head's buffer (DisMax)."""
    t = meta.get("method_params", {}).get("temperature")
    if t is not None:
        return float(t)
    buf = getattr(getattr(model, "head", None), "temperature", None)
    if not isinstance(buf, torch.Tensor) or buf.numel() != 1:
        return None
    value = buf.detach().cpu().reshape(()).numpy()
    return float(str(value))  # the shortest decimal of a float32 buffer: 0.7, not 0.699999988


# ---------------------------------------------------------------------------
# images -> uint8 N x C x H x W
# ---------------------------------------------------------------------------


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a base64 string longer than a file name may be
        return False


def _decode_string(s: str) -> bytes | None:
    """Bytes of a base64 string (or ``data:...;base64,`` URI); None when it is not base64."""
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True) or None
    except (binascii.Error, ValueError):
        return None


class OODPredictor:
    """A trained detector ready to predict: model, method and the "don't know" threshold δ.

    ``predict(images)`` returns a pandas DataFrame with one row per image and the columns of
    ``COLUMNS`` (``df.to_dict("records")`` gives a list of dicts). ``images`` are uint8 pixels:

    * a numpy array (or tensor) ``N×H×W`` (mode "L"), ``N×C×H×W`` or ``N×H×W×C``; integer or
      float arrays are accepted when every value is a whole number in [0, 255];
    * a list of PIL images, file paths, or encoded PNG/JPEG bytes (or base64 strings of them),
      converted to the model's mode; a single one of these works too.

    Every image must have the model's size (a ValueError names expected and got sizes): nothing is
    resized, because the detector's scores depend on it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        meta: dict,
        config: TrainConfig | None = None,
        *,
        delta: Any = _KEEP,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
    ):
        _check_meta(meta, Path(META_FILE))
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.meta = meta
        self.config = config
        self.method = method_of(meta)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size: tuple[int, int] = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        self.mode: str = meta["mode"]
        self.channels = MODE_CHANNELS[self.mode]
        self.default_score: str = meta.get("default_score", self.method.default_score)
        self.threshold_score: str = meta.get("threshold_score", self.method.threshold_score)
        self.delta = meta.get("delta", self.method.params.get("delta")) if delta is _KEEP else delta

    @property
    def delta(self) -> float | None:
        return self._delta

    @delta.setter
    def delta(self, value) -> None:
        if value is not None:
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"delta={value} must lie in [0, 1] (a threshold on a probability) or be None"
                )
        self._delta = value

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, **kwargs) -> OODPredictor:
        """Load a checkpoint folder (see ``load_model_dir``); keyword arguments go to ``__init__``."""
        model, meta, cfg = load_model_dir(directory)
        return cls(model, meta, cfg, **kwargs)

    def with_delta(self, delta: float | None) -> OODPredictor:
        """A copy sharing the model, with δ = ``delta`` (None = no image is unknown)."""
        other = copy.copy(self)
        other.delta = delta
        return other

    # -- input -------------------------------------------------------------------------------

    def _size_error(self, got_hw, got_c=None) -> ValueError:
        h, w = self.image_size
        got = f"{got_hw[0]}x{got_hw[1]}" + (
            f" with {got_c} channel(s)" if got_c is not None else ""
        )
        return ValueError(
            f"image size mismatch: the model expects {h}x{w} (HxW) with {self.channels} channel(s) (mode {self.mode}), got {got}"
        )

    def _from_array(self, a: np.ndarray) -> np.ndarray:
        if a.dtype != np.uint8:
            if a.dtype == np.bool_ or not (
                np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
            ):
                raise ValueError(f"images must be uint8 pixels, got dtype {a.dtype}")
            if a.size and (
                not np.isfinite(a).all()
                or a.min() < 0
                or a.max() > 255
                or not np.array_equal(a, np.round(a))
            ):
                raise ValueError(
                    f"images must be uint8 pixels (whole numbers in [0, 255]), got dtype {a.dtype} with other values"
                )
            a = a.astype(np.uint8)
        h, w = self.image_size
        c = self.channels
        if a.ndim == 3:
            if c != 1:
                raise ValueError(
                    f"an N x H x W array is for mode L models; this model is {self.mode}: pass N x {c} x {h} x {w} or N x {h} x {w} x {c}"
                )
            a = a[:, None]
        elif a.ndim == 4:
            if a.shape[1:] == (h, w, c) or (
                a.shape[3] in (1, 3, 4) and a.shape[1] not in (1, 3, 4)
            ):
                a = a.transpose(0, 3, 1, 2)  # N x H x W x C
            if a.shape[1] != c:
                raise self._size_error(a.shape[2:], a.shape[1])
        else:
            raise ValueError(
                f"images array must be N x H x W, N x C x H x W or N x H x W x C, got shape {a.shape}"
            )
        if tuple(a.shape[2:]) != (h, w):
            raise self._size_error(a.shape[2:], a.shape[1])
        return np.ascontiguousarray(a)

    def _open(self, item) -> Image.Image:
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
        elif isinstance(item, str | os.PathLike):
            path = Path(item)
            if isinstance(item, os.PathLike) or _is_file(path):
                if not path.is_file():
                    raise FileNotFoundError(f"image file not found: {path}")
                with Image.open(path) as img:
                    img.load()
                    return img
            data = _decode_string(item)  # not a file: base64 (or a data: URI) of PNG/JPEG bytes
            if data is None:
                raise FileNotFoundError(
                    f"image file not found (nor a base64 image string): {item[:80]}"
                )
        else:
            raise ValueError(f"cannot read an image from a {type(item).__name__}")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises several types for undecodable data
            raise ValueError(
                f"cannot decode image bytes as PNG/JPEG/... ({type(e).__name__}: {e})"
            ) from None
        return img

    def _from_image(self, img: Image.Image) -> np.ndarray:
        if img.mode != self.mode:
            img = img.convert(self.mode)
        w, h = img.size
        if (h, w) != self.image_size:
            raise self._size_error((h, w))
        a = np.asarray(img, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def image_array(self, item, name: str | None = None) -> np.ndarray:
        """One image as a uint8 ``C×H×W`` array checked against the model's mode and size.

        ``item`` is a file path (``str`` or ``PathLike``; a string is always a path here, never
        base64), a PIL image, encoded PNG/JPEG bytes, or a numpy array / tensor of one image
        (``H×W`` for mode L, ``H×W×C`` or ``C×H×W``). It is converted to the model's mode, never
        resized. Errors start with the file path (or ``name``): FileNotFoundError for a missing
        file, ValueError for a file that is no image, a wrong size or wrong pixel values.
        """
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            where = name or str(path)
            if not path.exists():
                raise FileNotFoundError(f"{where}: image file not found")
            if not path.is_file():
                raise ValueError(f"{where}: not a file")
            try:
                with Image.open(path) as img:
                    img.load()
                    img = img.copy()
            except Exception as e:  # noqa: BLE001 - PIL raises several types for undecodable data
                raise ValueError(
                    f"{where}: not a readable image ({type(e).__name__}: {e})"
                ) from None
            return self._prefixed(where, self._from_image, img)
        where = name or f"image of type {type(item).__name__}"
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray):
            return self._prefixed(where, lambda a: self._from_array(a[None])[0], item)
        if isinstance(item, Image.Image | bytes | bytearray | memoryview):
            return self._prefixed(where, lambda i: self._from_image(self._open(i)), item)
        raise ValueError(
            f"{where}: cannot read an image from a {type(item).__name__} (give a file path, a PIL image, PNG/JPEG bytes or a numpy array)"
        )

    @staticmethod
    def _prefixed(where: str, fn, arg) -> np.ndarray:
        try:
            return fn(arg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_batch(self, images) -> np.ndarray:
        """The images as one uint8 array ``N×C×H×W`` checked against the model's mode and size.

        Also accepts a pandas DataFrame (or a dict) with a column ``image`` of encoded images.
        """
        if isinstance(images, pd.DataFrame | dict):
            if "image" not in images:
                cols = list(images.columns) if isinstance(images, pd.DataFrame) else list(images)
                raise ValueError(
                    f"a table of images needs a column 'image' of encoded PNG/JPEG bytes, got columns {cols}"
                )
            images = images["image"]
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if isinstance(images, pd.Series):
            images = images.tolist()
        if isinstance(images, np.ndarray) and images.dtype != object:
            return self._from_array(images)
        if isinstance(images, Image.Image | str | bytes | bytearray | os.PathLike):
            images = [images]
        if not isinstance(images, Iterable):
            raise ValueError(f"cannot read images from a {type(images).__name__}")
        items = list(images)
        if items and all(isinstance(i, np.ndarray | list) for i in items):  # nested lists (JSON)
            return self._from_array(np.asarray(items))
        c, (h, w) = self.channels, self.image_size
        if not items:
            return np.zeros((0, c, h, w), dtype=np.uint8)
        return np.stack([self._from_image(self._open(item)) for item in items])

    # -- scoring -----------------------------------------------------------------------------

    def outputs(self, images) -> dict[str, np.ndarray]:
        """The method's raw evaluation outputs: ``logits`` and every score, as numpy arrays."""
        batch = self.to_batch(images)
        parts: dict[str, list[np.ndarray]] = {}
        grad = torch.enable_grad() if self.method.eval_needs_grad else torch.no_grad()
        with grad:
            for i in range(0, len(batch), self.batch_size):
                x = torch.from_numpy(batch[i : i + self.batch_size]).to(self.device)
                x = x.float().div_(127.5).sub_(1.0)  # as ood_ray.evaluate.normalize
                out = self.method.eval_batch(self.model, x)
                for k, v in out.items():
                    parts.setdefault(k, []).append(v.detach().float().cpu().numpy())
        if not parts:
            k = len(self.class_names)
            return {
                "logits": np.zeros((0, k), np.float32),
                self.default_score: np.zeros(0, np.float32),
                self.threshold_score: np.zeros(0, np.float32),
            }
        return {k: np.concatenate(v) for k, v in parts.items()}

    def predict(self, images) -> pd.DataFrame:
        """One row per image with the columns of ``COLUMNS`` (see the class docstring for inputs)."""
        out = self.outputs(images)
        pred = out["logits"].argmax(1) if len(out["logits"]) else np.zeros(0, np.int64)
        thr = out[self.threshold_score].astype(np.float64)
        unknown = thr < self.delta if self.delta is not None else np.zeros(len(thr), bool)
        names = (
            np.asarray(self.class_names, dtype=object)[pred] if len(pred) else np.zeros(0, object)
        )
        return pd.DataFrame(
            {
                "predicted_class": pred.astype(np.int64),
                "class_name": names,
                "label": np.where(unknown, UNKNOWN_LABEL, names).astype(object),
                "unknown": unknown.astype(bool),
                "score_name": self.default_score,
                "score": out[self.default_score].astype(np.float64),
                "threshold_score": self.threshold_score,
                "threshold_value": thr,
                "delta": self.delta,
            },
            columns=list(COLUMNS),
        )


# ---------------------------------------------------------------------------
# MLflow pyfunc
# ---------------------------------------------------------------------------


class OODPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper of ``OODPredictor``; the checkpoint folder is the artifact "checkpoint".

    ``predict`` accepts a numpy array of uint8 pixels (``N×H×W``, ``N×C×H×W`` or ``N×H×W×C``; the
    nested lists of a JSON ``{"inputs": ...}`` request too) or a pandas DataFrame with a column
    ``image`` of encoded PNG/JPEG bytes or base64 strings of them (a ``{"dataframe_split": ...}``
    request to ``mlflow models serve``), and returns the DataFrame of ``OODPredictor.predict``.

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
        return predictor.predict(model_input)


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
    src = Path(__file__).resolve().parent
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
    threshold score, δ, class names, image size, mode, backbone and (DisMax, or a ``temperature``
    method parameter) the temperature.

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


# ---------------------------------------------------------------------------
# MLflow model URI -> predictions
# ---------------------------------------------------------------------------


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
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise ModelLoadError(
                f"cannot load model {model_uri}: MLflow tracking server {uri} is unreachable ({type(e).__name__}: {e})"
            ) from None
        if r.status_code != 200:
            raise ModelLoadError(
                f"cannot load model {model_uri}: MLflow tracking server {uri} answered /health with HTTP {r.status_code}"
            )
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
        if not db.is_file():
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
            f"{model_uri}: not an ood-ray model (no 'checkpoint' artifact in its MLmodel; such models are logged by ood_ray.serve.log_ood_model)"
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
    a ``delta`` outside [0, 1].
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
    from .config import default_tracking_uri

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
    for this call (None keeps it; 0 makes every image known, since scores are not negative).

    Each dict has ``image`` (the path as given, None for in-memory images) and the columns of
    ``COLUMNS`` as plain Python values (JSON-ready): ``class_name``, ``score_name`` and
    ``score`` (the method's default score), ``threshold_score`` and ``threshold_value`` (the
    score δ applies to), ``delta`` (None when off), ``unknown`` (threshold_value < δ) and
    ``label`` (class_name, or "unknown").
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
