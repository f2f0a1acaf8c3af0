"""The training loop of one worker, the same on Ray Train, in a Ray Tune trial and in-process.

``train_loop(cfg, worker)`` trains ``cfg`` and reports once per epoch. Everything it needs from
where it runs comes from ``worker`` (the ``Worker`` protocol below): ``ray_train.RayWorker`` (a Ray
Train worker), ``ray_train.TuneWorker`` (a one-worker Tune trial) or ``engine.LocalWorker`` (this
process, no Ray). The loop never branches on a method's name: it calls the ``Method`` hooks.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    init_weights,
    load_state,
    model_meta,
    save_checkpoint,
    unwrap,
)
from ..config import TrainConfig
from ..data.manifest import Benchmark, DataError
from ..data.streams import (
    batches_per_epoch,
    outlier_batches,
    set_skip_bad_samples,
    take_skipped,
    train_batches,
)
from ..methods import Method, StepResult, get_method
from ..objective import objective_metrics, objective_value
from ..progress import say
from .build import build_model, keep_frozen_eval, load_benchmark, make_optimizer, make_scheduler
from .detect import choose_detector
from .distributed import all_reduce_mean, batches_in_step, sync_buffers
from .evaluate import evaluate_split
from .posthoc import finish_method


class Worker(Protocol):
    """Where the loop runs: its rank, world size and device, and how it checkpoints and reports."""

    rank: int
    world: int
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device (wrapped for data parallelism when world > 1)."""

    def resume_from(self) -> contextlib.AbstractContextManager:
        """Context manager giving ``(folder, path)`` of the checkpoint to resume, or ``(None, None)``."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """One epoch's metrics, with the checkpoint folder (rank 0) to persist."""

    def stop_requested(self) -> bool:
        """Whether the run was stopped from outside (e.g. ASHA) while the loop runs on."""


def train_step(model, method: Method, opt, sched, x, y, x_out, state: dict, world: int = 1, device=None, autocast=None) -> StepResult:
    """One optimizer step of ``method`` (and its state update, averaged over the ranks)."""
    with autocast or contextlib.nullcontext():
        res = method.training_step(model, x, y, x_out, state)
    opt.zero_grad(set_to_none=True)
    res.loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    if method.state_sync_keys:  # e.g. the confidence λ: every rank applies the same update
        synced = all_reduce_mean([res.logs[k] for k in method.state_sync_keys], world, device)
        method.update_state(state, dict(zip(method.state_sync_keys, synced, strict=True)))
    return res


#: Which run wrote a checkpoint, in its folder; written when the worker has a ``run_id`` (a Tune trial).
ORIGIN_FILE = "origin.json"


def follow_config(cfg: TrainConfig, opt, sched, bases: list[float]) -> None:
    """After loading a checkpoint: its optimizer and schedule take ``cfg``'s learning rate and weight
    decay (``bases``: each group's base learning rate from ``cfg``), at the schedule's position.

    A run's own checkpoint already has them (no change); one resumed under another config, as PBT's
    exploit restarts a trial from another trial's checkpoint, would otherwise keep the writer's.
    """
    for group, base, old in zip(opt.param_groups, bases, sched.base_lrs, strict=True):
        if base != old:
            group["lr"] = group["lr"] * base / old if old > 0 else base
        group["initial_lr"] = base
        group["weight_decay"] = cfg.weight_decay
    sched.base_lrs = list(bases)


def adopted(folder: str, cfg: TrainConfig, run_id: str | None) -> dict:
    """Report keys for a checkpoint that another run wrote (PBT's exploit), read from the checkpoint:
    ``exploit_from`` (the writer), ``exploit_from_epoch`` and, for each training setting that
    differs, ``exploit_old_<name>`` / ``exploit_new_<name>``. Empty for the run's own checkpoint."""
    path = Path(folder, ORIGIN_FILE)
    if run_id is None or not path.is_file():
        return {}
    origin = json.loads(path.read_text())
    if origin.get("run") in (None, run_id):
        return {}
    old = json.loads(Path(folder, CONFIG_FILE).read_text())
    pairs = {"lr": (old.get("lr"), cfg.lr), "weight_decay": (old.get("weight_decay"), cfg.weight_decay)}
    pairs.update({k: (old.get("method_params", {}).get(k), v) for k, v in cfg.method_params.items()})
    out = {"exploit_from": str(origin["run"]), "exploit_from_epoch": int(origin["epoch"])}
    for k, (was, now) in pairs.items():
        if was != now:
            out[f"exploit_old_{k}"], out[f"exploit_new_{k}"] = was, now
    return out


def process_rss_mb() -> float:
    """Resident memory of this process and its children (DataLoader workers), in MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_full_info().uss  # private pages only: a forked worker shares the rest with us
    return total / 2**20


def skipped_metrics(bench: Benchmark, world: int, device=None) -> dict:
    """Samples skipped since the last call, summed over ranks: total and per set (when any)."""
    names = sorted({m.name for m in bench.all_manifests()})
    counts = take_skipped()
    summed = all_reduce_mean([float(counts.get(n, 0)) for n in names], world, device)
    per_set = {n: round(v * world) for n, v in zip(names, summed, strict=True)}
    return {"skipped_samples": sum(per_set.values()), **{f"skipped_{n}": v for n, v in per_set.items() if v}}


def train_loop(cfg: TrainConfig, worker: Worker, bench: Benchmark | None = None) -> None:
    """Train ``cfg`` as one rank of ``worker``; one ``worker.report`` per epoch, with a checkpoint."""
    rank, world, device = worker.rank, worker.world, worker.device
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    set_skip_bad_samples(cfg.skip_bad_samples)
    if bench is None or cfg.data is None:  # the embedded data is built on every node that needs it
        bench = load_benchmark(cfg)
    method = get_method(cfg.method, cfg.method_params)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, method, bench)
    if cfg.init_checkpoint:
        init_weights(model, cfg.init_checkpoint)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = worker.prepare(model)
    opt = make_optimizer(cfg, model)
    bs = cfg.per_worker_batch
    steps = [batches_per_epoch(bench.train, world, bs, e, cfg.seed) for e in range(cfg.epochs)]
    sched = make_scheduler(cfg, opt, sum(steps))
    state, start, resumed = method.initial_state(), 0, {}
    run_id = getattr(worker, "run_id", None)  # set where a checkpoint may come from another run (PBT)
    with worker.resume_from() as (d, ckpt_path):
        if d is not None:
            saved = load_state(d)
            unwrap(model).load_state_dict(saved["model"])
            bases = [g["initial_lr"] for g in opt.param_groups]  # cfg's, set by the new scheduler
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            follow_config(cfg, opt, sched, bases)
            state, start = saved["method_state"], saved["epoch"] + 1
            resumed = adopted(d, cfg, run_id)
            if start >= cfg.epochs:  # finished before an interruption: report the final result again
                final = json.loads(Path(d, METRICS_FILE).read_text())
    if start >= cfg.epochs:
        # no new checkpoint: the path is passed as Tune's TuneReportCallback would pass it
        worker.report({**final, "checkpoint_path": ckpt_path}, None)
        return
    if start and rank == 0 and getattr(worker, "echo_epochs", True):  # a sweep's driver says so on a retry
        say(f"resuming after the checkpoint of epoch {start}" + (f" of {resumed['exploit_from']}" if resumed else ""))
    net = unwrap(model)
    meta = model_meta(cfg, bench.class_names, bench.train.image_size, bench.train.mode, model=net)
    prep, crop_gen = net.preprocess, torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    own_crop = prep.train_crop == "random-resized"  # the model crops and flips; the stream does neither
    pad, flip = (0, False) if own_crop else (cfg.augment_pad, cfg.hflip)

    def prepare(x):
        return prep.train_batch(x, device, flip=cfg.hflip, generator=crop_gen).contiguous(memory_format=memory_format)

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    outliers = None
    if method.needs_outliers:
        outliers = outlier_batches(bench.outlier, rank, world, method.outlier_batch(bs), seed=cfg.seed, epoch=start, shuffle_buffer=cfg.shuffle_buffer, augment_pad=pad, hflip=flip, loader_workers=cfg.loader_workers, cache_mb=cfg.decoded_cache_mb)

    def epoch_stream(e: int):
        return train_batches(bench.train, rank, world, bs, e, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, augment_pad=pad, hflip=flip, loader_workers=cfg.loader_workers, cache_mb=cfg.decoded_cache_mb)

    upcoming = None  # with loader workers: the next epoch's stream, started during this epoch
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        keep_frozen_eval(cfg, model)
        loss_sum, n, logs_sum = 0.0, 0, {}
        batches, upcoming = upcoming or epoch_stream(epoch), None
        for x, y, _ in batches_in_step(batches, world, device, cfg.skip_bad_samples):
            if worker.stop_requested():  # a stopped trial ends here, reporting nothing more
                return
            if n == 0 and cfg.loader_workers > 0 and epoch + 1 < cfg.epochs:
                upcoming = epoch_stream(epoch + 1)  # its workers fork and fill their shuffle buffers during this epoch
            x = prepare(x)
            y = y.to(device, non_blocking=True)
            x_out = prepare(next(outliers)[0]) if outliers is not None else None
            res = train_step(model, method, opt, sched, x, y, x_out, state, world, device, autocast)
            loss_sum += res.loss.item()
            n += 1
            for k, v in res.logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
        train_time = time.perf_counter() - t0
        if worker.stop_requested():  # stopped at the end of an epoch: no evaluation
            return
        keys = sorted(logs_sum)
        if n == 0:  # the same on every rank: they stop together
            raise DataError(f"{bench.train.path}: epoch {epoch + 1} has no full training batch left after skipping bad samples ({take_skipped()})")
        reduced = all_reduce_mean([loss_sum / n] + [logs_sum[k] / n for k in keys], world, device)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": reduced[0],
            **{f"train_{k}": v for k, v in zip(keys, reduced[1:], strict=True)},
            "lr": opt.param_groups[0]["lr"],
            "train_time_s": train_time,
            "train_images": n * bs * world,
            "start_epoch": start,  # > 0 after resuming from a checkpoint
            "worker_rss_mb": process_rss_mb(),  # rank 0's process and its loader workers
            **(resumed if epoch == start else {}),  # the first epoch on another run's checkpoint
        }
        metrics.update(skipped_metrics(bench, world, device))
        metrics.update({f"state_{k}": float(v) for k, v in state.items() if isinstance(v, int | float)})
        if not math.isfinite(metrics["train_loss"]):  # the same on every rank (all-reduced)
            reason = f"training diverged: the mean train loss of epoch {epoch + 1} is {metrics['train_loss']} (lr {cfg.lr:g}); lower the learning rate"
            if rank == 0:
                say(reason)
            # the objective is reported as NaN (Tune insists on it; ASHA ignores NaN, Optuna marks FAIL)
            nan = {k: math.nan for k in ("objective", *objective_metrics(cfg.objective))}
            worker.report({**metrics, **nan, "diverged": reason}, None)  # no checkpoint of a broken model
            return
        t1 = time.perf_counter()
        sync_buffers(model, world)
        last = epoch + 1 == cfg.epochs
        if last:  # post-hoc step (DisMax temperature, chosen ε / δ, detector) on the val split only
            method, posthoc = finish_method(model, method, cfg, bench, rank, world, device)
            metrics.update(posthoc)
            cfg.method_params = dict(method.params)  # the checkpoint records the values chosen
            if cfg.detectors:
                method, logs = choose_detector(model, method, cfg, bench, rank, world, device)
                metrics.update(logs, **{"ood_ray.detector": method.detector.name})
                cfg.detectors = [method.detector.name]
            meta = model_meta(cfg, bench.class_names, bench.train.image_size, bench.train.mode, scoring=method, model=net)
        metrics.update(evaluate_split(model, method, bench, "val", rank, world, device, cfg.eval_batch_size))
        metrics["objective"] = objective_value(metrics, cfg.objective, cfg.min_val_acc)
        if last and cfg.evaluate_test:
            metrics.update(evaluate_split(model, method, bench, "test", rank, world, device, cfg.eval_batch_size))
        metrics["eval_time_s"] = time.perf_counter() - t1
        eval_skips = skipped_metrics(bench, world, device)
        metrics["skipped_samples"] += eval_skips.pop("skipped_samples")
        metrics.update({k: metrics.get(k, 0) + v for k, v in eval_skips.items()})
        if rank == 0 and getattr(worker, "echo_epochs", True):  # a sweep's driver prints its trials' epochs
            say(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  val_auroc {metrics.get('val_auroc', float('nan')):.4f}  "
                f"val_fpr95 {metrics.get('val_fpr95', float('nan')):.4f}  "
                f"({train_time:.1f}s train, {metrics['eval_time_s']:.1f}s eval)"
                + (f"  skipped {metrics['skipped_samples']} bad samples" if metrics["skipped_samples"] else "")
            )
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, model, opt, sched, epoch, state, cfg, meta, detector=getattr(method, "detector", None))
                Path(tmp, METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=float) + "\n")
                if run_id is not None:
                    Path(tmp, ORIGIN_FILE).write_text(json.dumps({"run": run_id, "epoch": epoch + 1}) + "\n")
            worker.report(metrics, tmp if rank == 0 else None)
