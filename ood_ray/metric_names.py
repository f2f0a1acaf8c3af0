"""The one owner of the flat metric names and of the OOD tables rendered from them.

Names (``split`` is ``val`` or ``test``; ``score`` is omitted for the method's default score)::

    {split}_{metric}                          ID metric (acc, ece, nll, ...) or the mean over all OOD sets
    {split}_ood_{set}_[{score}_]{metric}      one OOD set
    {split}_{near|far}_[{score}_]{metric}     mean over the OOD sets of a group
    {split}_[{score}_]{metric}                mean over all OOD sets
    {split}_ood_{set}_reject_rate             share of an OOD set rejected at δ

Set and score names may contain underscores (``ood_faces``, ``confidence_pre``), so a key cannot
be split back into its parts without knowing the sets: everything here takes the set names (from
the benchmark) and builds keys forwards; nothing parses them.

Plain Python: no torch, Ray, MLflow or I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: The OOD metrics of one score on one set (OOD positive, except the ``_in`` variants; see metrics.py).
OOD_METRICS = ("auroc", "fpr95", "fpr95_in", "aupr_in", "aupr_out")
GROUPS = ("near", "far")
ALL = "all"


def _tag(score: str | None) -> str:
    return f"{score}_" if score else ""


def id_key(split: str, metric: str) -> str:
    """An in-distribution metric of ``split``: ``test_acc``, ``val_ece``..."""
    return f"{split}_{metric}"


def set_key(split: str, ood_set: str, metric: str, score: str | None = None) -> str:
    """``metric`` of ``score`` (None: the default score) on one OOD set."""
    return f"{split}_ood_{ood_set}_{_tag(score)}{metric}"


def mean_key(split: str, metric: str, group: str = ALL, score: str | None = None) -> str:
    """``metric`` averaged over the OOD sets of ``group`` (``near``, ``far`` or ``all``)."""
    if group == ALL:
        return f"{split}_{_tag(score)}{metric}"
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join((*GROUPS, ALL))}, got {group!r}")
    return f"{split}_{group}_{_tag(score)}{metric}"


def reject_key(split: str, ood_set: str | None = None) -> str:
    """Share of OOD rejected at δ: of one set, or (None) the mean over the sets."""
    return f"{split}_reject_rate" if ood_set is None else f"{split}_ood_{ood_set}_reject_rate"


def rows(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None) -> list[tuple[str, str]]:
    """``(label, key prefix)`` of every row present in ``metrics``: each set in the order given,
    then near, far and all. A row is present when its AUROC key is."""
    out = [(s, set_key(split, s, "", score)) for s in sets] + [(g, mean_key(split, "", g, score)) for g in (*GROUPS, ALL)]
    return [(label, pre) for label, pre in out if pre + "auroc" in metrics]


def ood_table(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None, columns: tuple[str, ...] = OOD_METRICS) -> str:
    """Markdown table: one row per OOD set, then near / far / all, one column per metric."""
    head = [f"{split} OOD set", *(c.upper().replace("_", "-") for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, pre in rows(metrics, split, sets, score):
        lines.append(f"| {label} | " + " | ".join(f"{metrics.get(pre + c, math.nan):.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def text_table(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None, columns: tuple[str, ...] = OOD_METRICS) -> list[str]:
    """The same rows as ``ood_table``, as fixed-width lines for a terminal."""
    width = max([14, *(len(s) + 2 for s in sets)])
    lines = [f"{split + ' OOD set':<{width}}" + "".join(f"{c.upper():>10}" for c in columns)]
    for label, pre in rows(metrics, split, sets, score):
        lines.append(f"{label:<{width}}" + "".join(f"{metrics.get(pre + c, math.nan):>10.4f}" for c in columns))
    return lines
