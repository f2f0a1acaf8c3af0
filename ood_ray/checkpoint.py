"""The one checkpoint format: a folder with the weights, the training config and the model card.

Files (every checkpoint Ray Train or Tune persists, every model logged to MLflow carries one):

* ``state.pt``: ``{"model", "optimizer", "scheduler", "epoch", "method_state"}``, read with
  ``torch.load(weights_only=True)`` so nothing is unpickled;
* ``config.json``: the ``TrainConfig`` (with the post-hoc values chosen written into
  ``method_params``);
* ``model.json``: what serving needs without the training code's config: method and its
  parameters, backbone, class names, image size, mode, the scores and δ (``model_meta``);
* ``metrics.json``: the epoch's reported metrics (to report a finished run again on resume).

``load_model_dir`` rebuilds the model from the folder alone; no dataset is read. Plain torch: no
Ray, no MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
from pathlib import Path

import torch

from .config import TrainConfig
from .methods import Method, get_method
from .methods.with_detector import WithDetector
from .models import Classifier, Preprocess, build_backbone

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "model.json"
METRICS_FILE = "metrics.json"

MODE_CHANNELS = {"L": 1, "RGB": 3}
REQUIRED_META = ("method", "method_params", "backbone", "class_names", "image_size", "mode")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def model_meta(cfg: TrainConfig, class_names: list[str], image_size, mode: str, scoring=None, model=None) -> dict:
    """The ``model.json`` of a model trained with ``cfg`` on images of ``mode`` and ``image_size``.

    ``scoring``: the ``WithDetector`` chosen after training, whose detector then gives the
    default and threshold scores and δ (recorded under ``detector``: name, parameters, δ).
    ``model``: the ``Classifier``, whose preprocessing (``preprocess``) and starting weights
    (``pretrained``: source, file, sha256) are recorded."""
    m = get_method(cfg.method, cfg.method_params)
    meta = {
        "method": cfg.method,
        "method_params": m.params,
        "backbone": cfg.backbone,
        "class_names": list(class_names),
        "image_size": list(image_size),
        "mode": mode,
        "default_score": m.default_score,
        "threshold_score": m.threshold_score,
        "delta": m.params.get("delta"),
        "exported_output": m.exported_output,
        "normalization": "x / 127.5 - 1 on uint8 pixels",
        "head_pooling": cfg.head_pooling,
    }
    prep = getattr(model, "preprocess", None)
    if prep is not None:
        meta["preprocess"] = prep.to_dict()
        meta["normalization"] = prep.describe()
    if getattr(model, "weights_record", None):
        meta["pretrained"] = model.weights_record
    if isinstance(scoring, WithDetector):
        meta.update(default_score=scoring.default_score, threshold_score=scoring.threshold_score, delta=scoring.delta, detector=scoring.describe())
    return meta


def save_checkpoint(directory: str, model, opt, sched, epoch: int, method_state: dict, cfg: TrainConfig, meta: dict, detector=None) -> None:
    """Write the checkpoint files; ``detector``: the fitted post-hoc detector, whose statistics
    (``Detector.state()``, tensors) go into ``state.pt`` under ``"detector"``."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "method_state": method_state,
    }
    if detector is not None:
        state["detector"] = detector.state()
    torch.save(state, os.path.join(directory, STATE_FILE))
    cfg.save(os.path.join(directory, CONFIG_FILE))
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_state(directory: str) -> dict:
    """A checkpoint's tensors; ``weights_only`` so nothing is unpickled."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def init_weights(model: Classifier, directory: str) -> None:
    """Fine-tuning: the backbone's weights from a checkpoint, and the head's when it has the same shape."""
    saved = load_state(directory)["model"]
    model.backbone.load_state_dict({k[len("backbone.") :]: v for k, v in saved.items() if k.startswith("backbone.")})
    head = {k[len("head.") :]: v for k, v in saved.items() if k.startswith("head.")}
    own = model.head.state_dict()
    if head.keys() == own.keys() and all(v.shape == own[k].shape for k, v in head.items()):
        model.head.load_state_dict(head)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested deeper than Python's recursion limit)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(d: dict, path: Path) -> TrainConfig:
    """A TrainConfig as saved, without ``validate``: serving must not resolve or check training paths
    (``init_checkpoint``, ``storage_path``, the tracking URI) of the machine that trained."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown)} (written by a newer ood_ray?)"
        )
    return TrainConfig(**d)


def check_meta(meta: dict, path: Path) -> None:
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
    detector = meta.get("detector")
    for key, value in (("delta", meta.get("delta")), ("detector.delta", detector.get("delta") if isinstance(detector, dict) else None)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)):
            raise ValueError(f"{path}: {key}={value!r}; expected a finite number or null")


def preprocess_of(meta: dict, meta_path: Path | str = META_FILE) -> Preprocess:
    """The preprocessing a ``model.json`` records; ``x / 127.5 - 1`` at the stored size when it
    records none (checkpoints written before models carried their preprocessing)."""
    if "preprocess" in meta:
        return Preprocess.from_dict(meta["preprocess"], f"{meta_path}: preprocess")
    return Preprocess.scaled(MODE_CHANNELS[meta["mode"]])


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
    meta = read_json(meta_path)
    check_meta(meta, meta_path)
    cfg = config_from_dict(read_json(cfg_path), cfg_path)
    try:
        method = method_of(meta)
        prep = preprocess_of(meta, meta_path)
        backbone = build_backbone(meta["backbone"], prep.channels, prep.input_size(tuple(meta["image_size"])), pooling=meta.get("head_pooling", "avg"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{meta_path}: {e}") from None
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
    num_classes = len(meta["class_names"])
    with torch.device("meta"):  # shapes only: nothing is allocated for the head model.json describes
        shapes = Classifier(backbone, method.make_head(backbone.num_features, num_classes)).state_dict()
    check_weights(state["model"], shapes, state_path, f"{meta_path.name} ({num_classes} class names)")
    model = Classifier(backbone, method.make_head(backbone.num_features, num_classes), preprocess=prep)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{state_path}: weights do not fit the model described in {meta_path.name} ({e})"
        ) from None
    if meta.get("detector"):
        model.detector = restore_detector(model, method, meta["detector"], state.get("detector"), meta_path, state_path)
    return model.eval(), meta, cfg


def check_weights(saved: dict, expected: dict, state_path: Path, described: str) -> None:
    """Refuse saved weights that lack or add tensors, differ in shape or kind from ``expected``
    (a state_dict of the model ``described``, possibly on the meta device), or hold NaN or inf;
    one line naming ``state_path`` and the first tensor at fault."""
    where = f"{state_path}: weights do not fit the model described in {described}"
    missing = [k for k in expected if k not in saved]
    extra = [str(k) for k in saved if k not in expected]
    if missing or extra:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra else ""]
        raise ValueError(f"{where}: {'; '.join(p for p in parts if p)}")
    for key, want in expected.items():
        got = saved[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{where}: {key} is a {type(got).__name__}, not a tensor")
        if got.shape != want.shape:
            raise ValueError(f"{where}: {key} has shape {list(got.shape)}, the model needs {list(want.shape)}")
        if got.is_floating_point() != want.is_floating_point() or got.is_complex():
            raise ValueError(f"{where}: {key} has dtype {got.dtype}, the model needs {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValueError(f"{state_path}: tensor {key} holds {bad} NaN or infinite value(s) of {got.numel()}; refusing a model that cannot score")


def restore_detector(model: Classifier, method: Method, info, saved, meta_path: Path, state_path: Path):
    """The fitted detector ``model.json`` names (``info``), from its statistics in ``state.pt``."""
    from .detectors import make_detector

    if not isinstance(info, dict) or not isinstance(info.get("name"), str) or not isinstance(info.get("params", {}), dict):
        raise ValueError(f"{meta_path}: detector={info!r}; expected an object with a name and params")
    if not isinstance(saved, dict):
        raise ValueError(f"{state_path}: {meta_path.name} names the detector {info['name']!r} but no fitted detector is saved")
    try:
        det = make_detector(info["name"], **info.get("params", {}))
        logits_of = (lambda x: method.logits(model(x))) if det.needs_model else None
        head = copy.deepcopy(method.class_head(model.head)).eval().requires_grad_(False)  # stays on the CPU with the statistics
        return det.restore(saved, head, model=logits_of, feature_dim=model.num_features)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{state_path}: cannot restore the detector {info['name']!r} ({e})") from None


def model_temperature(model: torch.nn.Module, meta: dict) -> float | None:
    """A trained model's calibration temperature, as its method declares it (``Method.temperature``)."""
    return method_of(meta).temperature(model)


class ExportedModel(torch.nn.Module):
    """The model as exported: normalized images in, one tensor out (``method.flat_output``)."""

    def __init__(self, model: torch.nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.flat_output(self.model(x))
