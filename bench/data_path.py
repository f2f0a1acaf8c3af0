"""Training-step images/s fed from shards by the package's stream vs from memory (the ceiling).

    python bench/data_path.py                              # digits + CIFAR-sized PNG and raw
    python bench/data_path.py --cases digits --digits-steps 66 --repeats 1

Per case, the same model, method (softmax), optimizer and schedule (``ood_ray.engine.build``) and
the same step (``ood_ray.engine.train_step``, batches prepared as ``train_loop`` prepares them),
each source starting from the same weights:

* ``memory``: the ceiling. The set decoded once into a uint8 N×C×H×W tensor; per epoch a seeded
  permutation, ``X[idx]`` per batch, the same augmentation vectorized on the batch;
* ``lw<N>``: ``ood_ray.data.streams.train_batches`` with ``loader_workers`` N (as ``train_loop``
  calls it: with N > 0 the next epoch's stream starts after the current epoch's first batch).

Cases: ``digits`` (the embedded train split, 8×8 gray PNG, batch 32, crop pad 1),
``cifar-png`` / ``cifar-raw`` (``--n`` synthetic 32×32 RGB images, batch 128, crop pad 4 + flip) and
``cifar10-real`` (the train split of a built cifar10-real benchmark, ``--real-data``: 50,000 real
JPEGs stored as they are, batch 128, crop pad 4 + flip).
A fixed number of steps after a warm-up, crossing epoch boundaries; sources interleaved over
``--repeats`` rounds, medians reported. ``cpu_ratio`` (in-memory CPU per image / shards CPU per
image, loader workers included) is much less sensitive to other load than the wall ratio.
Target: shards >= 0.9 x in-memory images/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.9
CASES = ("digits", "cifar-png", "cifar-raw", "cifar10-real")


def memory_source(X, Y, bs: int, pad: int, hflip: bool, seed: int):
    def epoch_batches(epoch: int):
        gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
        perm = torch.randperm(len(Y), generator=gen)
        for i in range(len(Y) // bs):
            idx = perm[i * bs : (i + 1) * bs]
            yield C.augment_batch(X[idx], gen, pad, hflip), Y[idx]

    return epoch_batches


def shard_source(cfg, manifest, lw: int):
    from ood_ray.data.streams import train_batches

    def epoch_batches(epoch: int):
        it = train_batches(manifest, 0, 1, cfg.batch_size, epoch, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, augment_pad=cfg.augment_pad, hflip=cfg.hflip, loader_workers=lw)
        return ((x, y) for x, y, _ in it)

    return epoch_batches


def epochs_chain(source, early: bool):
    """Epochs 0, 1, ... back to back; with ``early`` each next epoch's stream is created right after
    the current epoch's first batch."""
    nxt = source(0)
    for e in itertools.count(1):
        cur, nxt = nxt, None
        if early:
            first = next(cur, None)
            nxt = source(e)
            if first is not None:
                yield first
        yield from cur
        nxt = nxt or source(e)


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def measure(cfg, bench, source, warmup: int, steps: int, early: bool) -> dict:
    stepper = C.Stepper(cfg, bench)
    stream = epochs_chain(source, early)
    try:
        for _ in range(warmup):
            stepper.step(*next(stream))
        wait = 0.0
        t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
        for _ in range(steps):
            t = time.perf_counter()
            x, y = next(stream)
            wait += time.perf_counter() - t
            stepper.step(x, y)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        stream.close()  # ends (and reaps) the loader workers before their CPU time is read
    n = steps * cfg.batch_size
    return {"img_s": n / wall, "data_wait_frac": wait / wall, "cpu_ms_per_img": 1e3 * (cpu + children_cpu() - k0) / n}


def encoded_bytes_per_image(manifest, limit: int = 2000) -> float:
    from ood_ray.data.streams import plan_epoch, read_shard

    sizes = (len(s[manifest.encoding]) for t in plan_epoch(manifest, 0, 1, shuffle=False) for s in read_shard(t))
    got = list(itertools.islice(sizes, limit))
    return sum(got) / max(len(got), 1)


def run_case(name: str, args) -> dict:
    from ood_ray.config import TrainConfig
    from ood_ray.data.manifest import Benchmark
    from ood_ray.engine.build import load_benchmark

    digits = name == "digits"
    bs, steps, warmup, repeats = (args.digits_batch, args.digits_steps, args.digits_warmup, args.repeats) if digits else (args.cifar_batch, args.cifar_steps, args.cifar_warmup, args.cifar_repeats)
    pad, hflip = (0, False) if args.augment == "none" else ((1, False) if digits else (4, True))
    if name == "cifar10-real":
        if not args.real_data:
            raise SystemExit("case cifar10-real needs --real-data BENCH (ood-ray data build --spec benchmarks/cifar10-real.yaml ...)")
        data = args.real_data
    else:
        data = None if digits else str(C.synthetic_benchmark(args.data_dir, args.n, name.split("-")[1], args.seed, args.maxcount))
    cfg = TrainConfig(data=data, backbone=args.backbone, batch_size=bs, num_workers=1, augment_pad=pad, hflip=hflip, seed=args.seed, cpus_per_worker=args.threads)
    bench = load_benchmark(cfg) if digits else Benchmark.load(data)
    m = bench.train
    X, Y = C.load_in_memory(m)
    sources = {"memory": (memory_source(X, Y, bs, pad, hflip, args.seed), False)}
    sources.update({f"lw{lw}": (shard_source(cfg, m, lw), lw > 0) for lw in args.loader_workers})
    runs: dict[str, list[dict]] = {k: [] for k in sources}
    for r in range(repeats):
        for k, (src, early) in sources.items():
            runs[k].append(measure(cfg, bench, src, warmup, steps, early))
            C.log(f"{name} round {r + 1}/{repeats} {k}: {runs[k][-1]['img_s']:.1f} img/s, {runs[k][-1]['cpu_ms_per_img']:.3f} cpu ms/img")
    summary = {
        k: {
            "img_s": round(statistics.median(x["img_s"] for x in rs), 1),
            "img_s_all": [round(x["img_s"], 1) for x in rs],
            "data_wait_frac": round(statistics.median(x["data_wait_frac"] for x in rs), 3),
            "cpu_ms_per_img": round(min(x["cpu_ms_per_img"] for x in rs), 4),
        }
        for k, rs in runs.items()
    }
    mem = summary["memory"]
    for k, s in summary.items():
        if k != "memory":
            s["ratio"] = round(s["img_s"] / mem["img_s"], 3)
            s["cpu_ratio"] = round(mem["cpu_ms_per_img"] / s["cpu_ms_per_img"], 3)
            s["meets_target"] = s["ratio"] >= TARGET
    return {
        "images": len(Y),
        "image_shape": list(X.shape[1:]),
        "encoding": m.encoding,
        "shards": len(m.shards),
        "batch": bs,
        "augment": {"pad": pad, "hflip": hflip},
        "timed_steps": steps,
        "epochs_spanned": round((warmup + steps) * bs / len(Y), 2),
        "encoded_bytes_per_image": round(encoded_bytes_per_image(m), 1),
        "shard_bytes_per_image": round(sum(os.path.getsize(u) for u in m.urls()) / m.num_samples, 1),
        "throughput": summary,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES[:3]), help=f"comma list of {', '.join(CASES)} (default: the first three)")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process (default 1 = cpus_per_worker)")
    p.add_argument("--loader-workers", default="0,1", help="comma list of loader_workers values (default 0,1)")
    p.add_argument("--augment", choices=("default", "none"), default="default")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the digits case (default 3)")
    p.add_argument("--cifar-repeats", type=int, default=1)
    p.add_argument("--digits-batch", type=int, default=32)
    p.add_argument("--digits-steps", type=int, default=165, help="timed steps (33 per epoch: 165 = 5 epochs)")
    p.add_argument("--digits-warmup", type=int, default=10)
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--cifar-steps", type=int, default=4, help="timed steps (default 4: compute-bound)")
    p.add_argument("--cifar-warmup", type=int, default=1)
    p.add_argument("--n", type=int, default=50000, help="synthetic CIFAR-sized train images (default 50000)")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard of the synthetic set")
    p.add_argument("--data-dir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ood_ray_bench_data"), help="where synthetic sets are written and reused")
    p.add_argument("--real-data", help="benchmark.json of a built cifar10-real (for the cifar10-real case)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.loader_workers = [int(v) for v in args.loader_workers.split(",") if v]
    cases = [c for c in args.cases.split(",") if c]
    if "cifar10-real" in cases and not args.real_data:
        p.error("case cifar10-real needs --real-data BENCH")
    if set(cases) - set(CASES):
        p.error(f"unknown case(s) {sorted(set(cases) - set(CASES))}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = {"bench": "data_path", "target": f"shards img/s >= {TARGET} x in-memory img/s", "machine": C.machine_info(args.threads), "backbone": args.backbone, "cases": {c: run_case(c, args) for c in cases}}
    out["verdict"] = {c: {k: s["meets_target"] for k, s in r["throughput"].items() if k != "memory"} for c, r in out["cases"].items()}
    out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    C.emit(main())
