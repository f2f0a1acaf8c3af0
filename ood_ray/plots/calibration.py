"""Calibration figures: the reliability diagram, binned as :func:`ood_ray.metrics.ece`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import _named_arrays, _out_path, _positive_int, _save, plt

_ROW_SUM_TOL = 1e-3



def _labels(labels) -> np.ndarray:
    try:
        t = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"labels must be integer class indices ({e})") from None
    if t.ndim != 1 or t.size == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D array of class indices, got shape {t.shape}"
        )
    if not np.isfinite(t).all() or not np.array_equal(t, np.round(t)):
        raise ValueError("labels must be finite integer class indices")
    return t.astype(np.int64)


def _probs(values, name: str, labels: np.ndarray) -> np.ndarray:
    arg = f"probs[{name!r}]"
    try:
        p = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg} must be a numeric (N, K) probability matrix ({e})") from None
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"{arg} must be 2-D (N, K) with K >= 1, got shape {p.shape}")
    if p.shape[0] != labels.size:
        raise ValueError(
            f"length mismatch: {arg} has {p.shape[0]} rows (shape {p.shape}) but labels has {labels.size} entries"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{arg} holds {int((~np.isfinite(p)).sum())} non-finite value(s)")
    if p.min() < -_ROW_SUM_TOL or p.max() > 1.0 + _ROW_SUM_TOL:
        raise ValueError(
            f"{arg} must hold probabilities in [0, 1], got values in [{p.min():.6g}, {p.max():.6g}]"
        )
    dev = np.abs(p.sum(axis=1) - 1.0)
    if dev.max() > _ROW_SUM_TOL:
        i = int(np.argmax(dev))
        raise ValueError(
            f"{arg} rows must sum to 1 (tolerance {_ROW_SUM_TOL}); row {i} sums to {p[i].sum():.6g}"
        )
    k = p.shape[1]
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(
            f"labels must lie in [0, {k}) for the {k} classes of {arg}; got min {labels.min()}, max {labels.max()}"
        )
    return p


def _calibration_bins(
    p: np.ndarray, labels: np.ndarray, n_bins: int
) -> dict[str, np.ndarray | float]:
    """Per-bin counts, accuracy and confidence, and the ECE (same bins as ``metrics.ece``).

    Bin b covers (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 goes into the first bin.
    """
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_correct = np.bincount(idx, weights=correct, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = sum_correct / count
        mean_conf = sum_conf / count
    return {
        "edges": edges,
        "count": count,
        "acc": acc,
        "conf": mean_conf,
        "ece": float(np.sum(np.abs(sum_correct - sum_conf)) / conf.size),
    }


def reliability_diagram(
    probs: dict[str, np.ndarray], labels, path, n_bins: int = 15, title: str = ""
) -> Path:
    """Reliability diagram of one or more (N, K) probability matrices of the same samples.

    ``probs`` maps a curve name (e.g. ``"before calibration (T=1)"``) to its probabilities. The
    upper panel plots, per equal-width bin of the max probability, the bin's accuracy against its
    mean confidence, with the identity line; each legend entry carries that curve's ECE
    (ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|, the binning of :func:`ood_ray.metrics.ece`). The
    lower panel shows the fraction of samples in each bin. Writes a PNG to ``path``.
    """
    n_bins = _positive_int(n_bins, "n_bins")
    t = _labels(labels)
    curves = _named_arrays(probs, "probs", "curve")
    stats = {name: _calibration_bins(_probs(p, name, t), t, n_bins) for name, p in curves.items()}
    out = _out_path(path)
    fig, (ax, ax_n) = plt.subplots(
        2,
        1,
        figsize=(5.5, 6.5),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
        layout="constrained",
    )
    try:
        ax.plot([0.0, 1.0], [0.0, 1.0], ls="--", lw=1.0, color="0.55", label="perfect calibration")
        width = 1.0 / n_bins
        bar_w = 0.9 * width / len(stats)
        for j, (name, s) in enumerate(stats.items()):
            filled = s["count"] > 0
            color = f"C{j}"
            ax.plot(
                s["conf"][filled],
                s["acc"][filled],
                marker="o",
                ms=4,
                lw=1.5,
                color=color,
                label=f"{name} (ECE {s['ece']:.4f})",
            )
            left = s["edges"][:-1] + 0.05 * width + j * bar_w
            ax_n.bar(left, s["count"] / t.size, width=bar_w, align="edge", color=color, alpha=0.75)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"Reliability diagram ({n_bins} bins, N={t.size})")
        ax.legend(loc="upper left", fontsize="small")
        ax_n.set_ylim(0.0, 1.0)
        ax_n.grid(alpha=0.3)
        ax_n.set_xlabel("confidence (max probability)")
        ax_n.set_ylabel("fraction\nof samples")
        return _save(fig, out)
    finally:
        plt.close(fig)
