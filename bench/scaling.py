"""Training throughput (images/s): 1 vs 2 Ray Train workers on the same cores; GPU mode: shards vs
an in-memory ceiling with fp32 / bf16 / bf16 + channels_last.

CPU mode (default)::

    python bench/scaling.py                      # digits-ood (8x8 gray), 5 epochs
    python bench/scaling.py --n 4000             # + a synthetic CIFAR-sized set (32x32 RGB shards)
    python bench/scaling.py --n 512 --epochs 1 --skip-digits --precision bf16   # bf16 path check

Each data set is trained with ``ood_ray.train.run_training`` (Ray Train + MLflow in a temp sqlite
file) as 1 worker x ``cpus_per_worker=C`` and as 2 workers x ``C/2`` (``--cpus``, default all
cores; Ray is started with exactly that many CPUs), with the same global batch, epochs and seed.
``--local`` adds a no-Ray reference (``train_local``, one process with C threads). Images/s =
sum(``train_images``) / sum(``train_time_s``) over the epochs (MLflow's per-epoch history); with
3+ epochs epoch 1 is left out as warm-up. Reported per layout: images/s, per-epoch figures, the
final ``val_acc``/``val_auroc`` (sanity: both layouts must learn), and the ratio 2w/1w.
Expectation here: on one 2-core machine two workers do not add compute, they split it, and pay
DDP's gradient all-reduce (gloo) every step, so the ratio is <= 1; it shows what data parallelism
costs, not what it gains (that needs more nodes or GPUs).

GPU mode (``--gpu``; for a machine with a GPU, about 5 minutes on one H100)::

    python bench/scaling.py --gpu                # ResNet-18, 20k synthetic 32x32 RGB, 3 epochs

ResNet-18 (``--backbone``) on CIFAR-sized synthetic shards, one Ray Train worker with
``use_gpu=True``, for each of ``fp32``, ``bf16`` and ``bf16 + channels_last`` (the ``precision``
and ``channels_last`` fields of TrainConfig): images/s from the shards (the project's data path:
tar reading, PNG decoding, augmentation, ``loader_workers`` processes) against an in-memory
ceiling: the same model, optimizer and ``method.training_step``, fed from the training set
preloaded as a uint8 tensor on the GPU (random crop + flip done on the GPU), timed with CUDA
synchronisation. shards/ceiling says how much of the GPU the data path leaves unused.
``--runner local`` uses ``train_local`` on the GPU instead of Ray Train.

Prints ONE JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import capture_stdout, emit  # noqa: E402
from _common import log as _common_log  # noqa: E402


def log(msg: str) -> None:
    _common_log(msg, "scaling")


# ---------------------------------------------------------------------------------------------
# synthetic CIFAR-sized benchmark (learnable: class templates + noise; OOD: pixel noise)


def synthetic_images(n: int, num_classes: int, rng: np.random.Generator, templates: np.ndarray, size: int = 32, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, num_classes, n)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for s in range(0, n, block):
        m = min(block, n - s)
        coarse = rng.uniform(-60, 60, (m, 4, 4, 3)).astype(np.float32)  # smooth per-image variation
        smooth = coarse.repeat(size // 4, 1).repeat(size // 4, 2)
        img = templates[labels[s : s + m]] + smooth + rng.normal(0, 12, (m, size, size, 3)).astype(np.float32)
        out[s : s + m] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, labels


def write_synthetic(root: Path, n: int, encoding: str = "png", seed: int = 0, num_classes: int = 10) -> Path:
    """train (n) / val (n/5) / test (n/5) 32x32 RGB + ood-val/ood-test noise (n/10): benchmark.json."""
    from ood_ray.data.manifest import OOD_LABEL
    from ood_ray.data.writer import write_array_shards

    out = root / f"synthetic-cifar-n{n}-{encoding}-s{seed}"
    spec_path = out / "benchmark.json"
    if spec_path.exists():
        return spec_path
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    base = rng.uniform(30, 225, (num_classes, 4, 4, 3)).astype(np.float32)
    templates = base.repeat(8, 1).repeat(8, 2)  # 32x32 colour patterns, one per class
    classes = [str(i) for i in range(num_classes)]
    spec: dict = {"name": out.name, "outlier": None, "ood_val": {}, "ood_test": {}}
    sizes = {"train": n, "val": max(n // 5, 64), "test": max(n // 5, 64)}
    for role, count in sizes.items():
        images, labels = synthetic_images(count, num_classes, rng, templates)
        write_array_shards(images, labels, out / role, name=role, role=role, class_names=classes, encoding=encoding, maxcount=max(64, count // 16), key_prefix=f"{role}-", progress=False)
        spec[role] = f"{role}/manifest.json"
    for role, key in (("ood-val", "ood_val"), ("ood-test", "ood_test")):
        count = max(n // 10, 64)
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        sub = f"{role}-noise"
        write_array_shards(images, np.full(count, OOD_LABEL), out / sub, name=sub, role=role, group="far", encoding=encoding, maxcount=max(64, count // 4), key_prefix=f"{sub}-", progress=False)
        spec[key]["noise"] = f"{sub}/manifest.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    log(f"wrote synthetic CIFAR-sized set ({n} train, {encoding}) to {out} in {time.perf_counter() - t0:.1f}s")
    return spec_path


# ---------------------------------------------------------------------------------------------
# one training run -> images/s


def throughput(epochs: list[dict]) -> dict:
    """images/s over the epochs, leaving epoch 1 out as warm-up when there are 3 or more."""
    counted = epochs[1:] if len(epochs) >= 3 else epochs
    images = sum(e["train_images"] for e in counted)
    secs = sum(e["train_time_s"] for e in counted)
    return {"images_per_s": round(images / secs, 1) if secs else None, "epochs_counted": [e["epoch"] for e in counted]}


def run_ray(cfg) -> dict:
    """``run_training`` (Ray Train); per-epoch metrics from the MLflow run's history."""
    from mlflow.tracking import MlflowClient

    from ood_ray.train import run_training

    out = run_training(cfg)
    client = MlflowClient(cfg.mlflow_uri)
    hist = {k: {m.step: m.value for m in client.get_metric_history(out.run_id, k)} for k in ("train_time_s", "train_images", "train_loss")}
    epochs = [{"epoch": e, "train_time_s": hist["train_time_s"][e], "train_images": int(hist["train_images"][e]), "train_loss": hist["train_loss"].get(e)} for e in sorted(hist["train_time_s"])]
    return {"epochs": epochs, "final": out.metrics, "wall_s": round(out.wall_time_s, 1)}


def run_local(cfg, root: Path, device: str = "cpu") -> dict:
    from ood_ray.train import train_local

    t0 = time.perf_counter()
    reports = train_local(cfg, root, device=device)
    epochs = [{k: r[k] for k in ("epoch", "train_time_s", "train_images", "train_loss")} for r in reports]
    return {"epochs": epochs, "final": reports[-1], "wall_s": round(time.perf_counter() - t0, 1)}


def summarize(name: str, res: dict, **extra) -> dict:
    f = res["final"]
    return {
        "layout": name,
        **extra,
        **throughput(res["epochs"]),
        "per_epoch": [{"epoch": e["epoch"], "images_per_s": round(e["train_images"] / e["train_time_s"], 1), "train_time_s": round(e["train_time_s"], 2), "train_loss": e.get("train_loss")} for e in res["epochs"]],
        "val_acc": f.get("val_acc"),
        "val_auroc": f.get("val_auroc"),
        "wall_s": res["wall_s"],
    }


def base_config(args, data: str, tmp: Path, **kw):
    from ood_ray.config import TrainConfig

    d = {
        "data": data,
        "method": args.method,
        "backbone": args.backbone,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "loader_workers": args.loader_workers,
        "evaluate_test": False,
        "seed": args.seed,
        "storage_path": str(tmp / "ray"),
        "mlflow_uri": f"sqlite:///{tmp}/mlflow.db",
        "experiment": "scaling",
    }
    d.update(kw)
    return TrainConfig.from_dict(d)


def cpu_mode(args, tmp: Path) -> dict:
    import ray

    from ood_ray.data.default import ensure_default

    sets = [] if args.skip_digits else [("digits-ood", str(ensure_default()), {})]
    if args.n:
        sets.append((f"synthetic-cifar-{args.n}", str(write_synthetic(Path(args.data_dir or tmp), args.n, args.encoding, args.seed)), {"hflip": True}))
    if not sets:
        raise SystemExit("nothing to run: --skip-digits without --n")
    cpus = args.cpus
    ray.init(num_cpus=cpus, log_to_driver=True)
    results = {}
    for label, data, extra in sets:
        rows = []
        for workers in (1, 2):
            cfg = base_config(args, data, tmp, num_workers=workers, cpus_per_worker=cpus / workers, use_gpu=False, run_name=f"{label}-{workers}w", **extra)
            log(f"{label}: {workers} worker(s) x {cpus / workers:g} CPUs, global batch {args.batch_size}, {args.epochs} epochs, {args.precision}{' channels_last' if args.channels_last else ''}")
            rows.append(summarize(f"{workers}w x {cpus / workers:g}cpu", run_ray(cfg), workers=workers, cpus_per_worker=cpus / workers))
            log(f"  {rows[-1]['images_per_s']} images/s, val_acc {rows[-1]['val_acc']}, val_auroc {rows[-1]['val_auroc']}")
        entry = {"ray_1_worker": rows[0], "ray_2_workers": rows[1], "ratio_2w_over_1w": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3)}
        if args.local:
            cfg = base_config(args, data, tmp, num_workers=1, cpus_per_worker=float(cpus), **extra)
            log(f"{label}: no-Ray reference (train_local, {cpus} threads)")
            entry["local_no_ray"] = summarize("local (no Ray)", run_local(cfg, tmp / f"local-{label}"), workers=1, cpus_per_worker=cpus)
        results[label] = entry
    ray.shutdown()
    return results


# ---------------------------------------------------------------------------------------------
# GPU mode


def gpu_augment(x, pad: int, hflip: bool, gen):
    """Random crop after zero padding + horizontal flip of a uint8 N x C x H x W batch, on its device."""
    import torch

    n, _, h, w = x.shape
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=gen)
        rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        x = xp[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def ceiling(cfg, device: str, steps: int, warmup: int, max_seconds: float) -> dict:
    """The training step of train_loop fed from a preloaded uint8 tensor on ``device``."""
    import torch

    from ood_ray.data.manifest import Benchmark
    from ood_ray.data.streams import eval_batches
    from ood_ray.evaluate import normalize
    from ood_ray.methods import get_method
    from ood_ray.train import build_model, make_optimizer

    bench = Benchmark.load(cfg.data)
    xs, ys = [], []
    for x, y, _ in eval_batches(bench.train, 0, 1, 2048):
        xs.append(x)
        ys.append(y)
    data, labels = torch.cat(xs).to(device), torch.cat(ys).to(device)
    method = get_method(cfg.method, cfg.method_params)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, method, bench)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).train()
    opt = make_optimizer(cfg, model)
    state = method.initial_state()
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bs = cfg.per_worker_batch
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        idx = torch.randint(0, data.shape[0], (bs,), device=device, generator=gen)
        x = gpu_augment(data[idx], cfg.augment_pad, cfg.hflip, gen)
        x = normalize(x, device).contiguous(memory_format=fmt)
        with autocast:
            res = method.training_step(model, x, labels[idx], None, state)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        return res.loss

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    done = 0
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
        log("WARNING: no GPU: running the GPU mode's code on the CPU (a code-path check; the figures mean nothing)")
    data = str(write_synthetic(Path(args.data_dir or tmp), args.n, args.encoding, args.seed))
    variants = [("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+channels_last", "bf16", True)]
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants.split(",")]
    use_ray = args.runner == "ray"
    if use_ray:
        import ray

        ray.init(log_to_driver=True, **({"num_gpus": 0} if device == "cpu" else {}))
    rows = {}
    for name, precision, cl in variants:
        cfg = base_config(args, data, tmp, num_workers=1, cpus_per_worker=float(args.cpus), use_gpu=device != "cpu", precision=precision, channels_last=cl, hflip=True, run_name=f"gpu-{name}")
        log(f"{name}: shards ({args.runner}), {args.backbone}, batch {args.batch_size}, {args.epochs} epochs, loader_workers {args.loader_workers}")
        res = run_ray(cfg) if use_ray else run_local(cfg, tmp / f"gpu-{name}", device=device)
        shards = summarize(f"shards ({args.runner})", res)
        log(f"  shards: {shards['images_per_s']} images/s; in-memory ceiling ...")
        ceil = ceiling(cfg, device, steps=args.ceiling_steps, warmup=args.ceiling_warmup, max_seconds=args.ceiling_seconds)
        log(f"  ceiling: {ceil['images_per_s']} images/s")
        rows[name] = {"shards": shards, "in_memory_ceiling": ceil, "shards_over_ceiling": round(shards["images_per_s"] / ceil["images_per_s"], 3)}
    if use_ray:
        ray.shutdown()
    out = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "variants": rows}
    if "fp32" in rows:
        out["speedup_vs_fp32"] = {k: {"shards": round(v["shards"]["images_per_s"] / rows["fp32"]["shards"]["images_per_s"], 3), "ceiling": round(v["in_memory_ceiling"]["images_per_s"] / rows["fp32"]["in_memory_ceiling"]["images_per_s"], 3)} for k, v in rows.items()}
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU mode: ResNet-18 on synthetic shards vs an in-memory ceiling, fp32 / bf16 / bf16+channels_last")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5 on CPU, 3 in GPU mode; with 3+ epoch 1 is left out as warm-up)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 64 on CPU, 256 in GPU mode)")
    p.add_argument("--n", type=int, default=None, help="training images of the synthetic CIFAR-sized set (CPU default 0 = none; GPU default 20000)")
    p.add_argument("--encoding", default="png", choices=("png", "raw"), help="shard encoding of the synthetic set (default png)")
    p.add_argument("--data-dir", help="where to write (and reuse) the synthetic set (default: the temp folder)")
    p.add_argument("--skip-digits", action="store_true", help="CPU mode: only the synthetic set")
    p.add_argument("--backbone", default=None, help="backbone (default small_cnn on CPU, resnet18 in GPU mode)")
    p.add_argument("--method", default="softmax", help="method (default softmax)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="CPU mode: autocast precision (default fp32)")
    p.add_argument("--channels-last", action="store_true", help="CPU mode: channels_last memory format")
    p.add_argument("--cpus", type=int, default=None, help="CPU mode: cores shared by the layouts (default all); GPU mode: cpus_per_worker (default all)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes per worker (default 0 on CPU, 6 in GPU mode)")
    p.add_argument("--local", action="store_true", help="CPU mode: add a no-Ray reference run (train_local)")
    p.add_argument("--runner", default="ray", choices=("ray", "local"), help="GPU mode: shards through run_training (ray) or train_local (local)")
    p.add_argument("--variants", help="GPU mode: comma list of fp32,bf16,bf16+channels_last (default all)")
    p.add_argument("--device", help="GPU mode: device (default cuda when available; 'cpu' runs the code path on the CPU)")
    p.add_argument("--ceiling-steps", type=int, default=300, help="GPU mode: timed steps of the in-memory ceiling (default 300)")
    p.add_argument("--ceiling-warmup", type=int, default=30, help="GPU mode: untimed warm-up steps (default 30)")
    p.add_argument("--ceiling-seconds", type=float, default=30.0, help="GPU mode: at most this long timing the ceiling (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp folder, removed)")
    args = p.parse_args(argv)
    gpu = args.gpu
    args.epochs = args.epochs or (3 if gpu else 5)
    args.batch_size = args.batch_size or (256 if gpu else 64)
    args.n = args.n if args.n is not None else (20000 if gpu else 0)
    args.backbone = args.backbone or ("resnet18" if gpu else "small_cnn")
    args.loader_workers = args.loader_workers if args.loader_workers is not None else (6 if gpu else 0)
    args.cpus = args.cpus or os.cpu_count()
    if gpu and not args.n:
        p.error("--gpu needs a synthetic set (--n > 0)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    capture_stdout()
    ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="scaling-")
    with ctx as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        import torch

        info = {"cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
        settings = {k: v for k, v in vars(args).items() if k not in ("keep", "data_dir")}
        if args.gpu:
            result = {"mode": "gpu", "settings": settings, "machine": info, **gpu_mode(args, tmp)}
        else:
            result = {"mode": "cpu", "settings": settings, "machine": info, "results": cpu_mode(args, tmp)}
        result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        return result


if __name__ == "__main__":
    emit(main())
