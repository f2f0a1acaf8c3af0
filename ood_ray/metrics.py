"""Classification and out-of-distribution (OOD) detection metrics.

Pure numpy + scikit-learn; no torch, Ray, MLflow or I/O.

Score orientation
-----------------
Every OOD score in this module is oriented so that a HIGHER score means MORE
in-distribution (ID).  A sample is accepted as ID when ``score >= threshold``
and flagged as OOD / "unknown" otherwise.

Two FPR-at-95%-TPR conventions
------------------------------
The literature uses two different quantities under the name "FPR95", and both
are reported:

``fpr95`` (Outlier Exposure paper, OpenOOD)
    OOD is the positive class and the anomaly score is ``-score``.  The
    threshold is the first one (scanning from strict to lenient) at which at
    least 95% of the OOD samples are flagged; the value is the fraction of ID
    samples that are wrongly flagged as OOD at that threshold.

``fpr95_in`` (ODIN, DeVries & Taylor)
    ID is the positive class and the score is used as is.  The threshold is the
    first one at which at least 95% of the ID samples are accepted; the value is
    the fraction of OOD samples wrongly accepted (``score >= threshold``).

The two coincide only in special cases; they should not be compared with each
other across papers.

Two areas under the precision-recall curve
------------------------------------------
``aupr_in`` / ``aupr_out`` are scikit-learn's average precision: the step sum
``sum_k (R_k - R_{k-1}) * P_k`` over the thresholds.  ``aupr_in_trapz`` /
``aupr_out_trapz`` are the trapezoid under the same curve,
``sklearn.metrics.auc(recall, precision)`` on ``precision_recall_curve`` (which
ends at recall 0, precision 1), as OpenOOD v1.5 and pytorch-ood compute their
AUPR-In / AUPR-Out.  They differ wherever precision changes between two
recall levels: the trapezoid interpolates linearly (also from the end point
(0, 1)), which precision-recall space does not allow, and is usually, not
always, the larger.  On constant scores AP is the positive share p and the
trapezoid (1 + p) / 2.

Ties
----
All threshold-based OOD metrics use :func:`sklearn.metrics.roc_curve` (with
``drop_intermediate=False``), which only places thresholds at distinct score
values.  Samples with the same score are therefore always on the same side of
every threshold: a tie between an ID and an OOD score is never split
arbitrarily (and AUROC counts such a pair as one half).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "ood_metrics",
    "threshold_report",
    "classification_metrics",
    "mean_over_sets",
]

_RECALL_LEVEL = 0.95


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _check_scores(scores, name: str) -> np.ndarray:
    """Convert ``scores`` to a finite, non-empty 1-D float64 array."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one score is required")
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} contains {n_nan + n_inf} non-finite value(s) "
            f"({n_nan} NaN, {n_inf} inf) out of {arr.size}"
        )
    return arr


def _check_probs_targets(
    probs, targets, name: str = "probs", allow_inf: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate an (N, K) score matrix and N integer targets in [0, K)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got an array of shape {p.shape}")
    if t.ndim != 1:
        raise ValueError(f"targets must be 1-D (N,), got an array of shape {t.shape}")
    n, k = p.shape
    if t.shape[0] != n:
        raise ValueError(
            f"length mismatch: {name} has {n} rows but targets has {t.shape[0]} entries"
        )
    if n == 0:
        raise ValueError(f"{name} and targets are empty; at least one sample is required")
    if k == 0:
        raise ValueError(f"{name} has 0 classes (shape {p.shape})")
    bad = np.isnan(p) if allow_inf else ~np.isfinite(p)
    if bad.any():
        what = "NaN" if allow_inf else "non-finite (NaN/inf)"
        raise ValueError(f"{name} contains {int(bad.sum())} {what} value(s)")
    if not np.isfinite(t).all() or not np.array_equal(t, np.round(t)):
        raise ValueError("targets must be finite integer class indices")
    if t.min() < 0 or t.max() >= k:
        raise ValueError(
            f"targets must lie in [0, {k}) for {k} classes; "
            f"got min {int(t.min())}, max {int(t.max())}"
        )
    return p, t.astype(np.int64)


# ---------------------------------------------------------------------------
# classification metrics
# ---------------------------------------------------------------------------


def accuracy(probs_or_logits, targets) -> float:
    """Top-1 accuracy: mean over i of [argmax_k x[i, k] == y_i].

    Works on probabilities or logits (argmax is the same); ties in the argmax
    resolve to the lowest class index, as in ``np.argmax``.
    """
    p, t = _check_probs_targets(probs_or_logits, targets, "probs_or_logits", allow_inf=True)
    return float(np.mean(np.argmax(p, axis=-1) == t))


def nll(probs, targets, eps: float = 1e-12) -> float:
    """Negative log-likelihood: mean over i of -log(clip(probs[i, y_i], eps, 1))."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    p, t = _check_probs_targets(probs, targets)
    picked = np.clip(p[np.arange(p.shape[0]), t], eps, 1.0)
    return float(np.mean(-np.log(picked)))


def ece(probs, targets, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins.

    confidence_i = max_k probs[i, k], prediction_i = argmax_k probs[i, k].
    Bin b covers (b/n_bins, (b+1)/n_bins] (right-inclusive); a confidence of
    exactly 0 goes into the first bin.  With n_b samples in bin b,

        ECE = sum_b (n_b / N) * |acc_b - conf_b|,

    where acc_b and conf_b are the mean correctness and mean confidence in bin b
    (empty bins contribute 0).
    """
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    p, t = _check_probs_targets(probs, targets)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": a confidence equal to edges[j] gets j, i.e. bin j-1 = (edges[j-1], edges[j]].
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = conf.shape[0]
    sum_correct = np.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    # (n_b / N) * |acc_b - conf_b| == |sum_correct_b - sum_conf_b| / N
    return float(np.sum(np.abs(sum_correct - sum_conf)) / n)


def classification_metrics(probs, targets, n_bins: int = 15) -> dict[str, float]:
    """Return ``{"acc": accuracy, "nll": nll, "ece": ece}`` for (N, K) probabilities."""
    return {
        "acc": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": ece(probs, targets, n_bins=n_bins),
    }


# ---------------------------------------------------------------------------
# OOD detection metrics
# ---------------------------------------------------------------------------


def _fpr_at_recall(y_true: np.ndarray, score: np.ndarray, level: float) -> float:
    """FPR at the first roc_curve threshold where TPR >= level (positive label 1)."""
    fpr, tpr, _ = roc_curve(y_true, score, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= level)])


def _trapz_auprs(scores: np.ndarray, is_in: np.ndarray) -> tuple[float, float]:
    """Trapezoid areas under the PR curves: ID positive on ``scores`` and OOD positive on ``-scores``.

    Equal to ``auc(recall, precision)`` on ``precision_recall_curve`` for either orientation:
    one point per distinct score (ties enter together), recall decreasing, closed by the point
    (recall 0, precision 1).  Both curves come from one sort: the groups of equal scores are the
    same read from either end, and all counts are integers, so the arrays are those
    ``precision_recall_curve`` builds.
    """
    order = np.argsort(scores)[::-1]  # only the groups' counts matter: no stable sort needed
    s = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each group, score descending
    seen = ends + 1
    cum_in = np.cumsum(is_in[order])[ends]
    per_group = np.diff(seen, prepend=0)
    out_group = per_group - np.diff(cum_in, prepend=0)

    def area(tps: np.ndarray, accepted: np.ndarray) -> float:
        # thresholds strict -> lenient; precision_recall_curve lists them lenient -> strict
        tps, accepted = tps.astype(np.float64), accepted.astype(np.float64)
        precision = np.r_[(tps / accepted)[::-1], 1.0]
        recall = np.r_[(tps / tps[-1])[::-1], 0.0]
        return float(-np.trapezoid(precision, recall))  # = auc(recall, precision): recall decreases

    # OOD positive on -score: the groups from the lowest score up
    return area(cum_in, seen), area(np.cumsum(out_group[::-1]), np.cumsum(per_group[::-1]))


def ood_metrics(scores_in, scores_out) -> dict[str, float]:
    """Threshold-free and fixed-recall OOD detection metrics.

    Scores: higher = more in-distribution.  Returns floats for

    - ``auroc``: ROC AUC with ID as positive on the score (tied ID/OOD pairs
      count one half).
    - ``aupr_in``: average precision with ID positive on the score.
    - ``aupr_out``: average precision with OOD positive on ``-score``.
    - ``aupr_in_trapz`` / ``aupr_out_trapz``: the trapezoid under the same PR
      curves, ``auc(recall, precision)`` (OpenOOD v1.5's and pytorch-ood's
      AUPR-In / AUPR-Out).
    - ``fpr95``: OOD positive on ``-score``; fraction of ID samples flagged as
      OOD at the first threshold where OOD recall >= 0.95 (OE / OpenOOD).
    - ``fpr95_in``: ID positive on the score; fraction of OOD samples accepted
      (score >= threshold) at the first threshold where ID recall >= 0.95
      (ODIN / DeVries).
    - ``detection_error``: min over ROC points of 0.5*(1 - TPR_in) + 0.5*FPR
      (ID positive).

    Ties: thresholds are only placed at distinct score values (as
    ``sklearn.metrics.roc_curve`` does), so an ID and an OOD sample with the
    same score are always accepted or rejected together, never split.

    Raises ValueError if either array is empty, not 1-D, or holds NaN/inf.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    scores = np.concatenate([s_in, s_out])
    is_in = np.concatenate(
        [np.ones(s_in.size, dtype=np.int64), np.zeros(s_out.size, dtype=np.int64)]
    )
    is_out = 1 - is_in

    fpr, tpr, _ = roc_curve(is_in, scores, drop_intermediate=False)
    trapz_in, trapz_out = _trapz_auprs(scores, is_in)
    return {
        "auroc": float(roc_auc_score(is_in, scores)),
        "aupr_in": float(average_precision_score(is_in, scores)),
        "aupr_out": float(average_precision_score(is_out, -scores)),
        "aupr_in_trapz": trapz_in,
        "aupr_out_trapz": trapz_out,
        "fpr95": _fpr_at_recall(is_out, -scores, _RECALL_LEVEL),
        "fpr95_in": _fpr_at_recall(is_in, scores, _RECALL_LEVEL),
        "detection_error": float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr)),
    }


def threshold_report(scores_in, scores_out, delta: float, correct_in=None) -> dict[str, float]:
    """Operating point of a "don't know" rule: reject (abstain) when score < delta.

    - ``abstain_rate_in``: fraction of ID samples with score < delta.
    - ``reject_rate_out``: fraction of OOD samples with score < delta.
    - ``accuracy_accepted_in`` (only if ``correct_in``, a per-ID-sample bool
      array, is given): mean of correct_in over ID samples with score >= delta;
      NaN if no ID sample is accepted.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out")
    delta = float(delta)
    if np.isnan(delta):
        raise ValueError("delta must not be NaN")
    rejected_in = s_in < delta
    report = {
        "abstain_rate_in": float(np.mean(rejected_in)),
        "reject_rate_out": float(np.mean(s_out < delta)),
    }
    if correct_in is not None:
        c = np.asarray(correct_in)
        if c.shape != s_in.shape:
            raise ValueError(
                f"correct_in must have the same shape as scores_in {s_in.shape}, got {c.shape}"
            )
        if c.dtype != np.bool_:
            cf = c.astype(np.float64)
            if not np.all((cf == 0.0) | (cf == 1.0)):
                raise ValueError("correct_in must be boolean (or 0/1) per ID sample")
            c = cf == 1.0
        accepted = ~rejected_in
        report["accuracy_accepted_in"] = (
            float(np.mean(c[accepted])) if accepted.any() else float("nan")
        )
    return report


def mean_over_sets(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over sets: out[k] = mean_s per_set[s][k].

    All sets must report the same metric keys.  NaN values propagate.
    """
    if not per_set:
        raise ValueError("per_set is empty; need at least one set to average")
    names = list(per_set)
    keys = list(per_set[names[0]])
    for name in names[1:]:
        if set(per_set[name]) != set(keys):
            missing = sorted(set(keys) - set(per_set[name]))
            extra = sorted(set(per_set[name]) - set(keys))
            raise ValueError(
                f"set {name!r} has different metric keys than {names[0]!r}: "
                f"missing {missing}, extra {extra}"
            )
    return {k: float(np.mean([float(per_set[s][k]) for s in names])) for k in keys}
