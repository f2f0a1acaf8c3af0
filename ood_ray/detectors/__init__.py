"""Post-hoc OOD detectors by name: fitted on train-split penultimate features, plain torch.

    det = make_detector("knn", k=50).fit(features, labels, head)
    scores = det.score(test_features)   # 1-D float64, higher = more in-distribution

See ``base.Detector`` for the contract. Adding a detector: one module in this folder (a
``Detector`` subclass) and one entry in ``DETECTORS`` below.
"""

from __future__ import annotations

from typing import Any

from .ash import ASH
from .base import Detector, DetectorError
from .energy import Energy
from .fdbd import FDBD
from .gen import GEN
from .knn import KNN
from .mahalanobis import Mahalanobis
from .maxlogit import MaxLogit
from .msp import MSP
from .nac import NAC
from .nnguide import NNGuide
from .odin import ODIN
from .react import ReAct
from .rmds import RMDS
from .scale import Scale
from .tempscale import TempScale
from .vim import ViM

DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (MSP, MaxLogit, Energy, GEN, ODIN, Mahalanobis, KNN, ViM, ReAct, ASH, Scale, FDBD, RMDS, NNGuide, TempScale, NAC)
}


def make_detector(name: str, **params: Any) -> Detector:
    """The detector registered as ``name`` with ``params`` (defaults for the rest).

    Raises DetectorError (a ValueError) for an unknown name, an unknown parameter or a bad value.
    """
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS)}")
    return DETECTORS[name](**params)


__all__ = ["DETECTORS", "Detector", "DetectorError", "make_detector"]
