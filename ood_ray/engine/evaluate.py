"""Evaluation: score a split on this rank, gather all ranks, compute ID and OOD metrics.

The gathered arrays are sorted by sample key, so the metrics do not depend on how the split was
divided between ranks: a 2-worker evaluation equals a single-process one on the same checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .. import metric_names as names
from .. import metrics as M
from .. import selective
from ..checkpoint import unwrap
from ..data.manifest import Benchmark, Manifest
from ..data.streams import eval_batches
from ..methods import Method


def normalize(x: torch.Tensor, device: torch.device | str = "cpu", model=None) -> torch.Tensor:
    """uint8 N×C×H×W batch -> ``model``'s input on ``device`` (its ``preprocess``, eval steps);
    without a model (or one without preprocessing): float in [-1, 1], ``x / 127.5 - 1``."""
    net = unwrap(model) if model is not None else None
    if net is not None and getattr(net, "preprocess", None) is not None:
        return net.preprocess.eval_batch(x, device)
    return x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def run_batches(manifest: Manifest, rank: int, world: int, batch_size: int, fn, keep=None) -> dict[str, np.ndarray]:
    """This rank's share of ``manifest`` through ``fn`` (uint8 images -> dict of tensors), with
    labels and keys; ``keep(key)`` selects samples before ``fn`` runs (None: all)."""
    parts: dict[str, list] = {"labels": [], "keys": []}
    for x, y, keys in eval_batches(manifest, rank, world, batch_size):
        if keep is not None:
            chosen = [i for i, k in enumerate(keys) if keep(k)]
            if not chosen:
                continue
            x, y, keys = x[chosen], y[chosen], [keys[i] for i in chosen]
        for k, v in fn(x).items():
            parts.setdefault(k, []).append(v.detach().float().cpu().numpy())
        parts["labels"].append(y.numpy())
        parts["keys"].extend(keys)
    res = {k: np.concatenate(v) if k != "keys" and v else np.asarray(v) for k, v in parts.items()}
    res["keys"] = np.asarray(parts["keys"], dtype=object)
    return res


def collect(model, method: Method, manifest: Manifest, rank: int, world: int, device, batch_size: int) -> dict[str, np.ndarray]:
    """This rank's share of ``manifest``: method outputs (logits and scores), labels and keys."""
    model = unwrap(model).eval()
    return run_batches(manifest, rank, world, batch_size, lambda x: method.eval_batch(model, normalize(x, device, model)))


def gather(local: dict[str, np.ndarray], world: int) -> dict[str, np.ndarray]:
    """All ranks' arrays concatenated and sorted by key (identical on every rank)."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        parts: list = [None] * world
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    parts = [p for p in parts if len(p["keys"])]
    if not parts:
        return local
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["keys"].astype(str), kind="stable")
    return {k: v[order] for k, v in merged.items()}


def id_metrics(out: dict[str, np.ndarray], n_bins: int = 15) -> dict[str, float]:
    logits = out["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return M.classification_metrics(probs, out["labels"], n_bins=n_bins)


def split_metrics(
    prefix: str,
    id_out: dict[str, np.ndarray],
    ood_outs: dict[str, dict[str, np.ndarray]],
    groups: dict[str, str | None],
    score_names: list[str],
    default_score: str,
) -> dict[str, float]:
    """Flat metrics for one split: ``{prefix}_acc``, per OOD set and score, and means.

    Names are built by ``ood_ray.metric_names``: ``{prefix}_ood_{set}_{metric}`` for the method's
    default score, ``{prefix}_ood_{set}_{score}_{metric}`` for the other scores, ``{prefix}_{metric}``
    for the mean over all OOD sets and ``{prefix}_{near|far}_{metric}`` for the group means; the
    risk-coverage metrics of each score on the ID split as ``{prefix}_[{score}_]aurc`` etc.
    """
    res = {names.id_key(prefix, k): v for k, v in id_metrics(id_out).items()}
    correct = id_out["logits"].argmax(1) == id_out["labels"]
    for score in score_names:
        tag = None if score == default_score else score
        res.update({names.selective_key(prefix, k, tag): v for k, v in selective.selective_metrics(id_out[score], correct).items()})
        per_set = {name: M.ood_metrics(id_out[score], out[score]) for name, out in ood_outs.items()}
        for name, ms in per_set.items():
            res.update({names.set_key(prefix, name, k, tag): v for k, v in ms.items()})
        if not per_set:
            continue
        res.update({names.mean_key(prefix, k, names.ALL, tag): v for k, v in M.mean_over_sets(per_set).items()})
        for group in names.GROUPS:
            members = {n: ms for n, ms in per_set.items() if groups.get(n) == group}
            if members:
                res.update({names.mean_key(prefix, k, group, tag): v for k, v in M.mean_over_sets(members).items()})
    return res


def scoring_mode(method: Method):
    """``no_grad`` unless the method's scores need input gradients (input preprocessing)."""
    return torch.enable_grad() if method.eval_needs_grad else torch.no_grad()


def score_split(model, method: Method, bench: Benchmark, split: str, rank: int, world: int, device, batch_size: int):
    """Gathered outputs of ``split`` ('val' or 'test'): the ID split's and each OOD set's."""
    id_manifest = bench.val if split == "val" else bench.test
    ood = bench.ood_val if split == "val" else bench.ood_test
    with scoring_mode(method):
        id_out = gather(collect(model, method, id_manifest, rank, world, device, batch_size), world)
        ood_outs = {name: gather(collect(model, method, m, rank, world, device, batch_size), world) for name, m in ood.items()}
    return id_out, ood_outs


def metrics_of(split: str, method: Method, bench: Benchmark, id_out, ood_outs) -> dict[str, float]:
    """The metrics of outputs from ``score_split``."""
    ood = bench.ood_val if split == "val" else bench.ood_test
    res = split_metrics(split, id_out, ood_outs, {n: m.group for n, m in ood.items()}, method.score_names(), method.default_score)
    res.update(threshold_metrics(split, id_out, ood_outs, method.threshold_score, method.delta))
    return res


def evaluate_split(model, method: Method, bench: Benchmark, split: str, rank: int, world: int, device, batch_size: int) -> dict[str, float]:
    """Metrics of ``split`` ('val' or 'test') over all ranks; every rank gets the same dict."""
    return metrics_of(split, method, bench, *score_split(model, method, bench, split, rank, world, device, batch_size))


def threshold_metrics(prefix: str, id_out, ood_outs, score: str, delta: float | None) -> dict[str, float]:
    """The "don't know" operating point: reject when ``score < delta``.

    ``{prefix}_abstain_rate`` (ID rejected), ``{prefix}_accuracy_accepted`` (accuracy on accepted
    ID) and ``{prefix}_ood_{set}_reject_rate`` per OOD set, plus the mean ``{prefix}_reject_rate``.
    """
    if delta is None or not ood_outs:
        return {}
    correct = id_out["logits"].argmax(1) == id_out["labels"]
    res, rejects = {}, []
    for name, out in ood_outs.items():
        r = M.threshold_report(id_out[score], out[score], float(delta), correct_in=correct)
        res[names.reject_key(prefix, name)] = r["reject_rate_out"]
        rejects.append(r["reject_rate_out"])
    res[f"{prefix}_abstain_rate"] = r["abstain_rate_in"]
    res[f"{prefix}_accuracy_accepted"] = r["accuracy_accepted_in"]
    res[names.reject_key(prefix)] = float(np.mean(rejects))
    return res
