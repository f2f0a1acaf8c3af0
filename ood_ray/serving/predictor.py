"""``OODPredictor``: a trained detector with its "don't know" rule, as a plain Python API.

An image is "unknown" when the method's threshold score (``msp`` for softmax / OE / LogitNorm,
``confidence`` for the confidence branch, ``confidence_pre`` when it preprocesses inputs, ``mps``
for DisMax, or the post-hoc detector's score when the checkpoint carries one; as recorded in
``model.json``) is below δ, the rule of
``ood_ray.engine.evaluate.threshold_metrics``; with δ = None no image is unknown on its score.
An image whose threshold or default score is NaN or infinite is always unknown (a broken model
must not answer "known": ``nan < δ`` is false).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checkpoint import META_FILE, check_meta, load_model_dir, method_of
from ..config import TrainConfig
from ..engine.evaluate import normalize
from ..methods.with_detector import scoring_method
from .images import ImageInput

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

_KEEP = object()  # "use the checkpoint's δ"


class OODPredictor(ImageInput):
    """A trained detector ready to predict: model, method and the "don't know" threshold δ.

    ``predict(images)`` returns a pandas DataFrame with one row per image and the columns of
    ``COLUMNS`` (``df.to_dict("records")`` gives a list of dicts). ``images`` are uint8 pixels:

    * a numpy array (or tensor) ``N×H×W`` (mode "L"), ``N×C×H×W`` or ``N×H×W×C``; integer or
      float arrays are accepted when every value is a whole number in [0, 255];
    * a list of PIL images, file paths, or encoded PNG/JPEG bytes (or base64 strings of them),
      converted to the model's mode (16-bit images scaled to 8 bits); a single one of these works
      too. ``predict(images, paths=False)`` takes strings as base64 only (the pyfunc model does).

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
        check_meta(meta, Path(META_FILE))
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.meta = meta
        self.config = config
        self.method = scoring_method(method_of(meta), model, meta)  # with the checkpoint's detector, if any
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.class_names: list[str] = list(meta["class_names"])
        ImageInput.__init__(self, meta["mode"], meta["image_size"])
        self.default_score: str = meta.get("default_score", self.method.default_score)
        self.threshold_score: str = meta.get("threshold_score", self.method.threshold_score)
        names = self.method.score_names()
        for key in ("default_score", "threshold_score"):
            if getattr(self, key) not in names:
                raise ValueError(f"{META_FILE}: {key} {getattr(self, key)!r} is not a score of method {self.method.name!r} ({', '.join(names)})")
        self.delta = meta.get("delta", self.method.params.get("delta")) if delta is _KEEP else delta

    @property
    def delta(self) -> float | None:
        return self._delta

    @delta.setter
    def delta(self, value) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"delta={value!r} must be a finite number or None")
            value = float(value)
            low, high = self.method.threshold_range
            what = "a threshold on a probability" if (low, high) == (0.0, 1.0) else f"the range of the threshold score {self.threshold_score!r}"
            if not low <= value <= high:
                raise ValueError(
                    f"delta={value} must lie in [{low:g}, {high:g}] ({what}) or be None"
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

    # -- input: image_array / to_batch of ImageInput (images.py) --------------------------------

    # -- scoring -----------------------------------------------------------------------------

    def outputs(self, images, *, paths: bool = True) -> dict[str, np.ndarray]:
        """The method's raw evaluation outputs: ``logits`` and every score, as numpy arrays.

        ``paths=False``: strings are base64 images only, never file paths (see ``to_batch``)."""
        batch = self.to_batch(images, paths=paths)
        parts: dict[str, list[np.ndarray]] = {}
        grad = torch.enable_grad() if self.method.eval_needs_grad else torch.no_grad()
        with grad:
            for i in range(0, len(batch), self.batch_size):
                x = normalize(torch.from_numpy(batch[i : i + self.batch_size]), self.device, self.model)  # the model's own preprocessing
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

    def predict(self, images, *, paths: bool = True) -> pd.DataFrame:
        """One row per image with the columns of ``COLUMNS`` (see the class docstring for inputs);
        ``paths=False`` refuses file paths (strings are base64 images only)."""
        return self.frame(self.outputs(images, paths=paths))

    def frame(self, out: dict[str, np.ndarray]) -> pd.DataFrame:
        """The rows of ``predict`` from outputs already computed by ``outputs`` (no second pass)."""
        pred = out["logits"].argmax(1) if len(out["logits"]) else np.zeros(0, np.int64)
        thr = out[self.threshold_score].astype(np.float64)
        score = out[self.default_score].astype(np.float64)
        unknown = ~(np.isfinite(thr) & np.isfinite(score))  # NaN/inf: never "known"
        if self.delta is not None:
            unknown |= thr < self.delta
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
                "score": score,
                "threshold_score": self.threshold_score,
                "threshold_value": thr,
                "delta": self.delta,
            },
            columns=list(COLUMNS),
        )
