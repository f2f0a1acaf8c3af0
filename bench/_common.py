"""Helpers shared by the benchmarks: output, memory, synthetic data, the package's training step."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

_STDOUT: int | None = None


def log(msg: str, tag: str = "bench") -> None:
    """Progress on stderr: stdout carries exactly one JSON object."""
    sys.stderr.write(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def capture_stdout() -> None:
    """Send fd 1 (Ray's forwarded output, progress lines) to stderr; ``emit`` still reaches stdout."""
    global _STDOUT
    sys.stdout.flush()
    _STDOUT = os.dup(1)
    os.dup2(2, 1)


def emit(obj: dict) -> None:
    """Print the benchmark's one JSON object on the real stdout."""
    text = json.dumps(obj, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)) + "\n"
    sys.stdout.flush()
    os.write(_STDOUT if _STDOUT is not None else 1, text.encode())


def machine_info(threads: int | None = None) -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}


def rss_mb() -> dict:
    """This process's RSS, + the USS (private pages) of its live children, and their number, in MB.

    A forked loader worker shares most pages with its parent; RSS + children's USS counts them once
    (the package's ``worker_rss_mb`` metric is the same sum).
    """
    import psutil

    me = psutil.Process()
    own = tree = me.memory_info().rss / 2**20
    kids = 0
    for ch in me.children(recursive=True):
        try:
            tree += ch.memory_full_info().uss / 2**20
            kids += 1
        except psutil.Error:
            pass
    return {"rss_mb": round(own, 1), "tree_mb": round(tree, 1), "children": kids}


def synthetic_images(n: int, templates: np.ndarray, rng: np.random.Generator, noise: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32×32 RGB images: a class template, smooth per-image variation, mild pixel noise."""
    labels = rng.integers(0, len(templates), n)
    size = templates.shape[1]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for s in range(0, n, 4096):
        m = min(4096, n - s)
        smooth = rng.uniform(-60, 60, (m, 4, 4, 3)).astype(np.float32).repeat(size // 4, 1).repeat(size // 4, 2)
        img = templates[labels[s : s + m]] + smooth + rng.normal(0, noise, (m, size, size, 3)).astype(np.float32)
        out[s : s + m] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, labels


def synthetic_benchmark(root: str | Path, n: int, encoding: str = "png", seed: int = 0, maxcount: int | None = None) -> Path:
    """A CIFAR-sized benchmark written by the package's writer (reused when present): train ``n``,
    val/test/outlier n/10, ood-val/ood-test n/20 of pixel noise. Returns its benchmark.json."""
    from ood_ray.data.manifest import OOD_LABEL
    from ood_ray.data.writer import write_array_shards

    mc = maxcount or max(64, n // 16)
    out = Path(root) / f"synthetic32-n{n}-{encoding}-mc{mc}-s{seed}"
    spec_path = out / "benchmark.json"
    if spec_path.exists():
        return spec_path
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    templates = rng.uniform(30, 225, (10, 4, 4, 3)).astype(np.float32).repeat(8, 1).repeat(8, 2)
    spec: dict = {"name": out.name, "ood_val": {}, "ood_test": {}}
    sizes = {"train": n, "val": max(n // 10, 64), "test": max(n // 10, 64), "outlier": max(n // 10, 128), "ood-val": max(n // 20, 64), "ood-test": max(n // 20, 64)}
    for role, count in sizes.items():
        if role in ("train", "val", "test"):
            images, labels = synthetic_images(count, templates, rng)
            kw = {"class_names": [str(i) for i in range(10)]}
        elif role == "outlier":  # other colour patterns: not one of the classes
            images, _ = synthetic_images(count, 255 - templates[:, ::-1], rng)
            labels, kw = np.full(count, OOD_LABEL), {}
        else:
            images, labels, kw = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), np.full(count, OOD_LABEL), {"group": "far"}
        write_array_shards(images, labels, out / role, name=role, role=role, encoding=encoding, maxcount=min(mc, max(64, count // 4)) if role != "train" else mc, key_prefix=f"{role}-", progress=False, **kw)
        if role.startswith("ood-"):
            spec[role.replace("-", "_")]["noise"] = f"{role}/manifest.json"
        else:
            spec[role] = f"{role}/manifest.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    log(f"wrote synthetic benchmark ({n} train, {encoding}) to {out} in {time.perf_counter() - t0:.1f}s")
    return spec_path


def load_in_memory(manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a set as one uint8 N×C×H×W tensor, decoded once by the package's reader."""
    from ood_ray.data.streams import eval_batches

    xs, ys = zip(*((x, y) for x, y, _ in eval_batches(manifest, 0, 1, 2048)), strict=True)
    return torch.cat(xs).contiguous(), torch.cat(ys)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int, hflip: bool) -> torch.Tensor:
    """Random crop after zero padding + horizontal flip of a uint8 N×C×H×W batch, vectorized on its
    device (the distribution of ``ood_ray.data.sampling.augment``)."""
    n, c, h, w = x.shape
    dev = x.device
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy, ox = (torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen) for _ in range(2))
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if hflip:
        flip = torch.rand(n, device=dev, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class Stepper:
    """A run's model, method, optimizer and schedule built by ``ood_ray.engine.build``; ``step`` is
    ``ood_ray.engine.train_step`` on a uint8 batch prepared as ``train_loop`` prepares it."""

    def __init__(self, cfg, bench, device: str = "cpu", total_steps: int = 10**6):
        from ood_ray.engine.build import build_model, make_optimizer, make_scheduler
        from ood_ray.methods import get_method

        self.device = torch.device(device)
        self.method = get_method(cfg.method, cfg.method_params)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, self.method, bench)
        self.fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.fmt).to(self.device).train()
        self.opt = make_optimizer(cfg, self.model)
        self.sched = make_scheduler(cfg, self.opt, total_steps)
        self.state = self.method.initial_state()
        self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step(self, x: torch.Tensor, y: torch.Tensor, x_out: torch.Tensor | None = None):
        from ood_ray.engine import train_step
        from ood_ray.engine.evaluate import normalize

        def prep(t):
            return None if t is None else normalize(t, self.device).contiguous(memory_format=self.fmt)

        y = y.to(self.device, non_blocking=True)
        return train_step(self.model, self.method, self.opt, self.sched, prep(x), y, prep(x_out), self.state, 1, self.device, self.autocast)
