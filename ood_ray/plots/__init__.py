"""Figures that go with a tuning sweep as artifacts.

After a sweep, a few pictures tell more than the logged numbers:

- :func:`roc_curves` and :func:`score_histograms` show how the best trial's OOD score separates
  the ID test set from each OOD set (one ROC curve / one histogram panel per OOD set);
- :func:`risk_coverage` shows, per score, the error rate of the ID predictions a "don't know"
  threshold keeps against the share it keeps, beside the oracle's curve;
- :func:`reliability_diagram` shows the classifier's calibration before and after temperature
  scaling, with the same binning as :func:`ood_ray.metrics.ece`;
- :func:`optuna_plots` shows the Optuna study itself: optimization history and hyperparameter
  importances (plus the Pareto front of a multi-objective study);
- :func:`comparison_bars` shows a method comparison's means and confidence intervals.

Scores follow the convention of :mod:`ood_ray.metrics`: HIGHER = MORE in-distribution. Every
function writes PNG files only (never shows a window: the non-interactive Agg backend is selected
in ``_common``), closes every figure it opens, and returns where it wrote. Bad input raises
``ValueError`` naming the argument (or the OOD set / curve) and the offending shape or value. No
Ray, no MLflow. One module per kind of figure: ``ood`` (scores), ``calibration``, ``study``.
"""

from __future__ import annotations

from ._common import plt
from .calibration import _calibration_bins, reliability_diagram
from .ood import risk_coverage, roc_curves, score_histograms
from .study import comparison_bars, optuna_plots

__all__ = ["roc_curves", "score_histograms", "risk_coverage", "reliability_diagram", "optuna_plots", "comparison_bars", "plt", "_calibration_bins"]
