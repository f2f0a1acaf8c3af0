"""cifar10-real on one GPU: ResNet-18 trained with MSP (softmax) and Outlier Exposure at OpenOOD's
recipe, cut to a time budget.

    bash bench/gpu_cifar10.sh                       # build the benchmark, then this script
    python bench/gpu_cifar10.py --data DIR/benchmark.json --budget 420

OpenOOD v1.5's CIFAR-10 recipe: ResNet-18, 100 epochs, SGD lr 0.1 Nesterov momentum 0.9, weight
decay 5e-4, cosine, batch 128, random crop (pad 4) + horizontal flip; here with bf16 autocast and
channels-last. First a probe times ``--probe-steps`` training steps of each method on the real
stream (``bench/_common.Stepper``, the package's step), which gives img/s and the epoch time of
each; the number of epochs is then the largest that fits both runs in ``--budget`` seconds (at
most 100), and both are trained with it by ``ood_ray.train.run_training`` (Ray Train, one GPU
worker), while ``nvidia-smi`` samples the GPU's utilisation every second. Prints one JSON object:
img/s and epoch time (probe and measured), the epochs run, mean/max GPU utilisation, test
accuracy and near/far AUROC/FPR95 of each method.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OPENOOD = dict(backbone="resnet18", batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", augment_pad=4, hflip=True, precision="bf16", channels_last=True)
METHODS = ("softmax", "outlier_exposure")
MAX_EPOCHS = 100


class GpuSampler:
    """``nvidia-smi`` utilisation (%) once a second in a thread, while running."""

    def __init__(self):
        self.values: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.values.append(float(out.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        if not self.values:
            return {"samples": 0}
        return {"samples": len(self.values), "mean_pct": round(sum(self.values) / len(self.values), 1), "max_pct": max(self.values)}


def probe(cfg, bench, steps: int, device: str) -> float:
    """img/s (ID images) of ``steps`` training steps on the real stream, after 5 warm-up steps."""
    from ood_ray.data.streams import outlier_batches, train_batches

    stepper = C.Stepper(cfg, bench, device=device)
    out_bs = stepper.method.outlier_batch(cfg.batch_size) if stepper.method.needs_outliers else 0
    ids = train_batches(bench.train, 0, 1, cfg.batch_size, 0, seed=cfg.seed, augment_pad=cfg.augment_pad, hflip=cfg.hflip, loader_workers=cfg.loader_workers)
    outs = outlier_batches(bench.outlier, 0, 1, out_bs, augment_pad=cfg.augment_pad, hflip=cfg.hflip, loader_workers=cfg.loader_workers) if out_bs else None
    t0 = None
    for i in range(5 + steps):
        if i == 5:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y, _ = next(ids)
        stepper.step(x, y, next(outs)[0] if outs is not None else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="benchmark.json of a built cifar10-real")
    p.add_argument("--budget", type=float, default=420, help="seconds of training for both methods together (default 420)")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--loader-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    p.add_argument("--epochs", type=int, help="run this many epochs instead of what fits the budget")
    p.add_argument("--probe-only", action="store_true", help="print the probe and the epoch plan, train nothing")
    args = p.parse_args(argv)
    from ood_ray.config import TrainConfig
    from ood_ray.data.manifest import Benchmark

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench = Benchmark.load(args.data)
    n = bench.train.num_samples
    out = {"bench": "gpu_cifar10", "machine": C.machine_info(), "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "recipe": OPENOOD, "train_images": n, "methods": {}}
    t0 = time.perf_counter()
    epoch_s = {}
    for method in METHODS:
        cfg = TrainConfig(method=method, data=args.data, num_workers=1, loader_workers=args.loader_workers, **OPENOOD)
        img_s = probe(cfg, bench, args.probe_steps, device)
        epoch_s[method] = n / img_s
        out["methods"][method] = {"probe_img_s": round(img_s, 1), "probe_epoch_s": round(epoch_s[method], 1)}
        C.log(f"probe {method}: {img_s:.0f} img/s, {epoch_s[method]:.1f} s per epoch of {n}")
    epochs = args.epochs or max(1, min(MAX_EPOCHS, math.floor(args.budget / sum(epoch_s.values()))))
    out["epochs"] = epochs
    out["epochs_note"] = f"{epochs} of OpenOOD's {MAX_EPOCHS} epochs" + ("" if epochs == MAX_EPOCHS else f" (what fits {args.budget:.0f} s)")
    C.log(f"training {epochs} epochs per method ({out['epochs_note']})")
    if args.probe_only:
        return out
    from ood_ray import metric_names as names
    from ood_ray.train import run_training

    results = Path(tempfile.mkdtemp(prefix="ood_ray_gpu_"))
    try:
        for method in METHODS:
            cfg = TrainConfig(method=method, data=args.data, epochs=epochs, num_workers=1, use_gpu=device == "cuda", cpus_per_worker=max(1, args.loader_workers),
                              loader_workers=args.loader_workers, mlflow_uri=f"sqlite:///{results}/mlflow.db", storage_path=str(results / "ray"), **OPENOOD)  # fmt: skip
            with GpuSampler() as gpu:
                o = run_training(cfg)
            m = o.metrics
            r = out["methods"][method]
            r.update({
                "wall_s": round(o.wall_time_s, 1),
                "train_s_per_epoch": round(m.get("train_time_s", float("nan")), 1),
                "img_s": round(n / m["train_time_s"], 1) if m.get("train_time_s") else None,
                "gpu_utilisation": gpu.summary(),
                "test_acc": round(m[names.id_key("test", "acc")], 4),
                **{f"{g}_{k}": round(m[names.mean_key("test", k, g)], 4) for g in ("near", "far") for k in ("auroc", "fpr95")},
            })  # fmt: skip
            C.log(f"{method}: {r}")
    finally:
        shutil.rmtree(results, ignore_errors=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    C.capture_stdout()
    C.emit(main())
