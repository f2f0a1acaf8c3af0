"""Training on Ray Train: the per-worker loop and the driver that runs it and records it in MLflow.

Flow: ``run_training`` (driver) checks config, data and MLflow, opens an MLflow run, builds a
``TorchTrainer`` whose workers run ``train_loop_per_worker``; each epoch the workers train on their
share of the shards, evaluate the whole val split (gathered across ranks), checkpoint and call
``ray.train.report``; the controller-side ``EpochLogger`` logs the report to MLflow. After the
last epoch the driver logs the final model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from .config import ConfigError, TrainConfig
from .data.default import ensure_default
from .data.manifest import Benchmark, DataError
from .data.streams import (
    batches_per_epoch,
    outlier_batches,
    set_skip_bad_samples,
    take_skipped,
    train_batches,
)
from .evaluate import collect, evaluate_split, gather, normalize, scoring_mode, unwrap
from .methods import Method, get_method
from .models import Classifier, build_backbone
from .objective import objective_metrics, objective_value

STATE_FILE = "state.pt"
META_FILE = "model.json"
METRICS_FILE = "metrics.json"


def benchmark_path(cfg: TrainConfig) -> str:
    return cfg.data if cfg.data else str(ensure_default(seed=cfg.data_seed))


def load_benchmark(cfg: TrainConfig, verify: bool = False) -> Benchmark:
    """The benchmark of ``cfg``; ``verify`` checks every local shard's sha256.

    With ``skip_bad_samples`` a damaged shard is reported and training goes on (its bad samples
    are skipped and counted when read); without it the first mismatch is an error.
    """
    bench = Benchmark.load(benchmark_path(cfg), verify=verify and not cfg.skip_bad_samples)
    if verify and cfg.skip_bad_samples:
        for m in bench.all_manifests():
            try:
                m.verify()
            except DataError as e:
                say(f"warning: {e}; skip_bad_samples is on, so its unreadable samples will be skipped and counted")
    method = get_method(cfg.method, cfg.method_params)
    if method.needs_outliers and bench.outlier is None:
        raise ConfigError(f"method {cfg.method!r} needs an outlier set, but {bench.path} has no 'outlier' entry")
    return bench


def build_model(cfg: TrainConfig, method: Method, bench: Benchmark) -> Classifier:
    backbone = build_backbone(cfg.backbone, bench.train.channels, bench.train.image_size)
    return Classifier(backbone, method.make_head(backbone.num_features, bench.num_classes))


def model_meta(cfg: TrainConfig, bench: Benchmark) -> dict:
    m = get_method(cfg.method, cfg.method_params)
    return {
        "method": cfg.method,
        "method_params": m.params,
        "backbone": cfg.backbone,
        "class_names": bench.class_names,
        "image_size": list(bench.train.image_size),
        "mode": bench.train.mode,
        "default_score": m.default_score,
        "threshold_score": m.threshold_score,
        "delta": m.params.get("delta"),
        "exported_output": (m.flat_output.__doc__ or "logits").strip().splitlines()[0],
        "normalization": "x / 127.5 - 1 on uint8 pixels",
    }


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    """Per-step schedule over the whole run."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * 1e-3)
    if cfg.schedule == "step":
        milestones = sorted({max(1, int(f * total_steps)) for f in cfg.step_milestones})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def all_reduce_mean(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        t = t.to(ray.train.torch.get_device()) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
        t = t.cpu() / world
    return t.tolist()


def post_train(model, method: Method, bench: Benchmark, rank: int, world: int, device, batch_size: int) -> dict:
    """Run the method's calibration on the whole validation split (identical on every rank)."""
    if type(method).calibrate is Method.calibrate:
        return {}
    with torch.no_grad():
        val = gather(collect(model, method, bench.val, rank, world, device, batch_size), world)
    return method.calibrate(unwrap(model), torch.from_numpy(val["logits"]), torch.from_numpy(val["labels"]))


def choose_delta(model, method: Method, bench: Benchmark, tpr: float, rank: int, world: int, device, batch_size: int) -> float:
    """δ that accepts the fraction ``tpr`` of val ID (a quantile of the threshold score), in [0, 1]."""
    with scoring_mode(method):
        val = gather(collect(model, method, bench.val, rank, world, device, batch_size), world)
    return float(np.clip(np.quantile(val[method.threshold_score].astype(np.float64), 1.0 - tpr), 0.0, 1.0))


def finish_method(model, method: Method, cfg: TrainConfig, bench: Benchmark, rank: int, world: int, device) -> tuple[Method, dict]:
    """After the last epoch: calibrate, and with ``posthoc_search`` choose the post-hoc values.

    Every candidate of the method's ``posthoc_grid`` (ε, calibration settings) is applied to this
    checkpoint and scored by val AUROC of the method's score; the first best wins. Post-hoc values
    do not change the class prediction, so the accuracy guard plays no part here. Then δ is set
    from val ID when ``delta_tpr`` is given. Only the validation split is read.
    """
    bs = cfg.eval_batch_size
    candidates = type(method).posthoc_grid() if cfg.posthoc_search else [{}]
    logs: dict = {}
    chosen = {}
    if len(candidates) > 1:
        best = -math.inf
        for cand in candidates:
            m = get_method(cfg.method, {**method.params, **cand})
            post_train(model, m, bench, rank, world, device, bs)
            auroc = evaluate_split(model, m, bench, "val", rank, world, device, bs).get("val_auroc", math.nan)
            if auroc > best:
                best, chosen = auroc, cand
        logs["posthoc_candidates"] = len(candidates)
    method = get_method(cfg.method, {**method.params, **chosen})
    logs.update(post_train(model, method, bench, rank, world, device, bs))
    if cfg.delta_tpr is not None:
        delta = choose_delta(model, method, bench, cfg.delta_tpr, rank, world, device, bs)
        method = get_method(cfg.method, {**method.params, "delta": delta})
    logs.update({f"chosen_{k}": float(v) for k, v in method.params.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return method, logs


def sync_buffers(model: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Each rank's last training step updated its running statistics from its own batch, so without
    this the ranks would evaluate slightly different models, none of them the checkpointed one.
    """
    if world > 1 and dist.is_initialized():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf.data, src=0)


def save_checkpoint(directory: str, model, opt, sched, epoch: int, method_state: dict, cfg: TrainConfig, meta: dict) -> None:
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "method_state": method_state,
        },
        os.path.join(directory, STATE_FILE),
    )
    cfg.save(os.path.join(directory, "config.json"))
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def init_weights(model: Classifier, directory: str) -> None:
    """Fine-tuning: the backbone's weights from a checkpoint, and the head's when it has the same shape."""
    saved = load_state(directory)["model"]
    model.backbone.load_state_dict({k[len("backbone.") :]: v for k, v in saved.items() if k.startswith("backbone.")})
    head = {k[len("head.") :]: v for k, v in saved.items() if k.startswith("head.")}
    own = model.head.state_dict()
    if head.keys() == own.keys() and all(v.shape == own[k].shape for k, v in head.items()):
        model.head.load_state_dict(head)


def load_state(directory: str) -> dict:
    """A checkpoint's tensors; ``weights_only`` so nothing is unpickled."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def quiet_report_log() -> None:
    """Ray 2.60 logs every report, metrics and all, under a logger named after its file."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def say(line: str) -> None:
    """Progress line; bypasses Ray Train's print patch, which would echo it twice."""
    sys.stdout.write(f"[ood-ray] {line}\n")
    sys.stdout.flush()


def tune_session():
    """The Ray Tune session of this trial process, or None (private Ray 2.60 API, read only here)."""
    try:
        from ray.train._internal.session import get_session

        return get_session()
    except Exception:  # noqa: BLE001 - private API: callers go on without it
        return None


@contextlib.contextmanager
def checkpoint_folder(ckpt):
    """``(folder, path)`` of a Ray checkpoint to resume from, or ``(None, None)``."""
    if ckpt is None:
        yield None, None
        return
    with ckpt.as_directory() as d:
        yield d, ckpt.path


class RayWorker:
    """The loop's view of a Ray Train worker: rank, world, device, checkpoints and reports."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)  # moves to the device, wraps in DDP when world > 1

    def resume_from(self):
        """The latest checkpoint folder of this run (after a restart), or None."""
        return checkpoint_folder(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def stop_requested(self) -> bool:
        return False  # Ray Train stops a run by ending its worker processes


class TuneWorker:
    """The loop inside a Ray Tune trial (one-worker trials): world 1, Tune's checkpoints and reports.

    No Train controller, worker group or process group is started. Tune persists each epoch's
    checkpoint in the trial's folder, restarts a failed trial from its latest one
    (``FailureConfig``) and restores unfinished trials on ``--resume``: ``tune.get_checkpoint``
    then returns it, exactly as ``ray.train.get_checkpoint`` does for a Train worker.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def resume_from(self):
        from ray import tune

        return checkpoint_folder(tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def stop_requested(self) -> bool:
        """Whether Tune has stopped this trial (e.g. ASHA) while the loop runs on.

        Tune takes a function trial's report and lets it train on at once, so a trial that ASHA
        stops is already in its next epoch. Checked before every step, this ends the loop within
        one step, so Tune can reuse the trial's process for the next trial (``reuse_actors``):
        its reset waits for the loop to end. Ray 2.60 has no public API for it; this reads the
        Tune session's stop event (without it the trial runs on to its next report).
        """
        stop = getattr(tune_session(), "stop_event", None)
        return stop is not None and stop.is_set()


class LocalWorker:
    """The same loop in this process, without Ray: world 1, checkpoints under ``root``.

    For benchmarks (``bench/tune_overhead.py`` runs trials through plain Optuna with it) and for
    tests that need a single-process reference run.
    """

    def __init__(self, root: str | Path, device: str | torch.device = "cpu"):
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict] = []
        self.checkpoint: str | None = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def resume_from(self):
        yield self.checkpoint, self.checkpoint

    def stop_requested(self) -> bool:
        return False

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            dest = self.root / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoint = str(dest)
            metrics = {**metrics, "checkpoint_path": self.checkpoint}
        self.reports.append(metrics)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    quiet_report_log()
    spec = config.get("benchmark")
    train_loop(TrainConfig.from_dict(config["cfg"]), RayWorker(), Benchmark.from_spec(spec) if spec else None)


def train_local(cfg: TrainConfig, root: str | Path, device: str = "cpu") -> list[dict]:
    """Train ``cfg`` in this process with one worker and no Ray; returns every epoch's metrics."""
    worker = LocalWorker(root, device)
    train_loop(cfg.validate(), worker)
    return worker.reports


def process_rss_mb() -> float:
    """Resident memory of this process and its children (DataLoader workers), in MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_full_info().uss  # private pages only: a forked worker shares the rest with us
    return total / 2**20


def batches_in_step(batches, world: int, device, enabled: bool):
    """With ``skip_bad_samples`` a rank may run out of batches early: stop every rank together.

    Each step the ranks agree (one tiny all-reduce) whether all of them still have a batch, so DDP
    never waits for a rank that has finished. Without skipping every rank has the same planned count.
    """
    if not enabled or world == 1 or not dist.is_initialized():
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield batch


def skipped_metrics(bench: Benchmark, world: int) -> dict:
    """Samples skipped since the last call, summed over ranks: total and per set (when any)."""
    names = sorted({m.name for m in bench.all_manifests()})
    counts = take_skipped()
    summed = all_reduce_mean([float(counts.get(n, 0)) for n in names], world)
    per_set = {n: round(v * world) for n, v in zip(names, summed, strict=True)}
    return {"skipped_samples": sum(per_set.values()), **{f"skipped_{n}": v for n, v in per_set.items() if v}}


def train_loop(cfg: TrainConfig, worker, bench: Benchmark | None = None) -> None:
    """The training loop of one worker (``RayWorker`` on Ray Train, ``LocalWorker`` in-process)."""
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
    state, start = method.initial_state(), 0
    with worker.resume_from() as (d, ckpt_path):
        if d is not None:
            saved = load_state(d)
            unwrap(model).load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            state, start = saved["method_state"], saved["epoch"] + 1
            if start >= cfg.epochs:  # finished before an interruption: report the final result again
                final = json.loads(Path(d, METRICS_FILE).read_text())
    if start >= cfg.epochs:
        # no new checkpoint: the path is passed as Tune's TuneReportCallback would pass it
        worker.report({**final, "checkpoint_path": ckpt_path}, None)
        return
    if start and rank == 0:
        say(f"resuming after the checkpoint of epoch {start}")
    meta = model_meta(cfg, bench)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    outliers = None
    if method.needs_outliers:
        ratio = method.params.get("outlier_ratio", 1)
        outliers = outlier_batches(bench.outlier, rank, world, int(ratio * bs), seed=cfg.seed, epoch=start, augment_pad=cfg.augment_pad, hflip=cfg.hflip, loader_workers=cfg.loader_workers)

    def epoch_stream(e: int):
        return train_batches(bench.train, rank, world, bs, e, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, augment_pad=cfg.augment_pad, hflip=cfg.hflip, loader_workers=cfg.loader_workers)

    upcoming = None  # with loader workers: the next epoch's stream, started during this epoch
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, n, logs_sum = 0.0, 0, {}
        batches, upcoming = upcoming or epoch_stream(epoch), None
        for x, y, _ in batches_in_step(batches, world, device, cfg.skip_bad_samples):
            if worker.stop_requested():  # a stopped trial ends here, reporting nothing more
                return
            if n == 0 and cfg.loader_workers > 0 and epoch + 1 < cfg.epochs:
                upcoming = epoch_stream(epoch + 1)  # its workers fork and fill their shuffle buffers during this epoch
            x = normalize(x, device).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            x_out = normalize(next(outliers)[0], device).contiguous(memory_format=memory_format) if outliers is not None else None
            with autocast:
                res = method.training_step(model, x, y, x_out, state)
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            sched.step()
            loss_sum += res.loss.item()
            n += 1
            if method.state_sync_keys:  # e.g. the confidence λ: every rank applies the same update
                synced = all_reduce_mean([res.logs[k] for k in method.state_sync_keys], world)
                method.update_state(state, dict(zip(method.state_sync_keys, synced, strict=True)))
            for k, v in res.logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
        train_time = time.perf_counter() - t0
        if worker.stop_requested():  # stopped at the end of an epoch: no evaluation
            return
        keys = sorted(logs_sum)
        if n == 0:  # the same on every rank: they stop together
            raise DataError(f"{bench.train.path}: epoch {epoch + 1} has no full training batch left after skipping bad samples ({take_skipped()})")
        reduced = all_reduce_mean([loss_sum / n] + [logs_sum[k] / n for k in keys], world)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": reduced[0],
            **{f"train_{k}": v for k, v in zip(keys, reduced[1:], strict=True)},
            "lr": opt.param_groups[0]["lr"],
            "train_time_s": train_time,
            "train_images": n * bs * world,
            "start_epoch": start,  # > 0 after resuming from a checkpoint
            "worker_rss_mb": process_rss_mb(),  # rank 0's process and its loader workers
        }
        metrics.update(skipped_metrics(bench, world))
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
        if last:  # post-hoc step (DisMax temperature, chosen ε / δ) on the val split only
            method, posthoc = finish_method(model, method, cfg, bench, rank, world, device)
            metrics.update(posthoc)
            cfg.method_params = dict(method.params)  # the checkpoint records the values chosen
            meta = model_meta(cfg, bench)
        metrics.update(evaluate_split(model, method, bench, "val", rank, world, device, cfg.eval_batch_size))
        metrics["objective"] = objective_value(metrics, cfg.objective, cfg.min_val_acc)
        if last and cfg.evaluate_test:
            metrics.update(evaluate_split(model, method, bench, "test", rank, world, device, cfg.eval_batch_size))
        metrics["eval_time_s"] = time.perf_counter() - t1
        eval_skips = skipped_metrics(bench, world)
        metrics["skipped_samples"] += eval_skips.pop("skipped_samples")
        metrics.update({k: metrics.get(k, 0) + v for k, v in eval_skips.items()})
        if rank == 0:
            say(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  val_auroc {metrics.get('val_auroc', float('nan')):.4f}  "
                f"val_fpr95 {metrics.get('val_fpr95', float('nan')):.4f}  "
                f"({train_time:.1f}s train, {metrics['eval_time_s']:.1f}s eval)"
                + (f"  skipped {metrics['skipped_samples']} bad samples" if metrics["skipped_samples"] else "")
            )
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, model, opt, sched, epoch, state, cfg, meta)
                Path(tmp, METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=float) + "\n")
            worker.report(metrics, tmp if rank == 0 else None)


class ExportedModel(torch.nn.Module):
    """The model as logged to MLflow: normalized images in, one tensor out (``method.flat_output``)."""

    def __init__(self, model: torch.nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.flat_output(self.model(x))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says in which epoch and what to change."""


@dataclass
class TrainOutcome:
    run_id: str
    metrics: dict
    checkpoint_path: str
    tracking_uri: str
    experiment: str
    wall_time_s: float


def model_from_checkpoint(directory: str) -> tuple[Classifier, dict, TrainConfig]:
    """The model of a checkpoint folder, in eval mode, with its model.json and config."""
    from .serve import load_model_dir  # rebuilds from the folder alone (no benchmark read)

    return load_model_dir(directory)


def make_trainer(cfg: TrainConfig, name: str, callbacks: list, gpus_per_worker: float | None = None, bench: Benchmark | None = None) -> TorchTrainer:
    """The Ray Train run of ``cfg``; the same ``name`` and storage path resume its checkpoints.

    The benchmark travels in the workers' config (``Benchmark.to_spec``), so workers on other nodes
    need the shards but not benchmark.json or the manifests.
    """
    if bench is None:
        bench = load_benchmark(cfg)
    if gpus_per_worker is None:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        gpus_per_worker = 1.0 if use_gpu else 0.0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    # Ray Train's controller polls its workers every 2 s by default, so each report waited up to 2 s
    # before Tune/MLflow saw it and a finished run up to 2 s before it ended (~1 s + 1 s per epoch
    # and run on average). A poll is one small RPC per worker. Read where fit() runs, which passes it
    # on to the controller; a value set in the environment wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "benchmark": bench.to_spec()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def ensure_ray() -> None:
    if not ray.is_initialized():
        # Joins the cluster under `ray job submit` (RAY_ADDRESS is set), else starts a local Ray.
        if not os.environ.get("RAY_ADDRESS"):
            # One local node: a preemption would take the driver with it, so Ray Train's preemption
            # watcher (one more actor process per Train run, i.e. per sweep trial) has nothing to
            # do. Set before ray.init so every Ray process inherits it; a value already set wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(log_to_driver=True)


def run_training(cfg: TrainConfig) -> TrainOutcome:
    """Train ``cfg`` on Ray Train and record it in MLflow; returns the run and final metrics."""
    from mlflow.tracking import MlflowClient  # driver only: Ray workers start faster without mlflow

    from . import tracking

    t0 = time.perf_counter()
    cfg.validate()
    bench = load_benchmark(cfg, verify=True)
    tracking.check_tracking(cfg.mlflow_uri)
    client = MlflowClient(cfg.mlflow_uri)
    exp_id = tracking.ensure_experiment(client, cfg.experiment)
    run = client.create_run(exp_id, run_name=cfg.run_name, tags={"ood_ray.method": cfg.method, "ood_ray.backbone": cfg.backbone, "ood_ray.data": bench.path})
    run_id = run.info.run_id
    print(f"[ood-ray] MLflow run {run_id} in experiment {cfg.experiment!r} at {cfg.mlflow_uri}", flush=True)
    client.log_batch(run_id, params=tracking.params_of(cfg.to_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, cfg.save(Path(tmp) / "config.json"))
    try:
        ensure_ray()
        result = make_trainer(cfg, f"train-{run_id}", [tracking.EpochLogger(cfg.mlflow_uri, run_id)], bench=bench).fit()
        if result.metrics.get("diverged"):
            raise TrainingDiverged(result.metrics["diverged"])
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        client.set_tag(run_id, "ood_ray.checkpoint", result.checkpoint.path)
        with result.checkpoint.as_directory() as d:
            model, meta, _ = model_from_checkpoint(d)
            client.log_artifact(run_id, str(Path(d) / META_FILE))
        example = np.zeros((2, bench.train.channels, *bench.train.image_size), dtype=np.float32)
        import mlflow

        mlflow.set_tracking_uri(cfg.mlflow_uri)
        with mlflow.start_run(run_id=run_id):
            tracking.log_pytorch_model(ExportedModel(model, get_method(cfg.method, cfg.method_params)), example)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        client.set_tag(run_id, "ood_ray.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    wall = time.perf_counter() - t0
    client.log_metric(run_id, "wall_time_s", wall)
    return TrainOutcome(run_id, dict(result.metrics), result.checkpoint.path, cfg.mlflow_uri, cfg.experiment, wall)
