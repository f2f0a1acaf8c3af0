"""Memory of a training worker over epochs: is it flat? Prints one JSON object.

    python bench/worker_memory.py                   # digits, outlier_exposure, 8 epochs, lw 0 and 1
    python bench/worker_memory.py --epochs 4 --loader-workers 0
    python bench/worker_memory.py --ray             # also a Ray Train worker (its worker_rss_mb metric)

Each run is a fresh Python process (no run inherits another's heap):

* ``loop-lw<N>``: the package's ``ood_ray.engine.train_loop`` in-process through a ``LocalWorker``
  (training, val evaluation, checkpoint every epoch), ``loader_workers`` N; after every epoch's
  report: RSS of the process, RSS + USS of its children (loader workers; what the package's
  ``worker_rss_mb`` metric sums) and the number of children;
* ``ray-lw<N>`` (``--ray``): ``ood_ray.train.run_training`` (one Ray Train worker, local Ray,
  temporary MLflow) and the per-epoch ``worker_rss_mb`` read back from MLflow.

The default method, outlier_exposure, reads the endless outlier stream too. Verdict: flat when
the growth from epoch 2 (epoch 1 warms allocator pools and caches) to the last epoch is <=
max(10 MB, 1 % of epoch 2): above the epoch-to-epoch noise, below what an unreaped loader worker
or an epoch's kept data adds (the figures behind it are in RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def train_config(args, lw: int, tmp: str, **kw):
    from ood_ray.config import TrainConfig

    data = str(C.synthetic_benchmark(args.data_dir, args.n, "png")) if args.data == "cifar" else None
    return TrainConfig(
        method=args.method, backbone=args.backbone, data=data, epochs=args.epochs, batch_size=args.batch_size,
        num_workers=1, cpus_per_worker=args.threads, loader_workers=lw, evaluate_test=False, storage_path=tmp,
        hflip=args.data == "cifar", **kw,
    )  # fmt: skip


def child_loop(args, lw: int) -> list[dict]:
    from ood_ray.engine import LocalWorker, train_loop

    tmp = os.environ["OOD_RAY_RESULTS"] = tempfile.mkdtemp(prefix="ood-ray-mem-")
    samples: list[dict] = []

    class MemWorker(LocalWorker):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            samples.append({"epoch": int(metrics["epoch"]), **C.rss_mb(), "worker_rss_mb_metric": round(metrics["worker_rss_mb"], 1)})
            C.log(f"loop lw{lw}: {samples[-1]}")

    train_loop(train_config(args, lw, tmp).validate(), MemWorker(tmp))
    return samples


def child_ray(args, lw: int) -> list[dict]:
    import ray
    from mlflow.tracking import MlflowClient

    from ood_ray.train import run_training

    tmp = os.environ["OOD_RAY_RESULTS"] = tempfile.mkdtemp(prefix="ood-ray-mem-ray-")
    cfg = train_config(args, lw, str(Path(tmp) / "ray"), mlflow_uri=f"sqlite:///{tmp}/mlflow.db", experiment="worker-memory", max_failures=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_training(cfg)
        hist = sorted(MlflowClient(cfg.mlflow_uri).get_metric_history(out.run_id, "worker_rss_mb"), key=lambda m: m.step)
    finally:
        ray.shutdown()
    return [{"epoch": i + 1, "tree_mb": round(m.value, 1)} for i, m in enumerate(hist)]


def verdict(values: list[float], args) -> dict:
    if len(values) < 3:
        return {"verdict": "too few epochs (need >= 3)"}
    base, growth = values[1], values[-1] - values[1]
    limit = max(args.flat_mb, args.flat_frac * base)
    slope = float(np.polyfit(np.arange(len(values) - 1), np.asarray(values[1:]), 1)[0])
    return {"growth_epoch2_to_last_mb": round(growth, 1), "slope_mb_per_epoch": round(slope, 2), "threshold_mb": round(limit, 1), "verdict": "flat" if growth <= limit else "not flat"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--loader-workers", default="0,1", help="comma list (default 0,1)")
    p.add_argument("--method", default="outlier_exposure")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", choices=("digits", "cifar"), default="digits", help="digits-ood, or a synthetic 32x32 RGB benchmark of --n train images")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (cpus_per_worker)")
    p.add_argument("--flat-mb", type=float, default=10.0)
    p.add_argument("--flat-frac", type=float, default=0.01)
    p.add_argument("--ray", action="store_true", help="also run Ray Train and read worker_rss_mb per epoch")
    p.add_argument("--data-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ood_ray_bench_data"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        kind, lw = args.child.split(":")
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines
            samples = (child_ray if kind == "ray" else child_loop)(args, int(lw))
        C.emit({"samples": samples, "wall_s": round(time.perf_counter() - t, 1)})
        sys.exit(0)
    if args.data == "digits":
        from ood_ray.data.default import ensure_default

        ensure_default()  # built once, before the children race for it
    else:
        C.synthetic_benchmark(args.data_dir, args.n, "png")
    t0 = time.perf_counter()
    out: dict = {"bench": "worker_memory", "machine": C.machine_info(args.threads), "settings": {k: v for k, v in vars(args).items() if k != "child"}, "runs": {}}
    base_cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
    for kind in ["loop"] + (["ray"] if args.ray else []):
        for lw in (int(v) for v in args.loader_workers.split(",") if v):
            name = f"{kind}-lw{lw}"
            C.log(f"run {name} ...")
            proc = subprocess.run([*base_cmd, "--child", f"{kind}:{lw}"], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                out["runs"][name] = {"verdict": f"error: exit {proc.returncode} (see stderr)"}
                continue
            r = json.loads(proc.stdout)
            tree = [s["tree_mb"] for s in r["samples"]]
            entry = {"tree_mb_per_epoch": tree, **verdict(tree, args), "wall_s": r["wall_s"]}
            if kind == "loop":
                entry |= {k: [s[k] for s in r["samples"]] for k in ("rss_mb", "children")}
            out["runs"][name] = entry
    out["verdict"] = {k: v["verdict"] for k, v in out["runs"].items()}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    C.emit(main())
