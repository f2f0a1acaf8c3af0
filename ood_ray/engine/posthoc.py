"""After the last epoch: calibration, the post-hoc grid (ε, calibration settings) and δ, on val only."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checkpoint import unwrap
from ..config import TrainConfig
from ..data.manifest import Benchmark
from ..methods import Method, get_method
from .evaluate import collect, evaluate_split, gather, scoring_mode


def post_train(model, method: Method, bench: Benchmark, rank: int, world: int, device, batch_size: int) -> dict:
    """Run the method's calibration on the whole validation split (identical on every rank)."""
    if type(method).calibrate is Method.calibrate:
        return {}
    with torch.no_grad():
        val = gather(collect(model, method, bench.val, rank, world, device, batch_size), world)
    return method.calibrate(unwrap(model), torch.from_numpy(val["logits"]), torch.from_numpy(val["labels"]))


def choose_delta(model, method: Method, bench: Benchmark, tpr: float, rank: int, world: int, device, batch_size: int) -> float:
    """δ that accepts the fraction ``tpr`` of val ID (a quantile of the threshold score), clipped to
    the method's ``threshold_range``."""
    with scoring_mode(method):
        val = gather(collect(model, method, bench.val, rank, world, device, batch_size), world)
    low, high = method.threshold_range
    return float(np.clip(np.quantile(val[method.threshold_score].astype(np.float64), 1.0 - tpr), low, high))


def finish_method(model, method: Method, cfg: TrainConfig, bench: Benchmark, rank: int, world: int, device) -> tuple[Method, dict]:
    """After the last epoch: calibrate, and with ``posthoc_search`` choose the post-hoc values.

    Every candidate of the method's ``posthoc_grid`` (ε, calibration settings) is applied to this
    checkpoint and scored by val AUROC of the method's score; the first best wins. Post-hoc values
    do not change the class prediction, so the accuracy guard plays no part here. Then δ is set
    from val ID when ``delta_tpr`` is given. Only the validation split is read.
    """
    bs = cfg.eval_batch_size
    candidates = type(method).posthoc_grid() if cfg.posthoc_search else [{}]
    logs: dict = {}
    chosen = {}
    if len(candidates) > 1:
        best = -math.inf
        for cand in candidates:
            m = get_method(cfg.method, {**method.params, **cand})
            post_train(model, m, bench, rank, world, device, bs)
            auroc = evaluate_split(model, m, bench, "val", rank, world, device, bs).get("val_auroc", math.nan)
            if auroc > best:
                best, chosen = auroc, cand
        logs["posthoc_candidates"] = len(candidates)
    method = get_method(cfg.method, {**method.params, **chosen})
    calibrated = post_train(model, method, bench, rank, world, device, bs)
    undeclared = sorted(set(calibrated) - set(method.calibration_keys))
    if undeclared:  # they would be missing from the sweep's records: the contract says declare them
        raise ValueError(f"method {method.name!r}: calibrate() returned {', '.join(undeclared)}, not declared in its calibration_keys")
    logs.update(calibrated)
    if cfg.delta_tpr is not None:
        delta = choose_delta(model, method, bench, cfg.delta_tpr, rank, world, device, bs)
        method = get_method(cfg.method, {**method.params, "delta": delta})
    logs.update({f"chosen_{k}": float(v) for k, v in method.params.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return method, logs
