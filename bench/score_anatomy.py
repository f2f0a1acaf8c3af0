"""Why a method's OOD score ranks the way it does: the evidence behind the README's "Results".

Trains softmax, confidence and dismax in this process (``engine.train_local``, one worker, no Ray)
for each seed on the embedded digits-ood benchmark and reads the **validation** split only:

- every score's mean val AUROC over the val OOD sets (from the run's own metrics);
- confidence: the mean confidence c and feature norm ‖h‖ on val ID and on the OOD sets, the
  correlation of the confidence logit s with ‖h‖ (the penultimate features are non-negative, so a
  linear confidence head reads out their size), and the sign balance of its weight vector;
- dismax: the calibrated temperature, and on val ID and each OOD set the minimum and the mean
  distance to the prototypes (MMLES = −(d_min + 3·mean d)/T − H, so a set that sits nearer the
  prototypes' centroid than ID gains from the mean-distance term).

`python bench/score_anatomy.py [--seeds 0 1 2] [--epochs 15]`: one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import capture_stdout, emit, log, machine_info  # noqa: E402

from ood_ray.checkpoint import load_model_dir  # noqa: E402
from ood_ray.config import TrainConfig  # noqa: E402
from ood_ray.data.streams import eval_batches  # noqa: E402
from ood_ray.engine import train_local  # noqa: E402
from ood_ray.engine.build import load_benchmark  # noqa: E402
from ood_ray.engine.evaluate import normalize  # noqa: E402
from ood_ray.methods import get_method  # noqa: E402


def per_set(model, bench, fn) -> dict[str, dict[str, np.ndarray]]:
    """``fn(features, head_output)`` -> arrays, over val ID and every val OOD set."""
    out = {}
    for name, manifest in {"ID": bench.val, **bench.ood_val}.items():
        parts: dict[str, list] = {}
        for x, _, _ in eval_batches(manifest, 0, 1, 256):
            with torch.no_grad():
                h = model.features(normalize(x))
                for k, v in fn(h, model.head(h)).items():
                    parts.setdefault(k, []).append(v.numpy())
        out[name] = {k: np.concatenate(v) for k, v in parts.items()}
    return out


def score_aurocs(metrics: dict, method: str, params: dict) -> dict[str, float]:
    m = get_method(method, params)
    return {s: metrics["val_auroc" if s == m.default_score else f"val_{s}_auroc"] for s in m.score_names()}


def confidence_anatomy(model, bench) -> dict:
    sets = per_set(model, bench, lambda h, o: {"c": torch.sigmoid(o[1]), "s": o[1], "hnorm": h.norm(dim=1)})
    s = np.concatenate([d["s"] for d in sets.values()])
    hn = np.concatenate([d["hnorm"] for d in sets.values()])
    w = model.head.confidence.weight.detach().numpy().ravel()
    return {
        "mean_c": {k: float(d["c"].mean()) for k, d in sets.items()},
        "mean_feature_norm": {k: float(d["hnorm"].mean()) for k, d in sets.items()},
        "corr_s_feature_norm": float(np.corrcoef(s, hn)[0, 1]),
        "confidence_weight_sum": float(w.sum()),
        "confidence_weight_positive_share": float((w > 0).mean()),
    }


def dismax_anatomy(model, bench) -> dict:
    sets = per_set(model, bench, lambda h, o: (lambda d: {"d_min": d.min(1).values, "d_mean": d.mean(1)})(model.head.distances(h)))
    return {
        "temperature": float(model.head.temperature),
        "mean_d_min": {k: float(d["d_min"].mean()) for k, d in sets.items()},
        "mean_d_mean": {k: float(d["d_mean"].mean()) for k, d in sets.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--methods", nargs="+", default=["softmax", "confidence", "dismax"])
    args = ap.parse_args()
    capture_stdout()
    torch.set_num_threads(1)
    bench = load_benchmark(TrainConfig())
    runs: dict[str, list] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            cfg = TrainConfig(method=method, epochs=args.epochs, num_workers=1, seed=seed, evaluate_test=False)
            with tempfile.TemporaryDirectory() as tmp:
                last = train_local(cfg, tmp)[-1]
                model, _, _ = load_model_dir(last["checkpoint_path"])
                model.eval()
                run = {"seed": seed, "val_acc": last["val_acc"], "val_auroc_by_score": score_aurocs(last, method, cfg.method_params)}
                if method == "confidence":
                    run.update(confidence_anatomy(model, bench))
                    run["lam_final"] = last.get("state_lam")
                if method == "dismax":
                    run.update(dismax_anatomy(model, bench))
            log(f"{method} seed {seed}: val AUROC by score {run['val_auroc_by_score']}")
            runs[method].append(run)
    summary = {}
    for method, rs in runs.items():
        scores = rs[0]["val_auroc_by_score"]
        summary[method] = {s: {"mean": float(np.mean([r["val_auroc_by_score"][s] for r in rs])), "sd": float(np.std([r["val_auroc_by_score"][s] for r in rs]))} for s in scores}
    emit({"benchmark": "digits-ood (val split only)", "epochs": args.epochs, "seeds": args.seeds, "machine": machine_info(1), "val_auroc_by_score": summary, "runs": runs})


if __name__ == "__main__":
    main()
