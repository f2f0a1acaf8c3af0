"""What every figure of :mod:`ood_ray.plots` shares: the Agg backend, input checks, saving."""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported: the figures' modules use it)

_DPI = 120



# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _scores(values, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 array, or ValueError naming ``name``."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of numeric scores ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); at least one score is required")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} non-finite value(s) out of {arr.size} (first: {arr[i]} at index {i})"
        )
    return arr


def _named_arrays(mapping, arg: str, what: str) -> dict[str, object]:
    """Check that ``mapping`` is a non-empty dict with non-empty string keys."""
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"{arg} must be a dict mapping {what} name to array, got {type(mapping).__name__}"
        )
    if len(mapping) == 0:
        raise ValueError(f"{arg} is empty; at least one {what} is required")
    for key in mapping:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{arg} keys must be non-empty strings ({what} names), got {key!r}")
    return dict(mapping)


def _ood_sets(ood_scores) -> dict[str, np.ndarray]:
    sets = _named_arrays(ood_scores, "ood_scores", "OOD set")
    return {name: _scores(v, f"ood_scores[{name!r}]") for name, v in sets.items()}


def _positive_int(value, name: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or isinstance(value, bool) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _out_path(path) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise ValueError(f"path must be a non-empty str or Path, got {path!r}")
    return Path(path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    return path


def _ood_positive(id_arr: np.ndarray, ood_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = OOD) and anomaly scores (``-score``) for ``roc_curve``."""
    y = np.concatenate(
        [np.zeros(id_arr.size, dtype=np.int64), np.ones(ood_arr.size, dtype=np.int64)]
    )
    return y, -np.concatenate([id_arr, ood_arr])

