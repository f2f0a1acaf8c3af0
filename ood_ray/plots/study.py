"""Figures of a study: Optuna's plots of a sweep and the bar chart of a method comparison."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

from ._common import _out_path, _save, _scores, plt


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
