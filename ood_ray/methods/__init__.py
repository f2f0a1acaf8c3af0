"""Training methods by name.

Adding a method: one new module in this folder (a ``Method`` subclass, see ``base.Method`` for the
contract) plus one ``"module:Class"`` line in ``REGISTRY``. The CLI, the tuner, MLflow records
and the serving code all read the method from ``METHODS``.
"""

from __future__ import annotations

import importlib

from .base import Method, StepResult, energy, msp

REGISTRY = (
    "softmax:Softmax",
    "outlier_exposure:OutlierExposure",
    "confidence:Confidence",
    "dismax:DisMax",
    "logitnorm:LogitNorm",
    "rotpred:RotPred",
    "t2fnorm:T2FNorm",
)


def _load(entry: str) -> type[Method]:
    module, cls = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in map(_load, REGISTRY)}


def get_method(name: str, params: dict | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](params)


__all__ = ["METHODS", "REGISTRY", "Method", "StepResult", "energy", "get_method", "msp"]
