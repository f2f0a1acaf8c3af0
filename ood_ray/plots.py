"""Figures that go with a tuning sweep as artifacts.

After a sweep, a few pictures tell more than the logged numbers:

- :func:`roc_curves` and :func:`score_histograms` show how the best trial's OOD score separates
  the ID test set from each OOD set (one ROC curve / one histogram panel per OOD set);
- :func:`reliability_diagram` shows the classifier's calibration before and after temperature
  scaling, with the same binning as :func:`ood_ray.metrics.ece`;
- :func:`optuna_plots` shows the Optuna study itself: optimization history and hyperparameter
  importances (plus the Pareto front of a multi-objective study).

Scores follow the convention of :mod:`ood_ray.metrics`: HIGHER = MORE in-distribution. Every
function writes PNG files only (never shows a window: the non-interactive Agg backend is selected
here), closes every figure it opens, and returns where it wrote. Bad input raises ``ValueError``
naming the argument (or the OOD set / curve) and the offending shape or value. No Ray, no MLflow.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["roc_curves", "score_histograms", "reliability_diagram", "optuna_plots", "comparison_bars"]

_DPI = 120
_ROW_SUM_TOL = 1e-3


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


# ---------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Optuna study
# ---------------------------------------------------------------------------


def _save_optuna(plot: Callable, path: Path, *args, **kwargs) -> Path:
    """Call an ``optuna.visualization.matplotlib`` function, save its figure and close it.

    Optuna's plotting functions call ``plt.style.use("ggplot")``, which would change the style of
    every later figure of the process; ``rc_context`` restores the settings afterwards. Every figure
    opened meanwhile is closed, even when the call fails.
    """
    from optuna.exceptions import ExperimentalWarning

    before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings(
                "ignore", message="No artists with labels found", category=UserWarning
            )
            warnings.filterwarnings(
                "ignore",
                message=".*computes the importances of params to achieve low",
                category=UserWarning,
            )
            ax = plot(*args, **kwargs)
            return _save(ax.figure, path)
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)


def _importance_problem(trials: list) -> str | None:
    """Why parameter importances cannot be computed from ``trials``, or None."""
    if len(trials) < 2:
        return f"param importances need at least 2 complete trials, the study has {len(trials)}"
    names = sorted({name for t in trials for name in t.params})
    if not names:
        return "param importances need a parameter, the complete trials have none"
    missing = object()
    varying = [n for n in names if len({repr(t.params.get(n, missing)) for t in trials}) > 1]
    if not varying:
        return f"param importances need a parameter that varies; all complete trials share {', '.join(names)}"
    return None


def optuna_plots(study, out_dir) -> dict[str, Path | str]:
    """Write the Optuna plots of ``study`` into ``out_dir``; returns ``{name: Path or reason}``.

    Keys and files:

    - ``"optimization_history"``: ``optimization_history.png``, objective value per trial (with the
      best-so-far line for a single-objective study);
    - ``"param_importances"``: ``param_importances.png``, Optuna's default importance evaluator
      (PED-ANOVA in Optuna 5);
    - ``"pareto_front"`` (multi-objective studies only): ``pareto_front.png``, all complete trials
      with the Pareto front highlighted, axes named after ``study.metric_names``.

    For a multi-objective study, history and importances are those of the FIRST objective
    (``t.values[0]``, named after the first metric name). PED-ANOVA takes low target values as
    good, so a maximized first objective is negated for the importances.

    Nothing here raises for a study that is too small: where a plot cannot be made (no complete
    trial with a finite value; for importances fewer than 2 such trials or no parameter that
    varies; a Pareto front of more than 3 objectives) the value is a short reason string and no
    file is written for that key.
    """
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    directions = study.directions
    multi = len(directions) > 1
    metric_names = study.metric_names
    first = metric_names[0] if metric_names else ("Objective 0" if multi else "Objective Value")

    def first_value(t) -> float:
        return t.values[0]

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    usable = [t for t in complete if t.values is not None and math.isfinite(first_value(t))]
    keys = ["optimization_history", "param_importances"] + (["pareto_front"] if multi else [])
    if not usable:
        reason = f"no complete trial with a finite objective value ({len(study.trials)} trial(s) in the study)"
        return dict.fromkeys(keys, reason)

    result: dict[str, Path | str] = {}
    target_kw: dict = (
        {"target": first_value, "target_name": first} if multi else {"target_name": first}
    )
    result["optimization_history"] = _save_optuna(
        ovm.plot_optimization_history, out / "optimization_history.png", study, **target_kw
    )

    problem = _importance_problem(usable)
    if problem is not None:
        result["param_importances"] = problem
    else:
        imp_kw: dict = {}
        if multi:
            sign = -1.0 if directions[0] == StudyDirection.MAXIMIZE else 1.0
            imp_kw = {"target": lambda t: sign * t.values[0], "target_name": first}
        try:
            result["param_importances"] = _save_optuna(
                ovm.plot_param_importances, out / "param_importances.png", study, **imp_kw
            )
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            result["param_importances"] = f"param importances failed: {type(e).__name__}: {e}"

    if multi:
        if len(directions) > 3:
            result["pareto_front"] = (
                f"a Pareto front plot needs 2 or 3 objectives, the study has {len(directions)}"
            )
        else:
            result["pareto_front"] = _save_optuna(
                ovm.plot_pareto_front, out / "pareto_front.png", study
            )
    return result


def comparison_bars(values: Mapping[str, Mapping[str, list[float]]], path, title: str = "") -> Path:
    """One panel per metric, one bar per method: the mean over seeds with its 95 % Student-t
    interval as an error bar (none for a single seed). ``values[method][metric]`` are per-seed values."""
    from scipy import stats

    methods = list(values)
    if not methods:
        raise ValueError("values is empty: no method to draw")
    metrics = list(values[methods[0]])
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 1, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        means, errs = [], []
        for m in methods:
            v = _scores(values[m][metric], f"values[{m!r}][{metric!r}]")
            means.append(v.mean())
            errs.append(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0)
        ax.bar(range(len(methods)), means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(0.0, 1.05)  # accuracy, AUROC and FPR95 are all fractions
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, _out_path(path))
    finally:
        plt.close(fig)
