"""Toy 2-D confidence maps: every OOD method trained on three Gaussian blobs in the plane.

``run_toy`` trains each method on the same points with a small MLP backbone (2 → 64 → 64, ReLU),
in this process and in a few seconds on a CPU, using the registered ``Method`` classes and the
training loop's own ``train_step`` (so the methods are the ones ``ood-ray train`` runs, not
copies). It then draws one panel per method: the method's default OOD score (higher = more
in-distribution) as a heat map over the plane, the training points by class and the "don't know"
boundary, the contour of the threshold score at δ, with δ chosen to accept 95% of held-out toy
validation points (as ``delta_tpr=0.95`` does in training).

Data (all from the seed): three isotropic Gaussian blobs (σ = 0.9) at radius 2.3 (they overlap a little), 120° apart;
outliers for Outlier Exposure and the box AUROC are uniform on the square [-6, 6]² that the maps
cover. Method parameters changed for 2-D points are in ``TOY_PARAMS``: DisMax's fractional
probability regularization mixes image quadrants and needs N × C × H × W images, so ``alpha=0``
turns it off. Torch, numpy and matplotlib only; MLflow is imported only when a URI is given.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import nn

from .engine.evaluate import scoring_mode
from .engine.loop import train_step
from .methods import Method, get_method
from .metrics import ood_metrics
from .models import Classifier
from .progress import say

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["TOY_METHODS", "TOY_PARAMS", "DEFAULT_TOY_METHODS", "run_toy", "toy_data"]

TOY_METHODS = ("softmax", "outlier_exposure", "confidence", "dismax", "logitnorm", "t2fnorm")
DEFAULT_TOY_METHODS = ("softmax", "outlier_exposure", "confidence", "dismax")
#: Parameters that differ from a method's defaults on 2-D points, and why (shown in the figure).
TOY_PARAMS = {"dismax": {"alpha": 0.0}}
TOY_PARAM_REASONS = {"dismax": "alpha=0: FPR mixes image quadrants (needs N×C×H×W images)"}

BOX = 6.0  # the maps and the outliers cover [-BOX, BOX]²
RADIUS, SIGMA, CLASSES = 2.3, 0.9, 3
N_TRAIN, N_VAL, N_BOX = 300, 300, 3000  # points per class (train, val) and uniform box points
HIDDEN, STEPS, BATCH, LR = 64, 600, 128, 3e-3
GRID = 200
TPR = 0.95  # fraction of val ID accepted at δ
CLASS_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd")


class PointMLP(nn.Module):
    """The toy backbone: 2-D points to ``num_features`` ReLU features."""

    num_features = HIDDEN

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_data(seed: int) -> dict[str, torch.Tensor]:
    """Train and val points of the three blobs (``x_*`` N × 2, ``y_*`` N) and uniform box points."""
    rng = np.random.default_rng(seed)
    angles = np.pi / 2 + 2 * np.pi * np.arange(CLASSES) / CLASSES
    centres = RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.repeat(np.arange(CLASSES), n)
        x = centres[y] + SIGMA * rng.standard_normal((len(y), 2))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)

    x_train, y_train = blobs(N_TRAIN)
    x_val, y_val = blobs(N_VAL)
    box = torch.tensor(rng.uniform(-BOX, BOX, (N_BOX, 2)), dtype=torch.float32)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val, "box": box}


def _scores(model, method: Method, x: torch.Tensor) -> dict[str, np.ndarray]:
    """``method.eval_batch`` of ``x`` (model in eval mode) as float64 numpy arrays."""
    model.eval()
    with scoring_mode(method):
        out = method.eval_batch(model, x)
    return {k: v.detach().double().numpy() for k, v in out.items()}


def _train_one(name: str, seed: int, data: dict, grid: torch.Tensor) -> dict:
    """Train ``name`` on the toy data as the real loop does, calibrate it, choose δ, score the grid."""
    t0 = time.perf_counter()
    method = get_method(name, TOY_PARAMS.get(name))
    torch.manual_seed(seed)  # weights, and the global RNG the confidence hint mask draws from
    gen = torch.Generator().manual_seed(seed + 1)  # batches and outlier points
    model = Classifier(PointMLP(), method.make_head(HIDDEN, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=LR * 1e-2)
    state = method.initial_state()
    n_out = method.outlier_batch(BATCH) if method.needs_outliers else 0
    x, y = data["x_train"], data["y_train"]
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=gen)
        x_out = (torch.rand(n_out, 2, generator=gen) * 2 - 1) * BOX if n_out else None
        train_step(model, method, opt, sched, x[idx], y[idx], x_out, state)
    if type(method).calibrate is not Method.calibrate:  # e.g. the DisMax temperature, on val only
        val_logits = torch.from_numpy(_scores(model, method, data["x_val"])["logits"]).float()
        method.calibrate(model, val_logits, data["y_val"])
    val = _scores(model, method, data["x_val"])
    low, high = method.threshold_range
    delta = float(np.clip(np.quantile(val[method.threshold_score], 1.0 - TPR), low, high))
    method = get_method(name, {**method.params, "delta": delta})
    train = _scores(model, method, x)
    box = _scores(model, method, data["box"])
    on_grid = _scores(model, method, grid)
    acc = lambda out, labels: float((out["logits"].argmax(1) == labels.numpy()).mean())  # noqa: E731
    return {
        "params": dict(method.params),
        "delta": delta,
        "score": method.default_score,
        "threshold_score": method.threshold_score,
        "train_acc": acc(train, y),
        "val_acc": acc(val, data["y_val"]),
        "auroc_box": ood_metrics(val[method.default_score], box[method.default_score])["auroc"],
        "seconds": time.perf_counter() - t0,
        "grid": on_grid[method.default_score].reshape(GRID, GRID),
        "threshold_grid": on_grid[method.threshold_score].reshape(GRID, GRID),
    }


def _draw(results: dict[str, dict], data: dict, seed: int, out: Path) -> Path:
    """One panel per method: default-score heat map, training points, δ contour; writes ``out``."""
    n = len(results)
    ncols = n if n <= 3 else (2 if n == 4 else 3)
    nrows = -(-n // ncols)
    with matplotlib.rc_context({"hatch.color": "white", "hatch.linewidth": 0.6}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.8 * nrows), squeeze=False)
        try:
            extent = (-BOX, BOX, -BOX, BOX)
            xs = np.linspace(-BOX, BOX, GRID)
            x, y = data["x_train"].numpy(), data["y_train"].numpy()
            for ax, (name, r) in zip(axes.flat, results.items(), strict=False):
                im = ax.imshow(r["grid"], origin="lower", extent=extent, cmap="magma", aspect="equal")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label(f"{r['score']} (higher = more ID)")
                for k in range(CLASSES):
                    sel = y == k
                    ax.scatter(x[sel, 0], x[sel, 1], s=7, color=CLASS_COLOURS[k], edgecolors="white", linewidths=0.3, label=f"class {k}")
                thr = r["threshold_grid"]
                if thr.min() < r["delta"]:  # hatch the "don't know" side (threshold score < δ)
                    ax.contourf(xs, xs, thr, levels=[thr.min() - 1.0, r["delta"]], colors="none", hatches=["///"])
                    ax.contour(xs, xs, thr, levels=[r["delta"]], colors="#00e5ff", linewidths=2.0)
                title = f"{name}: heat = {r['score']}, δ = {r['delta']:.3f}"
                if r["threshold_score"] != r["score"]:
                    title += f"\ncontour: {r['threshold_score']} = δ (over the {r['score']} map)"
                else:
                    title += f"\ncontour: {r['threshold_score']} = δ"
                ax.set_title(title, fontsize="medium")
                ax.set_xlim(-BOX, BOX)
                ax.set_ylim(-BOX, BOX)
                ax.text(0.02, 0.02, f"val acc {r['val_acc']:.3f}   AUROC vs box {r['auroc_box']:.3f}", transform=ax.transAxes, fontsize="small", color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2})
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            handles, labels = axes.flat[0].get_legend_handles_labels()
            handles.append(plt.Line2D([], [], color="#00e5ff", lw=2.0))
            handles.append(Patch(facecolor="0.35", edgecolor="white", hatch="///"))
            labels += [f"δ contour ({TPR:.0%} of val ID accepted)", "\"don't know\" (threshold score < δ)"]
            fig.legend(handles, labels, loc="lower center", ncol=5, frameon=False, markerscale=2.5)
            notes = [f"{m}: {TOY_PARAM_REASONS[m]}" for m in results if m in TOY_PARAM_REASONS]
            fig.suptitle(f"Toy 2-D confidence maps (seed {seed}): three Gaussian blobs, MLP 2→64→64; "
                         f"OE outliers uniform on the box" + ("\nchanged for 2-D points: " + "; ".join(notes) if notes else ""))
            fig.tight_layout(rect=(0, 0.05, 1, 1))
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
            return out
        finally:
            plt.close(fig)


def _log_mlflow(uri: str, experiment: str, seed: int, results: dict[str, dict], path: Path) -> str:
    """One MLflow run: ``<method>.<param>`` params and seed, per-method metrics, the PNG artifact."""
    from mlflow.tracking import MlflowClient

    from .tracking import check_tracking, ensure_experiment, log_metrics, open_run, params_of

    check_tracking(uri)
    client = MlflowClient(uri)
    run = open_run(client, ensure_experiment(client, experiment), f"toy-seed{seed}", tags={"ood_ray.kind": "toy"})
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=params_of({"seed": seed, **{m: r["params"] for m, r in results.items()}}))
        keys = ("delta", "val_acc", "train_acc", "auroc_box", "seconds")
        log_metrics(client, run_id, {f"{m}.{k}": r[k] for m, r in results.items() for k in keys}, step=0)
        client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_toy(out="toy.png", seed: int = 0, methods=DEFAULT_TOY_METHODS, mlflow_uri: str | None = None, experiment: str = "ood-ray-toy") -> dict:
    """Train ``methods`` on the toy blobs, draw their confidence maps to ``out`` (a .png).

    Returns ``{"path", "methods": {name: {"params", "delta", "score", "threshold_score",
    "train_acc", "val_acc", "auroc_box", "seconds"}}, "grids": {name: {"score", "threshold"}}
    (200 × 200 arrays over [-6, 6]², rows = y), "seconds", "run_id"}``. ``auroc_box`` is the AUROC
    of the default score, toy val ID against uniform box points. The same seed gives identical
    numbers and grids (each method reseeds torch, so a method's result does not depend on the
    others). With ``mlflow_uri``, one run is logged in ``experiment`` and ``run_id`` is its id.
    Raises ValueError naming an unknown method or an ``out`` that is not a .png.
    """
    t0 = time.perf_counter()
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in TOY_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown toy method(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(TOY_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods!r} name a method twice")
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"out={str(out)!r} must be a .png file")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = toy_data(seed)
        xs = torch.linspace(-BOX, BOX, GRID)
        gy, gx = torch.meshgrid(xs, xs, indexing="ij")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        results = {}
        for name in methods:
            results[name] = r = _train_one(name, seed, data, grid)
            say(f"toy {name}: {r['seconds']:.1f}s  val_acc {r['val_acc']:.3f}  δ {r['delta']:.4f} on {r['threshold_score']}  AUROC vs box {r['auroc_box']:.3f}")
    finally:
        torch.set_num_threads(threads)
    path = _draw(results, data, seed, path)
    run_id = _log_mlflow(mlflow_uri, experiment, seed, results, path) if mlflow_uri else None
    summary = {m: {k: v for k, v in r.items() if k not in ("grid", "threshold_grid")} for m, r in results.items()}
    grids = {m: {"score": r["grid"], "threshold": r["threshold_grid"]} for m, r in results.items()}
    return {"path": path, "methods": summary, "grids": grids, "seconds": time.perf_counter() - t0, "run_id": run_id}
