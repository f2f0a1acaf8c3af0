"""Selective classification: how good the predictions a score accepts are ("don't know" on ID).

Pure numpy; no torch, Ray, MLflow or I/O.

A classifier that may abstain accepts the ID samples whose score is at least a threshold
(HIGHER = MORE in-distribution, as everywhere in :mod:`ood_ray.metrics`) and answers only for them.
Lowering the threshold from the highest score to the lowest traces the **risk-coverage curve**
(Geifman & El-Yaniv, NeurIPS 2017):

- coverage(t) = share of ID samples with score >= t,
- risk(t)     = error rate of the classifier on those samples.

Ties: thresholds sit only at distinct score values, so samples with the same score are accepted
together (one point of the curve per distinct score, as the ROC curves of ``metrics.py``).

AURC is the area under that curve as a step function: with the points ``(c_j, r_j)`` ordered by
coverage and ``c_0 = 0``, ``AURC = sum_j (c_j - c_{j-1}) * r_j``.  Without ties this is
``(1/n) sum_k risk(top k)``, the estimator of Geifman, Uziel & El-Yaniv (ICLR 2019), who also
define E-AURC = AURC - AURC*, where AURC* = r + (1 - r) ln(1 - r) is the area under the curve of
an oracle that accepts every correct prediction before any error (r = the error rate at full
coverage): its risk is 0 up to coverage 1 - r and (c - (1 - r)) / c beyond, whose integral over
[0, 1] is that closed form.  On n samples the oracle's own step sum exceeds the closed form by
about r / (2n), so E-AURC of a perfect ranking is that small positive number, never negative.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["COVERAGE_LEVELS", "risk_coverage_curve", "oracle_aurc", "oracle_risk", "selective_metrics"]

#: Coverages at which the accuracy of the accepted samples is reported.
COVERAGE_LEVELS = (0.80, 0.90, 0.95)


def _check(scores, correct) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contains {int((~np.isfinite(s)).sum())} non-finite value(s) out of {s.size}")
    c = np.asarray(correct)
    if c.shape != s.shape:
        raise ValueError(f"correct must have the shape of scores {s.shape}, got {c.shape}")
    if c.dtype != np.bool_:
        cf = c.astype(np.float64)
        if not np.all((cf == 0.0) | (cf == 1.0)):
            raise ValueError("correct must be boolean (or 0/1) per sample")
        c = cf == 1.0
    return s, c


def risk_coverage_curve(scores, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coverage, risk, thresholds)``: one point per distinct score, highest score first.

    ``coverage[j]`` is the share of samples with ``score >= thresholds[j]`` and ``risk[j]`` the
    share of wrong predictions (``correct`` False) among them; coverage rises to 1.
    """
    s, c = _check(scores, correct)
    order = np.argsort(s)[::-1]  # only the groups' counts matter: no stable sort needed
    s_sorted = s[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    accepted = (ends + 1).astype(np.float64)
    errors = np.cumsum(~c[order])[ends].astype(np.float64)
    return accepted / s.size, errors / accepted, s_sorted[ends]


def oracle_aurc(error_rate: float) -> float:
    """AURC* = r + (1 - r) ln(1 - r): the area under the oracle's risk-coverage curve."""
    r = float(error_rate)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"error_rate must lie in [0, 1], got {error_rate!r}")
    q = 1.0 - r
    return r + (q * math.log(q) if q > 0.0 else 0.0)


def oracle_risk(coverage, error_rate: float) -> np.ndarray:
    """The oracle's risk at ``coverage``: 0 up to 1 - r, then (c - (1 - r)) / c."""
    cov = np.asarray(coverage, dtype=np.float64)
    q = 1.0 - float(error_rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cov > q, (cov - q) / np.where(cov > 0, cov, 1.0), 0.0)


def selective_metrics(scores, correct, levels=COVERAGE_LEVELS) -> dict[str, float]:
    """AURC, E-AURC and the accuracy of the accepted samples at each coverage of ``levels``.

    - ``aurc``: step area under the risk-coverage curve (lower is better; see the module doc).
    - ``eaurc``: ``aurc - oracle_aurc(r)`` with r the error rate of all samples (lower is better).
    - ``acc_at_cov80`` (for level 0.80, etc.): 1 - risk at the first threshold (from the highest
      score down) whose coverage is >= the level; a tie group that crosses the level is accepted
      whole, so the coverage reached can exceed it.
    """
    coverage, risk, _ = risk_coverage_curve(scores, correct)
    aurc = float(np.sum(np.diff(coverage, prepend=0.0) * risk))
    out = {"aurc": aurc, "eaurc": aurc - oracle_aurc(risk[-1])}
    for level in levels:
        if not 0.0 < level <= 1.0:
            raise ValueError(f"coverage levels must lie in (0, 1], got {level!r}")
        out[f"acc_at_cov{round(100 * level)}"] = float(1.0 - risk[np.argmax(coverage >= level)])
    return out
