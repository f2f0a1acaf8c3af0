"""Post-hoc detectors on a trained model: features, fitting on train, choosing on val.

A detector (``ood_ray.detectors``) is fitted on the penultimate features of the train split (the
first ``detector_fit_samples`` in shard order, augmentation off), its parameters are tried on the
val split (``Detector.grid``), and the best one by the mean val AUROC over the val OOD sets wins.
Nothing from a test split is read. Every rank computes the same (gathered) arrays, so every rank
makes the same choice.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch

from .. import metrics as M
from ..checkpoint import unwrap
from ..config import check_detectors
from ..data.manifest import Benchmark, Manifest
from ..data.streams import eval_batches
from ..detectors import DETECTORS, make_detector
from ..methods import Method
from ..methods.with_detector import WithDetector
from ..progress import say
from .evaluate import gather, normalize


def collect_features(model, method: Method, manifest: Manifest, rank: int, world: int, device, batch_size: int, limit: int | None = None) -> dict[str, np.ndarray]:
    """Gathered ``features``, ``logits``, ``labels`` and ``keys`` of ``manifest`` (the first
    ``limit`` samples in shard order when given)."""
    model = unwrap(model).eval()
    share = None if limit is None else -(-limit // world)
    parts: dict[str, list] = {"features": [], "logits": [], "labels": [], "keys": []}
    n = 0
    with torch.no_grad():
        for x, y, keys in eval_batches(manifest, rank, world, batch_size):
            f = model.features(normalize(x, device))
            parts["features"].append(f.float().cpu().numpy())
            parts["logits"].append(method.logits(model.head(f)).float().cpu().numpy())
            parts["labels"].append(y.numpy())
            parts["keys"].extend(keys)
            n += len(y)
            if share is not None and n >= share:
                break
    width = unwrap(model).num_features
    local = {k: np.concatenate(v) if v else np.zeros((0, width) if k == "features" else 0, np.float32) for k, v in parts.items() if k != "keys"}
    local["keys"] = np.asarray(parts["keys"], dtype=object)
    out = gather(local, world)
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out


def image_scores(model, det, manifest: Manifest, rank: int, world: int, device, batch_size: int) -> np.ndarray:
    """Gathered scores of a detector that scores images (``needs_model``, ODIN) on ``manifest``."""
    parts: dict[str, list] = {"score": [], "keys": []}
    for x, _, keys in eval_batches(manifest, rank, world, batch_size):
        parts["score"].append(det.score(normalize(x, device)).detach().float().cpu().numpy())
        parts["keys"].extend(keys)
    local = {"score": np.concatenate(parts["score"]) if parts["score"] else np.zeros(0, np.float32), "keys": np.asarray(parts["keys"], dtype=object)}
    return gather(local, world)["score"]


class Scorer:
    """Scores a fitted detector on the val (or test) split of a benchmark, features computed once."""

    def __init__(self, model, method: Method, bench: Benchmark, split: str, rank: int, world: int, device, batch_size: int):
        self.model, self.method, self.rank, self.world, self.device, self.bs = model, method, rank, world, device, batch_size
        self.id_manifest = bench.val if split == "val" else bench.test
        self.ood = bench.ood_val if split == "val" else bench.ood_test
        self.id = collect_features(model, method, self.id_manifest, rank, world, device, batch_size)
        self.ood_feats = {n: collect_features(model, method, m, rank, world, device, batch_size) for n, m in self.ood.items()}

    def scores(self, det) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(ID scores, {OOD set: scores})`` of ``det``."""
        if det.needs_model:
            run = lambda m: image_scores(self.model, det, m, self.rank, self.world, self.device, self.bs)  # noqa: E731
            return run(self.id_manifest), {n: run(m) for n, m in self.ood.items()}
        run = lambda out: det.score(torch.from_numpy(out["features"])).detach().double().cpu().numpy()  # noqa: E731
        return run(self.id), {n: run(out) for n, out in self.ood_feats.items()}

    def mean_auroc(self, det) -> float:
        s_id, s_ood = self.scores(det)
        if not s_ood:
            return math.nan
        return float(np.mean([M.ood_metrics(s_id, s)["auroc"] for s in s_ood.values()]))


def logits_fn(model, method: Method):
    """Images -> class logits of ``model`` (what ODIN perturbs)."""
    net = unwrap(model)
    return lambda x: method.logits(net(x))


def cpu_head(method: Method, model) -> torch.nn.Module:
    """A frozen CPU copy of the model's class head: what a feature detector keeps (the model may
    train on, or move to a GPU, afterwards)."""
    return copy.deepcopy(method.class_head(unwrap(model).head)).cpu().eval().requires_grad_(False)


def fit(name: str, params: dict, train: dict[str, np.ndarray], model, method: Method):
    """Detector ``name`` with ``params`` fitted on ``train`` features (from ``collect_features``)."""
    det = make_detector(name, **params)
    net = unwrap(model)
    return det.fit(
        torch.from_numpy(train["features"]),
        torch.from_numpy(train["labels"]).long(),
        cpu_head(method, net),
        model=logits_fn(model, method) if det.needs_model else None,
    )


def search(names: Iterable[str], train: dict[str, np.ndarray], val: Scorer, model, method: Method) -> list[dict]:
    """Every candidate (detector × its grid) fitted on ``train`` and scored on val; one entry per
    detector: its best ``params``, ``val_auroc`` and the fitted ``detector`` (first best wins)."""
    out = []
    sizes = {"feature_dim": int(train["features"].shape[1]), "num_classes": int(train["logits"].shape[1]), "num_train": len(train["labels"])}
    for name in names:
        best = {"name": name, "val_auroc": -math.inf, "params": {}, "detector": None, "candidates": 0}
        for params in DETECTORS[name].grid(**sizes):
            det = fit(name, params, train, model, method)
            auroc = val.mean_auroc(det)
            best["candidates"] += 1
            if auroc > best["val_auroc"] or best["detector"] is None:
                best.update(val_auroc=auroc, params=dict(det.params), detector=det)
        out.append(best)
    return out


def choose_detector(model, method: Method, cfg, bench: Benchmark, rank: int, world: int, device) -> tuple[WithDetector, dict]:
    """The detector of ``cfg.detectors`` with the best val AUROC, fitted on train, δ set on val ID
    (``cfg.delta_tpr``); returns it wrapped around ``method``, and the values to log."""
    bs = cfg.eval_batch_size
    train = collect_features(model, method, bench.train, rank, world, device, bs, limit=cfg.detector_fit_samples)
    val = Scorer(model, method, bench, "val", rank, world, device, bs)
    results = search(check_detectors(cfg.method, method.params, cfg.detectors), train, val, model, method)
    best = max(results, key=lambda r: (r["val_auroc"], -results.index(r)))
    det = best["detector"]
    delta = None
    if cfg.delta_tpr is not None:
        s_id, _ = val.scores(det)
        delta = float(np.quantile(s_id.astype(np.float64), 1.0 - cfg.delta_tpr))
    if rank == 0:
        ranked = sorted(results, key=lambda r: -r["val_auroc"])
        say("detectors on val (mean AUROC): " + ", ".join(f"{r['name']} {r['val_auroc']:.4f}" for r in ranked) + f"; chosen: {det.name} {best['params']}")
    logs = {f"detector_{r['name']}_val_auroc": r["val_auroc"] for r in results}
    logs["detector_fit_samples"] = float(len(train["labels"]))
    logs.update({f"chosen_detector_{k}": float(v) for k, v in best["params"].items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return WithDetector(method, det, delta), logs
