"""A trained method scored by a fitted post-hoc detector (``ood_ray.detectors``).

``WithDetector(method, detector, delta)`` behaves like ``method`` everywhere (training hooks,
logits, its own scores) except that its evaluation outputs carry one more score, named after the
detector, which becomes the default score (the run's AUROC, FPR95, ...) and the threshold score
that δ applies to. δ here is a threshold on the detector's score (any real number), kept apart
from the method's own ``delta`` parameter, which stays a threshold on the method's own score.

A detector that reads inner layers (``needs_layers``, NAC) probes ``model`` on the batch itself.
Feature detectors hold a CPU copy of the class head and score on the CPU (features are moved
there), so a model moved to a GPU afterwards leaves them consistent.

A detector's score replaces a method score of the same name (``msp`` and ``energy`` of a linear
head are the same numbers computed the same way).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Method


class WithDetector:
    """``method`` with ``detector`` (fitted) as its default and threshold score; δ on that score."""

    threshold_range = (-math.inf, math.inf)

    def __init__(self, method: Method, detector, delta: float | None):
        self.method = method
        self.detector = detector
        self.delta = None if delta is None else float(delta)
        self.default_score = self.threshold_score = detector.name
        self.eval_needs_grad = method.eval_needs_grad  # ODIN enables the input gradient it needs itself

    def __getattr__(self, name: str):  # everything else is the method's
        if name == "method":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.method, name)

    def score_names(self) -> list[str]:
        names = self.method.score_names()
        return names if self.detector.name in names else [*names, self.detector.name]

    def eval_batch(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.method.eval_batch(model, x)
        if self.detector.needs_layers:  # reads inner layers: probes (with gradients) of this batch
            probes = self.detector.probe(model, x, lambda v: self.method.logits(model(v)))
            out[self.detector.name] = self.detector.score({k: v.cpu() for k, v in probes.items()})
        elif self.detector.needs_model:  # scores images (input preprocessing): it runs the model itself
            out[self.detector.name] = self.detector.score(x).detach()
        else:  # the fitted statistics and the head copy it holds live on the CPU
            with torch.no_grad():
                out[self.detector.name] = self.detector.score(model.features(x).float().cpu())
        return out

    def describe(self) -> dict:
        """What ``model.json`` records under ``detector``."""
        return {"name": self.detector.name, "params": dict(self.detector.params), "delta": self.delta}


def scoring_method(method: Method, model: nn.Module, meta: dict):
    """The method a loaded checkpoint is scored with: ``method`` itself, or wrapped with the fitted
    detector ``model.detector`` when ``model.json`` names one (``meta["detector"]``)."""
    info = meta.get("detector")
    if not info:
        return method
    det = getattr(model, "detector", None)
    if det is None or det.name != info.get("name"):
        raise ValueError(f"model.json names the detector {info.get('name')!r} but the weights carry no fitted detector of that name")
    return WithDetector(method, det, info.get("delta"))
