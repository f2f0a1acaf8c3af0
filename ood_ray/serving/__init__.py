"""Serving a trained detector: rebuild it from a checkpoint, predict with its "don't know" rule.

Layers, each usable alone:

* ``load_model_dir(directory)`` (``ood_ray.checkpoint``) rebuilds the ``Classifier`` from the
  checkpoint folder alone; no dataset or benchmark is read.
* ``OODPredictor`` (``predictor``) is the plain Python API: uint8 pixels (arrays, PIL images,
  files or encoded bytes; checked by ``images.ImageInput``) in, one row per image out, as a
  pandas DataFrame with the columns of ``COLUMNS``.
* ``OODPyfuncModel`` / ``log_ood_model`` (``pyfunc``) wrap it as an MLflow pyfunc model.
* ``load_predictor(model_uri)`` / ``predict(model_uri, images)`` (``load``) go the other way: an
  MLflow model URI or a folder -> ``OODPredictor`` -> one dict per image; ``ood-ray predict`` is
  their command line.

Nothing here imports Ray or the training code: serving needs torch, torchvision, numpy, pandas,
pillow and mlflow (and what ``ood_ray.methods`` imports: scipy, scikit-learn).
"""

from ..checkpoint import load_model_dir, model_temperature
from .load import ModelLoadError, load_predictor, predict
from .predictor import COLUMNS, UNKNOWN_LABEL, OODPredictor
from .pyfunc import SERVING_PACKAGES, OODPyfuncModel, log_ood_model, output_schema

__all__ = [
    "COLUMNS",
    "SERVING_PACKAGES",
    "UNKNOWN_LABEL",
    "ModelLoadError",
    "OODPredictor",
    "OODPyfuncModel",
    "load_model_dir",
    "load_predictor",
    "log_ood_model",
    "model_temperature",
    "output_schema",
    "predict",
]
