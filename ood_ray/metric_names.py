"""The one owner of the flat metric names and of the OOD tables rendered from them.

Names (``split`` is ``val`` or ``test``; ``score`` is omitted for the method's default score)::

    {split}_{metric}                          ID metric (acc, ece, nll, ...) or the mean over all OOD sets
    {split}_ood_{set}_[{score}_]{metric}      one OOD set
    {split}_{near|far}_[{score}_]{metric}     mean over the OOD sets of a group
    {split}_[{score}_]{metric}                mean over all OOD sets
    {split}_ood_{set}_reject_rate             share of an OOD set rejected at δ
    {split}_[{score}_]{selective metric}      risk-coverage on the ID split (aurc, eaurc, acc_at_cov90, ...)

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
#: Every metric ``metrics.ood_metrics`` returns: OOD_METRICS, the trapezoid AUPRs (OpenOOD's
#: AUPR-In / AUPR-Out; ``aupr_in``/``aupr_out`` are average precision) and the detection error.
ALL_OOD_METRICS = (*OOD_METRICS, "aupr_in_trapz", "aupr_out_trapz", "detection_error")
#: The risk-coverage metrics of one score on the ID split (``selective.selective_metrics``).
#: The columns of ``ood_table``/``text_table``, and their labels: the trapezoid AUPRs are
#: OpenOOD's AUPR-In/-Out; ``aupr_in``/``aupr_out`` (average precision) are shown as AP-In/-Out.
TABLE_COLUMNS = ("auroc", "fpr95", "fpr95_in", "aupr_in_trapz", "aupr_out_trapz", "aupr_in", "aupr_out")
LABELS = {"auroc": "AUROC", "fpr95": "FPR95", "fpr95_in": "FPR95-IN", "aupr_in_trapz": "AUPR-IN", "aupr_out_trapz": "AUPR-OUT", "aupr_in": "AP-IN", "aupr_out": "AP-OUT", "detection_error": "DET-ERR"}
SELECTIVE_METRICS = ("aurc", "eaurc", "acc_at_cov80", "acc_at_cov90", "acc_at_cov95")
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


def selective_key(split: str, metric: str, score: str | None = None) -> str:
    """A risk-coverage metric of ``score`` on the ID split: ``test_aurc``, ``val_energy_eaurc``...
    (ID samples only, so no set or group)."""
    return f"{split}_{_tag(score)}{metric}"


def reject_key(split: str, ood_set: str | None = None) -> str:
    """Share of OOD rejected at δ: of one set, or (None) the mean over the sets."""
    return f"{split}_reject_rate" if ood_set is None else f"{split}_ood_{ood_set}_reject_rate"


def rows(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None) -> list[tuple[str, str]]:
    """``(label, key prefix)`` of every row present in ``metrics``: each set in the order given,
    then near, far and all. A row is present when its AUROC key is."""
    out = [(s, set_key(split, s, "", score)) for s in sets] + [(g, mean_key(split, "", g, score)) for g in (*GROUPS, ALL)]
    return [(label, pre) for label, pre in out if pre + "auroc" in metrics]


def label(metric: str) -> str:
    """A metric's column label (``aupr_in`` is average precision: ``AP-IN``)."""
    return LABELS.get(metric, metric.upper().replace("_", "-"))


def ood_table(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None, columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Markdown table: one row per OOD set, then near / far / all, one column per metric."""
    head = [f"{split} OOD set", *(label(c) for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, pre in rows(metrics, split, sets, score):
        lines.append(f"| {row} | " + " | ".join(f"{metrics.get(pre + c, math.nan):.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def text_table(metrics: Mapping[str, float], split: str, sets: Iterable[str], score: str | None = None, columns: tuple[str, ...] = TABLE_COLUMNS) -> list[str]:
    """The same rows as ``ood_table``, as fixed-width lines for a terminal."""
    width = max([14, *(len(s) + 2 for s in sets)])
    lines = [f"{split + ' OOD set':<{width}}" + "".join(f"{label(c):>10}" for c in columns)]
    for row, pre in rows(metrics, split, sets, score):
        lines.append(f"{row:<{width}}" + "".join(f"{metrics.get(pre + c, math.nan):>10.4f}" for c in columns))
    return lines
