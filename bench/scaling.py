"""Training images/s: 1 vs 2 Ray Train workers on the same cores; ``--gpu``: shards vs an in-memory
ceiling on a GPU, fp32 / bf16 / bf16 + channels_last.

    python bench/scaling.py                          # digits-ood, 5 epochs, 1 vs 2 workers
    python bench/scaling.py --skip-digits --n 2000 --epochs 3     # synthetic 32x32 RGB shards
    python bench/scaling.py --gpu                    # ResNet-18, 20k synthetic images, 3 epochs

CPU mode: each set is trained with ``ood_ray.train.run_training`` (Ray Train, MLflow in a temp
sqlite file) as 1 worker x C CPUs and as 2 workers x C/2 (``--cpus``, default all; Ray gets
exactly C), same global batch, epochs and seed; ``--local`` adds ``ood_ray.engine.train_local``
(no Ray). Images/s = sum(train_images) / sum(train_time_s) over the epochs, epoch 1 left out as
warm-up with 3+ epochs; val_acc / val_auroc show that both layouts learn.

GPU mode: one worker with the GPU (``run_training``, or ``train_local`` with ``--runner local``)
for each precision variant, from the shards (tar reading, PNG decoding, augmentation in
``--loader-workers`` processes) against an in-memory ceiling: the same model, optimizer and
``ood_ray.engine.train_step`` fed from the train set preloaded as a uint8 tensor on the GPU
(crop + flip on the GPU), timed with CUDA synchronisation. shards/ceiling is the share of the
GPU the data path keeps busy. ``--device cpu`` runs the GPU mode's code on the CPU (a check).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def log(msg: str) -> None:
    C.log(msg, "scaling")


def summarize(epochs: list[dict], final: dict, wall: float, **extra) -> dict:
    counted = epochs[1:] if len(epochs) >= 3 else epochs
    secs = sum(e["train_time_s"] for e in counted)
    return {
        **extra,
        "images_per_s": round(sum(e["train_images"] for e in counted) / secs, 1) if secs else None,
        "epochs_counted": [e["epoch"] for e in counted],
        "per_epoch_images_per_s": [round(e["train_images"] / e["train_time_s"], 1) for e in epochs],
        "val_acc": final.get("val_acc"),
        "val_auroc": final.get("val_auroc"),
        "wall_s": round(wall, 1),
    }


def run(cfg, tmp: Path, local: bool, device: str = "cpu", **extra) -> dict:
    """One training run (``run_training``, or ``train_local`` when ``local``), summarized."""
    t0 = time.perf_counter()
    if local:
        from ood_ray.engine import train_local

        reports = train_local(cfg, tmp / f"local-{cfg.run_name}", device=device)
        return summarize(reports, reports[-1], time.perf_counter() - t0, **extra)
    from mlflow.tracking import MlflowClient

    from ood_ray.train import run_training

    out = run_training(cfg)
    client = MlflowClient(cfg.mlflow_uri)
    hist = {k: {m.step: m.value for m in client.get_metric_history(out.run_id, k)} for k in ("train_time_s", "train_images")}
    epochs = [{"epoch": e, "train_time_s": t, "train_images": hist["train_images"][e]} for e, t in sorted(hist["train_time_s"].items())]
    return summarize(epochs, out.metrics, out.wall_time_s, **extra)


def config(args, data: str, tmp: Path, **kw):
    from ood_ray.config import TrainConfig

    d = {
        "data": data, "method": args.method, "backbone": args.backbone, "epochs": args.epochs,
        "batch_size": args.batch_size, "precision": args.precision, "channels_last": args.channels_last,
        "loader_workers": args.loader_workers, "evaluate_test": False, "seed": args.seed,
        "storage_path": str(tmp / "ray"), "mlflow_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "scaling",
    }  # fmt: skip
    return TrainConfig.from_dict({**d, **kw})


def cpu_mode(args, tmp: Path) -> dict:
    import ray

    from ood_ray.data.default import ensure_default

    sets = [] if args.skip_digits else [("digits-ood", str(ensure_default()), {})]
    if args.n:
        sets.append((f"synthetic-{args.n}", str(C.synthetic_benchmark(args.data_dir or tmp, args.n, args.encoding, args.seed)), {"hflip": True}))
    if not sets:
        raise SystemExit("nothing to run: --skip-digits without --n")
    ray.init(num_cpus=args.cpus, log_to_driver=True)
    results = {}
    for label, data, extra in sets:
        rows = {}
        for w in (1, 2):
            cfg = config(args, data, tmp, num_workers=w, cpus_per_worker=args.cpus / w, use_gpu=False, run_name=f"{label}-{w}w", **extra)
            log(f"{label}: {w} worker(s) x {args.cpus / w:g} CPUs, global batch {args.batch_size}, {args.epochs} epochs")
            rows[w] = run(cfg, tmp, False, workers=w, cpus_per_worker=args.cpus / w)
            log(f"  {rows[w]['images_per_s']} images/s, val_acc {rows[w]['val_acc']}")
        entry = {"ray_1_worker": rows[1], "ray_2_workers": rows[2], "ratio_2w_over_1w": round(rows[2]["images_per_s"] / rows[1]["images_per_s"], 3)}
        if args.local:
            cfg = config(args, data, tmp, num_workers=1, cpus_per_worker=float(args.cpus), run_name=f"{label}-local", **extra)
            entry["local_no_ray"] = run(cfg, tmp, True, workers=1, cpus_per_worker=args.cpus)
            entry["ratio_ray_1w_over_local"] = round(rows[1]["images_per_s"] / entry["local_no_ray"]["images_per_s"], 3)
        results[label] = entry
    ray.shutdown()
    return results


def ceiling(cfg, device: str, steps: int, warmup: int, max_seconds: float) -> dict:
    """``train_step`` fed from the train set preloaded as a uint8 tensor on ``device``."""
    import torch

    from ood_ray.data.manifest import Benchmark

    bench = Benchmark.load(cfg.data)
    X, Y = (t.to(device) for t in C.load_in_memory(bench.train))
    stepper = C.Stepper(cfg, bench, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bs = cfg.per_worker_batch
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        idx = torch.randint(0, len(Y), (bs,), device=device, generator=gen)
        return stepper.step(C.augment_batch(X[idx], gen, cfg.augment_pad, cfg.hflip), Y[idx]).loss

    for _ in range(warmup):
        step()
    sync()
    t0, done = time.perf_counter(), 0
    while done < steps and time.perf_counter() - t0 < max_seconds:
        loss = step()
        done += 1
    sync()
    secs = time.perf_counter() - t0
    return {"images_per_s": round(done * bs / secs, 1), "steps": done, "batch": bs, "seconds": round(secs, 2), "last_loss": float(loss.item())}


def gpu_mode(args, tmp: Path) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        log("WARNING: no GPU: the GPU mode's code runs on the CPU (a code-path check; the figures mean nothing)")
    data = str(C.synthetic_benchmark(args.data_dir or tmp, args.n, args.encoding, args.seed))
    variants = [("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+channels_last", "bf16", True)]
    variants = [v for v in variants if not args.variants or v[0] in args.variants.split(",")]
    local = args.runner == "local"
    if not local:
        import ray

        ray.init(log_to_driver=True, **({"num_gpus": 0} if device == "cpu" else {}))
    rows = {}
    for name, precision, cl in variants:
        cfg = config(args, data, tmp, num_workers=1, cpus_per_worker=float(args.cpus), use_gpu=device != "cpu", precision=precision, channels_last=cl, hflip=True, run_name=f"gpu-{name}")
        log(f"{name}: shards ({args.runner}), {args.backbone}, batch {args.batch_size}, {args.epochs} epochs, loader_workers {args.loader_workers}")
        shards = run(cfg, tmp, local, device)
        ceil = ceiling(cfg, device, args.ceiling_steps, args.ceiling_warmup, args.ceiling_seconds)
        log(f"  shards {shards['images_per_s']} images/s, ceiling {ceil['images_per_s']} images/s")
        rows[name] = {"shards": shards, "in_memory_ceiling": ceil, "shards_over_ceiling": round(shards["images_per_s"] / ceil["images_per_s"], 3)}
    if not local:
        ray.shutdown()
    out = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "variants": rows}
    if "fp32" in rows:
        f = rows["fp32"]
        out["speedup_vs_fp32"] = {k: {"shards": round(v["shards"]["images_per_s"] / f["shards"]["images_per_s"], 3), "ceiling": round(v["in_memory_ceiling"]["images_per_s"] / f["in_memory_ceiling"]["images_per_s"], 3)} for k, v in rows.items()}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU mode: ResNet-18 on synthetic shards vs an in-memory ceiling, fp32 / bf16 / bf16+channels_last")
    p.add_argument("--epochs", type=int, help="epochs per run (default 5 on CPU, 3 in GPU mode)")
    p.add_argument("--batch-size", type=int, help="global batch (default 64 on CPU, 256 in GPU mode)")
    p.add_argument("--n", type=int, help="synthetic 32x32 RGB train images (default 0 = none on CPU, 20000 in GPU mode)")
    p.add_argument("--encoding", default="png", choices=("png", "raw"))
    p.add_argument("--data-dir", help="where to write (and reuse) the synthetic set (default: the temp folder)")
    p.add_argument("--skip-digits", action="store_true", help="CPU mode: only the synthetic set")
    p.add_argument("--backbone", help="default small_cnn on CPU, resnet18 in GPU mode")
    p.add_argument("--method", default="softmax")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="CPU mode: autocast precision")
    p.add_argument("--channels-last", action="store_true", help="CPU mode: channels_last memory format")
    p.add_argument("--cpus", type=int, help="CPU mode: cores shared by the layouts; GPU mode: cpus_per_worker (default all)")
    p.add_argument("--loader-workers", type=int, help="loader processes per worker (default 0 on CPU, 6 in GPU mode)")
    p.add_argument("--local", action="store_true", help="CPU mode: add a no-Ray run (train_local)")
    p.add_argument("--runner", default="ray", choices=("ray", "local"), help="GPU mode: run_training (ray) or train_local (local)")
    p.add_argument("--variants", help="GPU mode: comma list of fp32,bf16,bf16+channels_last (default all)")
    p.add_argument("--device", help="GPU mode: device (default cuda when available)")
    p.add_argument("--ceiling-steps", type=int, default=300)
    p.add_argument("--ceiling-warmup", type=int, default=30)
    p.add_argument("--ceiling-seconds", type=float, default=30.0, help="at most this long timing the ceiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp folder, removed)")
    a = p.parse_args(argv)
    a.epochs = a.epochs or (3 if a.gpu else 5)
    a.batch_size = a.batch_size or (256 if a.gpu else 64)
    a.n = a.n if a.n is not None else (20000 if a.gpu else 0)
    a.backbone = a.backbone or ("resnet18" if a.gpu else "small_cnn")
    a.loader_workers = a.loader_workers if a.loader_workers is not None else (6 if a.gpu else 0)
    a.cpus = a.cpus or os.cpu_count()
    if a.gpu and not a.n:
        p.error("--gpu needs a synthetic set (--n > 0)")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    C.capture_stdout()
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="scaling-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        out = {"mode": "gpu" if args.gpu else "cpu", "settings": {k: v for k, v in vars(args).items() if k not in ("keep", "data_dir")}, "machine": C.machine_info()}
        out.update(gpu_mode(args, tmp) if args.gpu else {"results": cpu_mode(args, tmp)})
        out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        return out


if __name__ == "__main__":
    C.emit(main())
