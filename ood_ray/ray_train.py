"""Ray Train glue: the loop's workers on Ray, the per-worker entry point, the TorchTrainer.

``RayWorker`` runs ``engine.train_loop`` on a Ray Train worker (any number of workers, DDP);
``TuneWorker`` runs it inside a one-worker Ray Tune trial (no Train run to start);
``make_trainer`` assembles the ``TorchTrainer`` of a config and ``ensure_ray`` joins or starts Ray.
"""

from __future__ import annotations

import contextlib
import os

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from . import console, ray_compat
from .config import TrainConfig
from .data.manifest import Benchmark
from .engine import train_loop
from .engine.build import load_benchmark
from .progress import say


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

    def __init__(self, echo_epochs: bool = True):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.echo_epochs = echo_epochs
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

    ``run_id`` (the trial id) marks each checkpoint with the trial that wrote it: when PBT's exploit
    restarts this trial from another trial's checkpoint, ``tune.get_checkpoint`` returns that one,
    and the loop reports whose it was (``engine.loop.adopted``).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        from ray import tune

        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.run_id = tune.get_context().get_trial_id()
        self.echo_epochs = not console.is_quiet()  # the sweep's driver prints this trial's epochs
        ray_compat.quiet_checkpoint_log()

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
        its reset waits for the loop to end. Ray 2.60 has no public API for it
        (``ray_compat.trial_stopped``); without it the trial runs on to its next report.
        """
        return ray_compat.trial_stopped()


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    ray_compat.quiet_report_log()
    spec = config.get("benchmark")
    train_loop(TrainConfig.from_dict(config["cfg"]), RayWorker(config.get("echo_epochs", True)), Benchmark.from_spec(spec) if spec else None)


def make_trainer(cfg: TrainConfig, name: str, callbacks: list, gpus_per_worker: float | None = None, bench: Benchmark | None = None, echo_epochs: bool = True) -> TorchTrainer:
    """The Ray Train run of ``cfg``; the same ``name`` and storage path resume its checkpoints.
    ``echo_epochs``: rank 0 prints each epoch's line (a sweep's driver prints its trials' itself).

    The benchmark travels in the workers' config (``Benchmark.to_spec``), so workers on other nodes
    need the shards but not benchmark.json or the manifests.
    """
    if bench is None:
        bench = load_benchmark(cfg)
    if gpus_per_worker is None:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        gpus_per_worker = 1.0 if use_gpu else 0.0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    ray_compat.set_train_poll_interval(0.25)  # not 2 s: ~1 s less per epoch and per run
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "benchmark": bench.to_spec(), "echo_epochs": echo_epochs},
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
            ray_compat.disable_preemption_watcher()  # one local node: nothing to watch
        stopped = ray_compat.stop_orphaned_agents()  # left for ~60 s by a killed driver's local Ray
        if stopped:
            say(f"stopped {len(stopped)} Ray agent process(es) of a Ray node that is gone (pids {', '.join(map(str, stopped))})")
        ctx = ray.init(log_to_driver=True, logging_level=console.ray_logging_level())
        if console.is_quiet() and getattr(ctx, "dashboard_url", None):
            say(f"started a local Ray; dashboard http://{ctx.dashboard_url}")
    ray_compat.check_version()
