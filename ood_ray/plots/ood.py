"""Figures of OOD scores: ROC curves, score histograms, risk-coverage curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from ..selective import oracle_aurc, oracle_risk, risk_coverage_curve, selective_metrics
from ._common import (
    _named_arrays,
    _ood_positive,
    _ood_sets,
    _out_path,
    _positive_int,
    _save,
    _scores,
    plt,
)

# ---------------------------------------------------------------------------
# OOD scores
# ---------------------------------------------------------------------------


def roc_curves(id_scores, ood_scores: dict[str, np.ndarray], path, title: str = "") -> Path:
    """One ROC curve per OOD set, OOD as the positive class; writes a PNG to ``path``.

    The anomaly score is ``-score`` (scores are higher = more ID), so the x axis is the fraction of
    ID samples flagged as OOD and the y axis the fraction of OOD samples detected. Each legend entry
    reads ``"name (AUROC 0.xxx)"``; that AUROC equals :func:`ood_ray.metrics.ood_metrics`'s.
    """
    id_arr = _scores(id_scores, "id_scores")
    sets = _ood_sets(ood_scores)
    out = _out_path(path)
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    try:
        for name, ood_arr in sets.items():
            y, anomaly = _ood_positive(id_arr, ood_arr)
            fpr, tpr, _ = roc_curve(y, anomaly)
            auroc = roc_auc_score(y, anomaly)
            ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {auroc:.3f})")
        ax.plot([0.0, 1.0], [0.0, 1.0], ls="--", lw=1.0, color="0.55", label="chance")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel("false positive rate (ID flagged OOD)")
        ax.set_ylabel("true positive rate (OOD detected)")
        ax.set_title(title or "ROC per OOD set (OOD = positive)")
        ax.legend(loc="lower right", fontsize="small")
        return _save(fig, out)
    finally:
        plt.close(fig)


def score_histograms(
    id_scores, ood_scores: dict[str, np.ndarray], path, title: str = "", bins: int = 40
) -> Path:
    """A grid of panels, one per OOD set, each overlaying the ID and the OOD score densities.

    Both histograms of a panel share ``bins`` equal-width bins spanning ID ∪ that OOD set. Writes a
    PNG to ``path``.
    """
    id_arr = _scores(id_scores, "id_scores")
    sets = _ood_sets(ood_scores)
    bins = _positive_int(bins, "bins")
    out = _out_path(path)
    ncols = min(3, len(sets))
    nrows = math.ceil(len(sets) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, layout="constrained"
    )
    try:
        flat = axes.ravel()
        for ax, (name, ood_arr) in zip(flat, sets.items(), strict=False):
            edges = np.histogram_bin_edges(np.concatenate([id_arr, ood_arr]), bins=bins)
            ax.hist(
                id_arr,
                bins=edges,
                density=True,
                alpha=0.55,
                color="C0",
                label=f"ID (n={id_arr.size})",
            )
            ax.hist(
                ood_arr,
                bins=edges,
                density=True,
                alpha=0.55,
                color="C3",
                label=f"{name} (n={ood_arr.size})",
            )
            y, anomaly = _ood_positive(id_arr, ood_arr)
            ax.set_title(f"ID vs {name} (AUROC {roc_auc_score(y, anomaly):.3f})", fontsize="medium")
            ax.set_xlabel("score (higher = more ID)")
            ax.set_ylabel("density")
            ax.legend(fontsize="small")
        for ax in flat[len(sets) :]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        return _save(fig, out)
    finally:
        plt.close(fig)


def _correct(values, n: int) -> np.ndarray:
    c = np.asarray(values)
    if c.ndim != 1 or c.size != n:
        raise ValueError(f"correct must be a 1-D array with one entry per ID sample ({n}), got shape {c.shape}")
    if c.dtype != np.bool_:
        try:
            cf = c.astype(np.float64)
        except (TypeError, ValueError):
            cf = np.full(c.shape, np.nan)
        if not np.all((cf == 0.0) | (cf == 1.0)):
            raise ValueError("correct must be boolean (or 0/1): whether each ID prediction is right")
        c = cf == 1.0
    return c


def risk_coverage(scores: dict[str, np.ndarray], correct, path, title: str = "") -> Path:
    """Risk-coverage curves of the same ID samples, one per score, and the oracle's (dashed).

    Accepting the samples with the highest scores first, the x axis is the share accepted and the y
    axis the error rate of the classifier on them (:func:`ood_ray.selective.risk_coverage_curve`;
    samples with the same score are accepted together). Curves are drawn as the steps whose area
    is the AURC; each legend entry reads ``"name (AURC 0.xxxx)"``, the value of
    :func:`ood_ray.selective.selective_metrics`. The oracle accepts every correct prediction first
    (its AURC is r + (1 − r) ln(1 − r) for the error rate r). Writes a PNG to ``path``.
    """
    curves = _named_arrays(scores, "scores", "score")
    arrays = {name: _scores(v, f"scores[{name!r}]") for name, v in curves.items()}
    sizes = {a.size for a in arrays.values()}
    if len(sizes) > 1:
        raise ValueError(f"scores must all have one entry per ID sample, got sizes {sorted(sizes)}")
    c = _correct(correct, sizes.pop())
    out = _out_path(path)
    error_rate = float(np.mean(~c))
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    try:
        for name, s in arrays.items():
            cov, risk, _ = risk_coverage_curve(s, c)
            aurc = selective_metrics(s, c)["aurc"]
            ax.plot(np.r_[0.0, cov], np.r_[risk[0], risk], drawstyle="steps-pre", lw=1.6, label=f"{name} (AURC {aurc:.4f})")
        grid = np.unique(np.r_[np.linspace(0.0, 1.0, 401), 1.0 - error_rate])
        ax.plot(grid, oracle_risk(grid, error_rate), ls="--", lw=1.2, color="0.35", label=f"oracle (AURC {oracle_aurc(error_rate):.4f})")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
        ax.set_xlabel("coverage (share of ID accepted, highest scores first)")
        ax.set_ylabel("risk (error rate of the accepted ID)")
        ax.set_title(title or f"Risk-coverage on ID (N={c.size}, error rate {error_rate:.3f})")
        ax.legend(loc="best", fontsize="small")
        return _save(fig, out)
    finally:
        plt.close(fig)
