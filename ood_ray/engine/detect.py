"""Post-hoc detectors on a trained model: features, fitting on train, choosing on val.

A detector (``ood_ray.detectors``) is fitted on the penultimate features of the train split (at
most ``detector_fit_samples``: an evenly spread subset of larger sets; augmentation off; the val
ID features for one with ``fit_split = "val"``), its
parameters are tried on the val split (``Detector.grid``), and the best one by the mean val AUROC
over the val OOD sets wins.
Nothing from a test split is read. Every rank searches on the same gathered arrays and takes
rank 0's choice.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist

from .. import metrics as M
from ..checkpoint import unwrap
from ..config import check_detectors
from ..data.manifest import Benchmark, DataError, Manifest
from ..detectors import DETECTORS, DetectorError, make_detector
from ..methods import Method
from ..methods.with_detector import WithDetector
from ..progress import say
from .evaluate import collect, gather, normalize, run_batches, scoring_mode


def fit_stride(manifest: Manifest, limit: int | None) -> int:
    """Keep one train sample in this many when fitting on at most ``limit`` of ``manifest``."""
    return 1 if limit is None or manifest.num_samples <= limit else -(-manifest.num_samples // limit)


def in_subset(key: str, stride: int) -> bool:
    """Whether a sample belongs to the fit subset: its key's CRC-32 is 0 modulo ``stride``. Spread
    over every shard and class (shards are often written class by class), and the same for any
    number of workers."""
    return stride == 1 or zlib.crc32(key.encode()) % stride == 0


def collect_features(model, method: Method, manifest: Manifest, rank: int, world: int, device, batch_size: int, limit: int | None = None) -> dict[str, np.ndarray]:
    """Gathered ``features``, ``logits``, ``labels`` and ``keys`` of ``manifest``, sorted by key.

    With ``limit`` below the set's size, only an evenly spread subset is run through the model
    (``in_subset``: about ``limit`` samples from every part of the set), cut to ``limit``."""
    net = unwrap(model).eval()
    stride = fit_stride(manifest, limit)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = net.features(normalize(x, device, net))
        return {"features": f, "logits": method.logits(net.head(f))}

    with torch.no_grad():
        local = run_batches(manifest, rank, world, batch_size, run, keep=(lambda k: in_subset(k, stride)) if stride > 1 else None)
    out = gather(local, world)
    return out if limit is None else {k: v[:limit] for k, v in out.items()}


def collect_probes(model, method: Method, det, manifest: Manifest, rank: int, world: int, device, batch_size: int, limit: int | None = None, names: list[str] | None = None) -> dict:
    """Gathered probes of layers ``names`` (default: all of ``det.layer_names``; ``det`` a
    ``needs_layers`` detector, ``det.probe``) of ``manifest``:
    ``{"probes": {layer: N×C}, "labels", "keys"}`` sorted by key, the images streamed batch by
    batch (only the pooled probes are kept); ``limit`` picks an evenly spread subset as
    ``collect_features`` does."""
    net = unwrap(model).eval()
    stride = fit_stride(manifest, limit)
    logits = logits_fn(net, method)

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"probe:{k}": v for k, v in det.probe(net, normalize(x, device, net), logits, names).items()}

    out = gather(run_batches(manifest, rank, world, batch_size, run, keep=(lambda k: in_subset(k, stride)) if stride > 1 else None), world)
    out = out if limit is None else {k: v[:limit] for k, v in out.items()}
    return {"probes": {k[len("probe:") :]: v for k, v in out.items() if k.startswith("probe:")}, "labels": out["labels"], "keys": out["keys"]}


def probe_tensors(data: dict) -> dict[str, torch.Tensor]:
    """The ``probes`` of ``collect_probes`` output as tensors (what a detector fits and scores)."""
    return {k: torch.from_numpy(v) for k, v in data["probes"].items()}


def image_scores(det, manifest: Manifest, rank: int, world: int, device, batch_size: int, model=None) -> np.ndarray:
    """Gathered scores of a detector that scores images (``needs_model``, ODIN) on ``manifest``;
    ``model``'s preprocessing prepares the images."""
    return gather(run_batches(manifest, rank, world, batch_size, lambda x: {"score": det.score(normalize(x, device, model))}), world)["score"]


class Scorer:
    """Scores a fitted detector on the val (or test) split of a benchmark, features computed once."""

    def __init__(self, model, method: Method, bench: Benchmark, split: str, rank: int, world: int, device, batch_size: int):
        self.model, self.method, self.rank, self.world, self.device, self.bs = model, method, rank, world, device, batch_size
        self.bench, self.probes = bench, {}  # probes: per (probe_key, manifest, limit), per layer
        self.id_manifest = bench.val if split == "val" else bench.test
        self.ood = bench.ood_val if split == "val" else bench.ood_test
        self.id = collect_features(model, method, self.id_manifest, rank, world, device, batch_size)
        self.ood_feats = {n: collect_features(model, method, m, rank, world, device, batch_size) for n, m in self.ood.items()}

    def scores(self, det) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(ID scores, {OOD set: scores})`` of ``det``."""
        if det.needs_layers:
            run = lambda m: det.score(probe_tensors(self.probe_set(det, m))).detach().double().cpu().numpy()  # noqa: E731
            return run(self.id_manifest), {n: run(m) for n, m in self.ood.items()}
        if det.needs_model:
            run = lambda m: image_scores(det, m, self.rank, self.world, self.device, self.bs, self.model)  # noqa: E731
            return run(self.id_manifest), {n: run(m) for n, m in self.ood.items()}
        run = lambda out: det.score(torch.from_numpy(out["features"])).detach().double().cpu().numpy()  # noqa: E731
        return run(self.id), {n: run(out) for n, out in self.ood_feats.items()}

    def probe_set(self, det, manifest: Manifest, limit: int | None = None) -> dict:
        """``collect_probes`` of ``manifest`` for ``det``: each layer computed once per probe key."""
        key = (det.probe_key(), id(manifest), limit)
        names = det.layer_names(unwrap(self.model))
        have = self.probes.get(key)
        missing = [n for n in names if have is None or n not in have["probes"]]
        if missing:
            new = collect_probes(self.model, self.method, det, manifest, self.rank, self.world, self.device, self.bs, limit, missing)
            have = self.probes[key] = new if have is None else {**have, "probes": {**have["probes"], **new["probes"]}}
        return {**have, "probes": {n: have["probes"][n] for n in names}}

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
    """Detector ``name`` with ``params`` fitted on ``train`` features (from ``collect_features``;
    layer probes from ``collect_probes`` for a ``needs_layers`` detector, see ``fit_inputs``)."""
    det = make_detector(name, **params)
    net = unwrap(model)
    return det.fit(
        probe_tensors(train) if det.needs_layers else torch.from_numpy(train["features"]),
        torch.from_numpy(train["labels"]).long(),
        cpu_head(method, net),
        model=logits_fn(model, method) if det.needs_model else None,
    )


def fit_data(name: str, train: dict[str, np.ndarray], val: Scorer) -> dict[str, np.ndarray]:
    """What detector ``name`` is fitted on: the train features, or val ID's (``fit_split``)."""
    return val.id if DETECTORS[name].fit_split == "val" else train


def fit_inputs(name: str, params: dict, train: dict[str, np.ndarray], val: Scorer) -> dict:
    """What candidate ``name`` with ``params`` is fitted on: ``fit_data``, or for a detector with
    ``needs_layers`` the layer probes of at most its ``fit_samples`` images of that split (and
    at most as many as the fit subset holds), computed once per probe key by ``val``."""
    data = fit_data(name, train, val)
    if not DETECTORS[name].needs_layers:
        return data
    det = make_detector(name, **params)
    limit = min(len(data["labels"]), int(det.params.get("fit_samples", len(data["labels"]))))
    manifest = val.bench.train if DETECTORS[name].fit_split == "train" else val.id_manifest
    return val.probe_set(det, manifest, max(limit, 1))


def search(names: Iterable[str], train: dict[str, np.ndarray], val: Scorer, model, method: Method) -> tuple[list[dict], dict[str, str]]:
    """Every candidate (detector × its grid) fitted on ``train`` (on ``val.id`` for a detector
    with ``fit_split = "val"``) and scored on val.

    Returns one entry per detector that could be fitted: its best ``params``, ``val_auroc`` and
    the fitted ``detector`` (the first best wins), and ``{detector: why}`` for those that could not
    (e.g. Mahalanobis on a fit subset missing a class): they are left out, not fatal."""
    out, failed = [], {}
    sizes = {"feature_dim": int(train["features"].shape[1]), "num_classes": int(train["logits"].shape[1]), "num_train": len(train["labels"])}
    for name in names:
        best = {"name": name, "val_auroc": -math.inf, "params": {}, "detector": None, "candidates": 0}
        data = fit_data(name, train, val)
        for params in DETECTORS[name].grid(**{**sizes, "num_train": len(data["labels"])}):
            try:
                det = fit(name, params, fit_inputs(name, params, train, val), model, method)
            except DetectorError as e:
                failed[name] = str(e)
                continue
            auroc = val.mean_auroc(det)
            auroc = auroc if math.isfinite(auroc) else -math.inf
            best["candidates"] += 1
            if auroc > best["val_auroc"] or best["detector"] is None:
                best.update(val_auroc=auroc, params=dict(det.params), detector=det)
        if best["detector"] is not None:
            out.append(best)
            failed.pop(name, None)
    return out, failed


def carried_delta(model, method: Method, bench: Benchmark, scores: np.ndarray, rank: int, world: int, device, batch_size: int) -> float | None:
    """δ on a detector's val ID ``scores`` that accepts the same share of val ID as the method's
    own δ on its threshold score (None when the method has none)."""
    if method.delta is None:
        return None
    with scoring_mode(method):
        own = gather(collect(model, method, bench.val, rank, world, device, batch_size), world)[method.threshold_score]
    accepted = float(np.mean(own.astype(np.float64) >= float(method.delta)))
    return float(np.quantile(scores, 1.0 - accepted)) if accepted < 1.0 else float(np.min(scores))


def agree(choice: tuple, world: int) -> tuple:
    """Rank 0's ``choice`` on every rank: the ranks search on the same gathered arrays, and this
    keeps a float tie broken differently on another host from splitting them."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return choice


def choose_detector(model, method: Method, cfg, bench: Benchmark, rank: int, world: int, device) -> tuple[WithDetector, dict]:
    """The detector of ``cfg.detectors`` with the best mean val AUROC, fitted on train; returns it
    wrapped around ``method``, and the values to log.

    δ is set on its val ID scores: at ``cfg.delta_tpr`` acceptance when given, else at the share of
    val ID the method's own δ accepts (so "don't know" keeps its operating point)."""
    if not bench.ood_val:
        raise DataError(f"{bench.path}: --detectors chooses a detector by val AUROC, so the benchmark needs val OOD sets (ood_val)")
    bs = cfg.eval_batch_size
    train = collect_features(model, method, bench.train, rank, world, device, bs, limit=cfg.detector_fit_samples)
    val = Scorer(model, method, bench, "val", rank, world, device, bs)
    results, failed = search(check_detectors(cfg.method, method.params, cfg.detectors), train, val, model, method)
    if not results:
        raise DataError("no detector could be fitted on the train features: " + "; ".join(failed.values()))
    best = max(results, key=lambda r: (r["val_auroc"], -results.index(r)))
    name, params = agree((best["name"], best["params"]), world)
    best = next(r for r in results if r["name"] == name)
    det = best["detector"] if best["params"] == params else fit(name, params, fit_inputs(name, params, train, val), model, method)
    s_id = val.scores(det)[0].astype(np.float32).astype(np.float64)  # as the run's metrics read them
    if cfg.delta_tpr is not None:
        delta = float(np.quantile(s_id, 1.0 - cfg.delta_tpr))
    else:
        delta = carried_delta(model, method, bench, s_id, rank, world, device, bs)
    if rank == 0:
        ranked = sorted(results, key=lambda r: -r["val_auroc"])
        say("detectors on val (mean AUROC): " + ", ".join(f"{r['name']} {r['val_auroc']:.4f}" for r in ranked) + f"; chosen: {name} {params}")
        for n, why in failed.items():
            say(f"detector {n} left out: {why}")
    logs = {f"detector_{r['name']}_val_auroc": r["val_auroc"] for r in results}
    logs["detector_fit_samples"] = float(len(train["labels"]))
    logs.update({f"chosen_detector_{k}": float(v) for k, v in params.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    logs.update({f"chosen_detector_fitted_{k}": float(v) for k, v in det.fitted().items()})  # tempscale: T
    if delta is not None:
        logs["chosen_detector_delta"] = delta
    return WithDetector(method, det, delta), logs
