"""Training methods by name. Adding a method: one new module plus one line here."""

from .base import Method, StepResult, energy, msp
from .confidence import Confidence
from .dismax import DisMax
from .outlier_exposure import OutlierExposure
from .softmax import Softmax

METHODS: dict[str, type[Method]] = {
    Softmax.name: Softmax,
    OutlierExposure.name: OutlierExposure,
    Confidence.name: Confidence,
    DisMax.name: DisMax,
}


def get_method(name: str, params: dict | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name](params)


__all__ = ["METHODS", "Method", "StepResult", "energy", "get_method", "msp"]
