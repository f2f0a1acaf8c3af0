"""The validation objective a sweep maximises, computed from a trial's ``val_*`` metrics only.

``auroc`` (default): the mean val AUROC over the val OOD sets of the method's own score, guarded by
accuracy. A trial whose val accuracy is below ``min_val_acc`` scores ``val_acc - 1`` (always below
any trial that meets the guard, and among failing trials the more accurate one ranks higher), so a
method cannot win by giving up classification. ``fpr95``: ``1 - val_fpr95`` with the same guard.
``acc+auroc``: multi-objective (val accuracy and val AUROC, both maximised); the sweep returns the
Pareto front instead of one best trial.

Test metrics are never read here: ``objective_value`` refuses a dict without val metrics, and a
sweep's trials do not evaluate the test split at all.
"""

from __future__ import annotations

import math

OBJECTIVES = ("auroc", "fpr95", "acc+auroc")


def objective_metrics(kind: str) -> list[str]:
    """The metric names Tune and Optuna optimise (all maximised)."""
    if kind == "acc+auroc":
        return ["val_acc", "val_auroc"]
    return ["objective"]


def objective_value(metrics: dict, kind: str = "auroc", min_val_acc: float = 0.0) -> float:
    """The single-objective value of ``metrics`` (higher is better); NaN when undefined."""
    if kind not in OBJECTIVES:
        raise ValueError(f"objective={kind!r}: choose one of {', '.join(OBJECTIVES)}")
    if "val_acc" not in metrics:
        raise ValueError("the objective needs validation metrics (val_acc); none were given")
    acc = float(metrics["val_acc"])
    if kind == "fpr95":
        value = 1.0 - float(metrics.get("val_fpr95", math.nan))
    else:
        value = float(metrics.get("val_auroc", math.nan))
    if acc < min_val_acc:
        return acc - 1.0
    return value
