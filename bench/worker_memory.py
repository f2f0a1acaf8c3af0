"""Memory of a training worker over epochs: is its RSS flat? Prints one JSON object.

    python bench/worker_memory.py                          # digits, OE, 8 epochs, lw 0 and 1, both loops
    python bench/worker_memory.py --epochs 10 --data cifar --n 5000
    python bench/worker_memory.py --ray                    # also a real Ray Train run (worker_rss_mb)

Each configuration runs in its own fresh Python process (so one cannot inherit another's heap):

* ``loop=package``: the package's own training loop ``ood_ray.train.train_loop`` in-process
  through a ``LocalWorker`` (world 1; training, val evaluation, checkpoint copy every epoch), with
  the method ``outlier_exposure`` so the endless outlier stream (``outlier_batches``) runs too.
* ``loop=stream``: only the data path + step: ``train_batches`` + ``outlier_batches`` feeding
  model/method/SGD (bench/_common.py ``Trainer``), no evaluation or checkpoints.

for ``loader_workers`` in ``--loader-workers`` (0, 1). After every epoch it samples, with psutil:
``rss_mb`` (the training process), ``tree_rss_mb`` (+ its live children = DataLoader workers; the
package's ``worker_rss_mb`` metric is the same sum; it counts the pages a forked worker shares with
its parent twice: +~580 MB per worker here), ``tree_mem_mb`` (RSS of the training process + USS =
private pages of its children: shared pages once, independent of other processes) and the number
of children. A sampler thread (every
``--sample-interval`` s) records the peak tree RSS, including DataLoader workers that live only
during an epoch; ``ru_maxrss`` gives the training process's own peak.

Verdict: growth = tree RSS after the last epoch - after epoch 2 (epoch 1 warms allocator pools,
oneDNN primitives, import-time caches, the outlier worker). ``flat`` when growth <=
max(``--flat-mb`` 10 MB, ``--flat-frac`` 1 % of epoch 2). Why: epoch-to-epoch noise of a ~1.2 GB
worker (glibc arenas, Python's allocator) measured here is +-5 MB; a per-epoch leak of anything that
matters crosses the threshold within 6-10 epochs: an un-reaped DataLoader worker adds ~0.5 GB of
RSS, kept batches or shard bytes add at least the epoch's data (digits: 1077 x 4 KB of shards =
4.4 MB/epoch, i.e. >= 22 MB from epoch 2 to 8). The least-squares slope (MB/epoch, epochs
2..last) is reported as well.

``--ray``: also ``ood_ray.train.run_training`` (Ray Train, 1 worker, local Ray, temporary MLflow
sqlite store) and the per-epoch ``worker_rss_mb`` metric read back from MLflow.

Target: flat worker memory over epochs (no growth beyond the threshold), with 0 and 1 loader workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="See the module docstring for the method.")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--loader-workers", default="0,1", help="comma list (default 0,1)")
    p.add_argument("--loops", default="package,stream", help="comma list of package, stream (default both)")
    p.add_argument("--method", default="outlier_exposure", help="default outlier_exposure (reads the outlier stream too)")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", choices=("digits", "cifar"), default="digits", help="digits-ood, or a synthetic 32x32 RGB benchmark of --n train images")
    p.add_argument("--n", type=int, default=5000, help="train images of the synthetic benchmark")
    p.add_argument("--encoding", choices=("png", "raw"), default="png")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process (the loop sets cpus_per_worker)")
    p.add_argument("--flat-mb", type=float, default=10.0)
    p.add_argument("--flat-frac", type=float, default=0.01)
    p.add_argument("--sample-interval", type=float, default=0.05)
    p.add_argument("--patches", default="", help="opt-in monkeypatches of the data path (bench/_common.py PATCHES), comma list")
    p.add_argument("--ray", action="store_true", help="also run Ray Train (run_training) and read worker_rss_mb per epoch")
    p.add_argument("--data-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ood_ray_bench_data"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Sampling


class PeakSampler(threading.Thread):
    """Tree RSS (process + live children) every ``interval`` s; keeps the max overall and per epoch."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = self.epoch_peak = 0.0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            try:
                tree = C.rss_mb()[1]
            except Exception:
                continue
            self.peak = max(self.peak, tree)
            self.epoch_peak = max(self.epoch_peak, tree)

    def take_epoch_peak(self) -> float:
        v, self.epoch_peak = self.epoch_peak, 0.0
        return v

    def stop(self):
        self._halt.set()


def tree_mem_mb() -> float:
    """RSS of this process + USS of its children, MB.

    USS = pages private to a process. A forked DataLoader worker shares most of its RSS with the
    parent (copy-on-write), so the RSS sum counts those pages twice; RSS(parent) + USS(children)
    counts them once and does not depend on other processes on the machine (PSS would).
    """
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for p in me.children(recursive=True):
        try:
            total += p.memory_full_info().uss
        except psutil.Error:
            pass
    return total / 2**20


def epoch_sample(sampler: PeakSampler, epoch: int, t0: float, extra: dict | None = None) -> dict:
    own, tree, kids = C.rss_mb()
    return {
        "epoch": epoch,
        "t_s": round(time.perf_counter() - t0, 1),
        "rss_mb": round(own, 1),
        "tree_rss_mb": round(tree, 1),
        "tree_mem_mb": round(tree_mem_mb(), 1),
        "children": kids,
        "epoch_peak_tree_rss_mb": round(max(sampler.take_epoch_peak(), tree), 1),
        **(extra or {}),
    }


# ---------------------------------------------------------------------------------------------
# Children: one configuration each


def bench_path(args) -> str | None:
    if args.data == "digits":
        return None  # the package's ensure_default
    return str(C.synthetic_benchmark(args.data_dir, args.n, args.encoding))


def child_package(args, lw: int) -> list[dict]:
    """The package's train_loop in-process (LocalWorker), sampling at every epoch's report."""
    from ood_ray.config import TrainConfig
    from ood_ray.train import LocalWorker, train_loop

    tmp = tempfile.mkdtemp(prefix="ood-ray-mem-")
    os.environ.setdefault("OOD_RAY_RESULTS", tmp)
    cfg = TrainConfig(
        method=args.method, backbone=args.backbone, data=bench_path(args), epochs=args.epochs, batch_size=args.batch_size,
        num_workers=1, cpus_per_worker=args.threads, loader_workers=lw, evaluate_test=False, storage_path=tmp,
        hflip=args.data == "cifar", augment_pad=4 if args.data == "cifar" else 1,
    )  # fmt: skip
    samples: list[dict] = []
    sampler = PeakSampler(args.sample_interval)
    t0 = time.perf_counter()

    class MemWorker(LocalWorker):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            samples.append(epoch_sample(sampler, int(metrics["epoch"]), t0, {"worker_rss_mb_metric": round(metrics["worker_rss_mb"], 1) if "worker_rss_mb" in metrics else None}))
            C.log(f"package lw{lw} epoch {samples[-1]['epoch']}: {samples[-1]}")

    sampler.start()
    train_loop(cfg.validate(), MemWorker(tmp))
    sampler.stop()
    return samples


def child_stream(args, lw: int) -> list[dict]:
    """Only the data path + training step: train_batches + outlier_batches -> Trainer.step."""
    import torch

    from ood_ray.data.manifest import Benchmark
    from ood_ray.data.streams import outlier_batches, train_batches
    from ood_ray.methods import get_method

    torch.set_num_threads(args.threads)
    path = bench_path(args)
    bench = Benchmark.load(path) if path else C.digits_benchmark()
    method = get_method(args.method)
    trainer = C.Trainer(args.backbone, bench.train.channels, bench.train.image_size, bench.num_classes, method=args.method)
    pad, hflip = (4, True) if args.data == "cifar" else (1, False)
    bs = args.batch_size
    outliers = None
    if method.needs_outliers:
        outliers = outlier_batches(bench.outlier, 0, 1, int(method.params.get("outlier_ratio", 1) * bs), augment_pad=pad, hflip=hflip, loader_workers=lw)
    samples: list[dict] = []
    sampler = PeakSampler(args.sample_interval)
    sampler.start()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        n = 0
        for x, y, _ in train_batches(bench.train, 0, 1, bs, epoch, augment_pad=pad, hflip=hflip, loader_workers=lw):
            x_out = next(outliers)[0] if outliers is not None else None
            trainer.step(x, y, x_out)
            n += 1
        samples.append(epoch_sample(sampler, epoch + 1, t0, {"steps": n}))
        C.log(f"stream lw{lw} epoch {epoch + 1}: {samples[-1]}")
    sampler.stop()
    return samples


def child_ray(args, lw: int) -> list[dict]:
    """run_training on a local Ray (1 Ray Train worker); worker_rss_mb per epoch from MLflow."""
    import ray
    from mlflow.tracking import MlflowClient

    from ood_ray.config import TrainConfig
    from ood_ray.train import run_training

    tmp = tempfile.mkdtemp(prefix="ood-ray-mem-ray-")
    os.environ["OOD_RAY_RESULTS"] = tmp
    cfg = TrainConfig(
        method=args.method, backbone=args.backbone, data=bench_path(args), epochs=args.epochs, batch_size=args.batch_size,
        num_workers=1, cpus_per_worker=args.threads, loader_workers=lw, evaluate_test=False, storage_path=str(Path(tmp) / "ray"),
        mlflow_uri=f"sqlite:///{tmp}/mlflow.db", experiment="worker-memory", max_failures=0,
        hflip=args.data == "cifar", augment_pad=4 if args.data == "cifar" else 1,
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_training(cfg)
        hist = MlflowClient(cfg.mlflow_uri).get_metric_history(out.run_id, "worker_rss_mb")
    finally:
        ray.shutdown()
    rows = sorted(hist, key=lambda m: m.step)
    if not rows:
        raise SystemExit("run_training reported no worker_rss_mb metric")
    return [{"epoch": i + 1, "step": m.step, "tree_rss_mb": round(m.value, 1)} for i, m in enumerate(rows)]


def run_child(args) -> None:
    spec = json.loads(args.child)
    import torch

    torch.set_num_threads(args.threads)
    fn = {"package": child_package, "stream": child_stream, "ray": child_ray}[spec["loop"]]
    patches = tuple(p for p in args.patches.split(",") if p)
    t = time.perf_counter()
    with C.patched(patches), contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines
        samples = fn(args, spec["lw"])
    C.emit({"loop": spec["loop"], "lw": spec["lw"], "samples": samples, "ru_maxrss_mb": round(C.peak_rss_mb(), 1), "wall_s": round(time.perf_counter() - t, 1)})


# ---------------------------------------------------------------------------------------------
# Parent


def verdict(values: list[float], flat_mb: float, flat_frac: float) -> dict:
    if len(values) < 3:
        return {"verdict": "too few epochs (need >= 3)"}
    base, last = values[1], values[-1]
    growth = last - base
    xs = np.arange(2, len(values) + 1, dtype=float)
    slope = float(np.polyfit(xs, np.asarray(values[1:], dtype=float), 1)[0]) if len(values) > 2 else 0.0
    limit = max(flat_mb, flat_frac * base)
    return {
        "growth_epoch2_to_last_mb": round(growth, 1),
        "growth_frac": round(growth / base, 4),
        "slope_mb_per_epoch": round(slope, 2),
        "threshold_mb": round(limit, 1),
        "verdict": "flat" if growth <= limit else "not flat",
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        sys.exit(0)
    lws = [int(v) for v in args.loader_workers.split(",") if v]
    loops = [v for v in args.loops.split(",") if v] + (["ray"] if args.ray else [])
    if args.data == "digits":
        C.digits_benchmark()  # build once, before the children race for it
    else:
        C.synthetic_benchmark(args.data_dir, args.n, args.encoding)
    t0 = time.perf_counter()
    result: dict = {
        "bench": "worker_memory",
        "target": "flat worker RSS over epochs",
        "machine": C.machine_info(args.threads),
        "data": args.data if args.data == "digits" else f"synthetic 32x32x3 n={args.n} {args.encoding}",
        "method": args.method,
        "backbone": args.backbone,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "patches": [p for p in args.patches.split(",") if p],
        "flat_rule": f"tree RSS growth from epoch 2 to the last <= max({args.flat_mb:g} MB, {args.flat_frac:.0%} of epoch 2)",
        "runs": {},
    }
    base_cmd = [sys.executable, str(Path(__file__).resolve())] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--ray"]
    for loop in loops:
        for lw in lws:
            name = f"{loop}-lw{lw}"
            C.log(f"run {name} ...")
            proc = subprocess.run([*base_cmd, "--child", json.dumps({"loop": loop, "lw": lw})], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                result["runs"][name] = {"error": f"exit {proc.returncode} (see stderr)"}
                continue
            r = json.loads(proc.stdout)
            tree = [s["tree_rss_mb"] for s in r["samples"]]
            entry = {
                "tree_rss_mb_per_epoch": tree,
                **verdict(tree, args.flat_mb, args.flat_frac),
                "wall_s": r["wall_s"],
            }
            if loop != "ray":
                mem = [s["tree_mem_mb"] for s in r["samples"]]
                entry.update(
                    {
                        "rss_mb_per_epoch": [s["rss_mb"] for s in r["samples"]],
                        "tree_mem_mb_per_epoch": mem,
                        "tree_mem_verdict": verdict(mem, args.flat_mb, args.flat_frac)["verdict"],
                        "children_per_epoch": [s["children"] for s in r["samples"]],
                        "peak_tree_rss_mb": max(s["epoch_peak_tree_rss_mb"] for s in r["samples"]),
                        "peak_rss_mb_training_process": r["ru_maxrss_mb"],
                        "current_tree_rss_mb": tree[-1],
                    }
                )
                if loop == "package":
                    entry["worker_rss_mb_metric_per_epoch"] = [s.get("worker_rss_mb_metric") for s in r["samples"]]
            result["runs"][name] = entry
            C.log(f"{name}: {entry}")
    result["verdict"] = {k: v.get("verdict", v.get("error")) for k, v in result["runs"].items()}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


if __name__ == "__main__":
    C.emit(main())
