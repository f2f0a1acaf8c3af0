"""Hyperparameter sweeps: Ray Tune + Optuna over Ray Train trials, recorded in MLflow.

Three layers (Ray's Tune-over-Train shape):

1. ``train.train_loop_per_worker`` runs on every Ray Train worker of a trial and reports each
   epoch's validation metrics (and ``objective``) with a checkpoint.
2. ``run_trial`` is the Tune trainable: it turns the suggested hyperparameters into a
   ``TrainConfig`` and runs a ``TorchTrainer`` whose reports reach Tune via ``TuneReportCallback``.
3. ``run_sweep`` builds the ``Tuner`` (``OptunaSearch`` with a seeded TPE sampler and a study
   persisted in sqlite, ``ASHAScheduler`` on the per-epoch objective), or restores it with
   ``resume=True``, then evaluates the best trial on the test split, writes the plots and tables,
   and registers the best model.

Trials see validation data only: they never evaluate the test split (``evaluate_test=False``),
and post-hoc values (ε, calibration settings, δ) are chosen inside each trial on its own
checkpoint. The test split is read once, for the best trial(s), after the choice is made.

MLflow: one parent run per sweep (arguments, search space, best trial, artifacts) and one child run
per trial (its config, per-epoch metrics, final metrics, checkpoint); all MLflow writes happen in
this driver process (``SweepRecorder``), so a sqlite store is safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from . import tracking
from .config import ConfigError, TrainConfig, results_dir
from .methods import METHODS, get_method
from .objective import objective_metrics
from .trial import run_trial, trial_config

TRIAL_TAG = "ood_ray.trial_id"
SWEEP_TAG = "ood_ray.sweep"
PARENT_TAG = "mlflow.parentRunId"
LR_BELOW, LR_ABOVE = 10.0, 4.0  # the learning rate is searched in [lr / 10, 4 * lr]
WD_RANGE = (1e-5, 1e-3)


@dataclass
class SweepConfig:
    """Everything a sweep needs; ``base`` holds the training settings every trial starts from."""

    method: str = "dismax"
    base: TrainConfig = field(default_factory=TrainConfig)  # backbone, data, epochs, batch size...
    num_trials: int = 8
    gpus_per_worker: float | None = None  # None = 1 when the cluster has GPUs, else 0
    trial_cpus: float = 0.5  # the Tune trial driver of a "train" trial (the Train controller takes none)
    trial_runner: str = "auto"  # "tune": the loop runs in the Tune trial; "train": a TorchTrainer; auto: tune iff 1 worker
    concurrency: int | None = None  # None = as many trials as the cluster's resources allow
    name: str | None = None  # sweep name: Tune experiment folder and MLflow parent run
    seed: int = 0
    asha: bool = True
    grace_period: int | None = None  # epochs before ASHA may stop a trial; None = a quarter of the epochs (>= 1)
    reduction_factor: float = 2.0
    include_default: bool = True  # the first trial is the untuned default configuration
    points_to_evaluate: list[dict] = field(default_factory=list)  # further fixed trials (flat Optuna names)
    register_name: str | None = None  # MLflow registered model; None = "ood-ray-<method>", "" = don't register
    resume: bool = False
    max_trial_failures: int = 1  # Tune retries of a trial driver (Train retries workers itself)
    optuna_storage: str | None = None  # None = sqlite under the storage path (or the results folder)

    def validate(self) -> SweepConfig:
        def bad(name, why):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            bad("method", f"unknown method; choose one of: {', '.join(sorted(METHODS))}")
        self.base.method = self.method
        self.base.posthoc_search = True
        self.base.evaluate_test = False
        self.base.validate()

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        for key in ("num_trials", "max_trial_failures", "seed"):
            if not is_int(getattr(self, key)):
                bad(key, "must be an integer")
        if self.grace_period is not None and not is_int(self.grace_period):
            bad("grace_period", "must be an integer (or unset: a quarter of the epochs)")
        for key in ("trial_cpus", "reduction_factor"):
            if not is_real(getattr(self, key)):
                bad(key, "must be a finite number")
        if self.concurrency is not None and not is_int(self.concurrency):
            bad("concurrency", "must be an integer (or unset)")
        if self.gpus_per_worker is not None and not is_real(self.gpus_per_worker):
            bad("gpus_per_worker", "must be a finite number (or unset)")
        if self.name is not None and not isinstance(self.name, str):
            bad("name", "must be a string")
        if self.max_trial_failures < 0 or self.seed < 0:
            bad("max_trial_failures" if self.max_trial_failures < 0 else "seed", "must be >= 0")
        if self.num_trials < 1:
            bad("num_trials", "must be an integer >= 1")
        if self.concurrency is not None and self.concurrency < 1:
            bad("concurrency", "must be >= 1 (or unset: derived from the cluster)")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            bad("gpus_per_worker", "must be >= 0")
        if not self.trial_cpus > 0:
            bad("trial_cpus", "must be > 0 (fractions such as 0.5 are fine)")
        if self.grace_period is not None and not 1 <= self.grace_period <= self.base.epochs:
            bad("grace_period", f"must lie in [1, epochs={self.base.epochs}]")
        if not self.reduction_factor > 1:
            bad("reduction_factor", "must be > 1")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            bad("name", "use letters, digits, '.', '_' and '-' (it names a folder)")
        if self.trial_runner not in ("auto", "tune", "train"):
            bad("trial_runner", "choose auto, tune (the loop in the Tune trial, one worker) or train (a Ray Train TorchTrainer)")
        if self.trial_runner == "tune" and self.base.num_workers != 1:
            bad("trial_runner", f"'tune' runs the loop in the trial itself, so it needs num_workers=1 (got {self.base.num_workers})")
        return self

    @property
    def grace(self) -> int:
        """ASHA's first rung. Unset: a quarter of the epochs (at least 1). At epoch 1 most trials
        are still below the accuracy guard, so a rung there ranks them by early accuracy rather than
        by the objective; bench/asha_grace.py measured the quarter as the better default."""
        return self.grace_period if self.grace_period is not None else max(1, self.base.epochs // 4)

    @property
    def runner(self) -> str:
        """How each trial trains: ``tune`` (in the trial's own process) or ``train`` (TorchTrainer)."""
        if self.trial_runner != "auto":
            return self.trial_runner
        return "tune" if self.base.num_workers == 1 else "train"

    @property
    def storage_path(self) -> str:
        return self.base.storage_path

    def optuna_url(self, name: str) -> str:
        if self.optuna_storage:
            return self.optuna_storage
        folder = Path(self.storage_path) if "://" not in self.storage_path else results_dir()
        (folder / "optuna").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'optuna' / (name + '.db')}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["base"] = self.base.to_dict()
        return d


# ---------------------------------------------------------------------------
# search space (module level: OptunaSearch pickles it with plain pickle)
# ---------------------------------------------------------------------------
class SearchSpace:
    """Define-by-run space: learning rate and weight decay, then the method's own parameters.

    The learning rate is searched log-uniformly in [lr/10, 4·lr] around the base config's
    ``lr`` (0.005–0.2 for the default 0.05), so the range suits SGD and AdamW alike.
    """

    def __init__(self, method: str, lr: float = 0.05):
        self.method = method
        self.lr = lr

    def __call__(self, trial) -> dict:
        lr = trial.suggest_float("lr", self.lr / LR_BELOW, self.lr * LR_ABOVE, log=True)
        wd = trial.suggest_float("weight_decay", *WD_RANGE, log=True)
        return {"lr": lr, "weight_decay": wd, "method_params": METHODS[self.method].search_space(trial)}

    def describe(self) -> dict:
        """The space as a plain dict (for the parent run), read off a recording Optuna trial."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask()
        self(trial)
        return {name: repr(dist) for name, dist in trial.distributions.items()}


class SweepSearch(OptunaSearch):
    """OptunaSearch that tolerates a resumed trial the study already recorded as finished.

    Tune snapshots its experiment state every few seconds, the Optuna study on every ``tell``.
    A driver killed in between leaves a trial finished in the study but running in Tune's
    snapshot; on ``--resume`` Tune runs it again (Ray Train restores its final checkpoint and
    reports it once more), and stock OptunaSearch would fail reporting to a finished trial.
    """

    def _finished_in_study(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return False
        return self._ot_study.trials[ot_trial.number].state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict):
        if not self._finished_in_study(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if self._finished_in_study(trial_id):
            self._completed_trials.add(trial_id)
            return
        if result and result.get("diverged"):  # a NaN/inf loss: FAIL in the study, not PRUNED
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def default_point(method: str, base: TrainConfig) -> dict:
    """The untuned default configuration, in the space's flat parameter names."""
    import optuna

    trial = optuna.create_study().ask()
    keys = set(SearchSpace(method, base.lr)(trial)["method_params"])
    defaults = {**METHODS[method].defaults, **base.method_params}
    return {"lr": base.lr, "weight_decay": base.weight_decay, **{k: defaults[k] for k in keys}}


def flat_point(config: dict, like: dict) -> dict:
    """A trial's TrainConfig dict in the flat names of ``like`` (a point of the space)."""
    return {k: config[k] if k in ("lr", "weight_decay") else config["method_params"].get(k) for k in like}


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------
# MLflow record (a Tune callback: runs in this driver process)
# ---------------------------------------------------------------------------
class SweepRecorder(tune.Callback):
    """One child MLflow run per trial under the sweep's parent run; resume-safe, outage-tolerant.

    Tune's results are kept here until MLflow has them: a trial's run is found again by its trial
    id (after ``--resume`` too), only epochs not yet logged are logged, so a trial that was
    interrupted and resumed shows one continuous history. When MLflow does not answer, training
    goes on; the recorder retries every ``retry_after_s`` seconds and logs everything it missed once
    the server answers again. ``backfill`` replays what Tune stored on disk (after a resume, or to
    catch up at the end of the sweep).
    """

    retry_after_s = 30.0

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str, epochs: int, num_trials: int):
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent_run_id
        self.sweep_name, self.epochs, self.num_trials = sweep_name, epochs, num_trials
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.logged: dict[str, int] = {}  # trial id -> last epoch MLflow has
        self.configs: dict[str, dict] = {}  # trial id -> Tune config (to create its run)
        self.pending: dict[str, dict[int, dict]] = {}  # trial id -> epoch -> metrics not yet logged
        self.ends: dict[str, tuple[str, str]] = {}  # trial id -> (status, outcome) not yet written
        self.client = MlflowClient(uri)
        self.down_since: float | None = None
        self.failed_writes = 0

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        d = self.__dict__.copy()
        d["client"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.client = MlflowClient(self.uri)

    # --- what Tune tells us -------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.configs[trial.trial_id] = trial.config
        self.sync()
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        say(f"trial {trial.trial_id} started ({done}/{self.num_trials} done); MLflow run {self.runs.get(trial.trial_id, '(not created yet)')}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, epoch = trial.trial_id, int(result.get("epoch", 0))
        self.configs[tid] = trial.config
        if epoch > self.logged.get(tid, 0):
            metrics = {k: v for k, v in result.items() if self.is_metric(k)}
            ckpt = checkpoint_of(result, trial.path)
            if ckpt:
                metrics["ood_ray.checkpoint"] = ckpt
            self.pending.setdefault(tid, {})[epoch] = metrics
        self.sync()
        if result.get("diverged"):
            say(f"trial {tid}: {result['diverged']}")
        else:
            say(f"trial {tid} epoch {epoch}/{self.epochs}: objective {result.get('objective', math.nan):.4f}  val_acc {result.get('val_acc', math.nan):.4f}  val_auroc {result.get('val_auroc', math.nan):.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.configs[trial.trial_id] = trial.config
        status, note = end_of(trial.last_result or {}, self.epochs)
        self.ends[trial.trial_id] = (status, note)
        self.sync()
        say(f"trial {trial.trial_id} {note}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.configs[trial.trial_id] = trial.config
        error = trial_error(trial)
        self.ends[trial.trial_id] = ("FAILED", f"failed: {error}"[:5000])
        self.sync()
        say(f"trial {trial.trial_id} FAILED: {error[:500]}")

    def backfill(self, grid) -> None:
        """Queue everything Tune stored for the trials of ``grid`` that MLflow may not have yet."""
        for result in grid:
            tid = trial_id_of(result)
            if result.config:
                self.configs.setdefault(tid, result.config)
            df = result.metrics_dataframe
            rows = df.to_dict("records") if df is not None else []
            for row in rows:
                epoch = int(row.get("epoch", 0) or 0) if row.get("epoch") == row.get("epoch") else 0
                if epoch <= 0:
                    continue
                metrics = {k: v for k, v in row.items() if self.is_metric(k) and isinstance(v, int | float) and math.isfinite(v)}
                ckpt = checkpoint_of(row, result.path)
                if ckpt:
                    metrics["ood_ray.checkpoint"] = ckpt
                self.pending.setdefault(tid, {})[epoch] = metrics
            m = result.metrics or {}
            if result.error:
                self.ends.setdefault(tid, ("FAILED", f"failed: {str(result.error).strip().splitlines()[-1] if str(result.error).strip() else 'error'}"[:5000]))
            else:
                self.ends.setdefault(tid, end_of(m, self.epochs))

    # --- writing to MLflow --------------------------------------------------------------------
    @staticmethod
    def is_metric(key: str) -> bool:
        return key.startswith(("val_", "train_", "state_", "chosen_", "skipped_")) or key in METRIC_KEYS

    @property
    def unlogged(self) -> int:
        """Records (epochs and run endings) MLflow does not have yet."""
        return sum(len(v) for v in self.pending.values()) + len(self.ends)

    def sync(self, force: bool = False) -> bool:
        """Write everything pending; False (with a warning the first time) while MLflow is down."""
        if not force and self.down_since is not None and time.monotonic() - self.down_since < self.retry_after_s:
            return False
        try:
            for tid in sorted(set(self.pending) | set(self.ends) | (set(self.configs) - set(self.runs))):  # new trials get their run at once
                self._sync_trial(tid)
        except Exception as e:  # noqa: BLE001 - an MLflow outage must not stop the training
            self.failed_writes += 1
            if self.down_since is None:
                warnings.warn(
                    f"MLflow at {self.uri} failed ({type(e).__name__}: {str(e)[:300]}); training goes on, results stay in Ray's "
                    f"storage and are logged when MLflow answers again (retrying every {self.retry_after_s:.0f} s)",
                    stacklevel=2,
                )
            self.down_since = time.monotonic()
            return False
        if self.down_since is not None:
            say("MLflow answers again; the records it missed are logged")
        self.down_since = None
        return True

    def _sync_trial(self, tid: str) -> None:
        run_id = self.run_of(tid)
        if run_id is None:
            return
        for epoch in sorted(self.pending.get(tid, {})):
            metrics = self.pending[tid][epoch]
            if epoch > self.logged.get(tid, 0):
                tracking.log_metrics(self.client, run_id, metrics, epoch)
                if "ood_ray.checkpoint" in metrics:
                    self.client.set_tag(run_id, "ood_ray.checkpoint", metrics["ood_ray.checkpoint"])
                self.logged[tid] = epoch
            del self.pending[tid][epoch]
        self.pending.pop(tid, None)
        if tid in self.ends:
            status, note = self.ends[tid]
            if self.client.get_run(run_id).info.status != status:
                self.client.set_tag(run_id, "ood_ray.outcome", note)
                self.client.set_terminated(run_id, status)
            del self.ends[tid]

    def run_of(self, tid: str) -> str | None:
        if tid in self.runs:
            return self.runs[tid]
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent}' and tags.`{TRIAL_TAG}` = '{tid}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            hist = self.client.get_metric_history(run_id, "epoch")
            self.logged[tid] = int(max((m.step for m in hist), default=0))
            if found[0].info.status != "RUNNING" and tid not in self.ends:
                self.client.update_run(run_id, status="RUNNING")
        elif tid in self.configs:
            cfg = trial_config(self.configs[tid])
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.sweep_name}-{tid}",
                tags={PARENT_TAG: self.parent, TRIAL_TAG: tid, SWEEP_TAG: self.sweep_name, "ood_ray.method": cfg.method},
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=tracking.params_of(cfg.to_dict()))
            self.logged[tid] = 0
        else:
            return None
        self.runs[tid] = run_id
        return run_id


METRIC_KEYS = ("objective", "epoch", "lr", "eval_time_s", "start_epoch", "posthoc_candidates", "temperature", "worker_rss_mb")


def end_of(last: dict, epochs: int) -> tuple[str, str]:
    """MLflow status and outcome of a trial that Tune ended without an error."""
    epoch = int(last.get("epoch", 0) or 0)
    if last.get("diverged"):
        return "FAILED", f"failed: {last['diverged']}"
    if epoch < epochs:
        return "KILLED", f"stopped early by ASHA after epoch {epoch} of {epochs}"
    return "FINISHED", "completed"


def checkpoint_of(report: dict, trial_path: str) -> str | None:
    """Where a report's checkpoint lies: the Ray Train run's own path (``checkpoint_path``, a
    "train" trial) or the checkpoint folder Tune wrote in the trial's folder (a "tune" trial)."""
    path = report.get("checkpoint_path")
    if isinstance(path, str):
        return path
    name = report.get("checkpoint_dir_name")
    return f"{trial_path.rstrip('/')}/{name}" if isinstance(name, str) and name else None


def trial_id_of(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    return tid or Path(result.path).name.removeprefix("trial_")


def trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error (see the Tune trial folder)"


def say(line: str) -> None:
    sys.stdout.write(f"[ood-ray] {line}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    best: dict  # the best trial: trial_id, config (TrainConfig dict), val metrics, checkpoint
    default: dict | None  # the untuned default trial, same keys (None when not included)
    test_metrics: dict
    pareto: list[dict]
    trials: list[dict]  # every trial: trial_id, status, epochs, objective, checkpoint
    wall_time_s: float
    experiment_path: str
    model_uri: str | None
    artifacts: list[str]


def resources_per_trial(sweep: SweepConfig, gpus_per_worker: float) -> dict:
    """What one trial holds: its worker(s), plus the trial driver when a TorchTrainer runs them."""
    base = sweep.base
    driver = sweep.trial_cpus if sweep.runner == "train" else 0.0  # a "tune" trial is its own worker
    return {
        "CPU": driver + base.num_workers * base.cpus_per_worker,
        "GPU": base.num_workers * gpus_per_worker,
    }


def trial_resources(sweep: SweepConfig, gpus_per_worker: float) -> dict:
    """The Tune trial actor's own resources (a TorchTrainer's workers reserve theirs separately)."""
    if sweep.runner == "tune":
        return {"CPU": sweep.base.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    return {"CPU": sweep.trial_cpus}


def plan_concurrency(sweep: SweepConfig, cluster: dict, gpus_per_worker: float) -> int:
    """How many trials fit on the cluster at once (the Train workers of a trial start together)."""
    need = resources_per_trial(sweep, gpus_per_worker)
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if need["GPU"] > have_gpu:
        raise ConfigError(
            f"gpus_per_worker={gpus_per_worker} x num_workers={sweep.base.num_workers} needs {need['GPU']:g} GPUs per trial; "
            f"the cluster has {have_gpu:g}"
        )
    if need["CPU"] > have_cpu:
        driver = f"trial_cpus={sweep.trial_cpus} + " if sweep.runner == "train" else ""
        raise ConfigError(
            f"a trial needs {need['CPU']:g} CPUs ({driver}num_workers={sweep.base.num_workers} x "
            f"cpus_per_worker={sweep.base.cpus_per_worker}); the cluster has {have_cpu:g}"
        )
    fit = int(have_cpu // need["CPU"])
    if need["GPU"] > 0:
        fit = min(fit, int(have_gpu // need["GPU"]))
    fit = max(1, min(fit, sweep.num_trials))
    return min(fit, sweep.concurrency) if sweep.concurrency else fit


def latest_sweep(storage_path: str, method: str) -> str:
    root = Path(storage_path)
    found = sorted((p for p in root.glob(f"{method}-sweep-*") if (p / "tuner.pkl").exists()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"resume: no {method} sweep to resume under {storage_path} (pass --name)")
    return found[-1].name


def find_parent(client: MlflowClient, experiment_id: str, name: str):
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`ood_ray.kind` = 'sweep'", max_results=1)
    return runs[0] if runs else None


def run_sweep(sweep: SweepConfig) -> SweepOutcome:
    """Run (or with ``resume`` continue) a sweep; returns the best trial and where everything is."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from .train import ensure_ray, load_benchmark

    t0 = time.perf_counter()
    sweep.validate()
    base = sweep.base
    bench = load_benchmark(base, verify=True)
    if not bench.ood_val:
        raise ConfigError(f"data={bench.path}: a sweep's objective needs validation OOD sets (role 'ood-val'); the benchmark has none")
    tracking.check_tracking(base.mlflow_uri)
    if sweep.resume and not sweep.name:
        sweep.name = latest_sweep(base.storage_path, sweep.method)
    name = sweep.name or f"{sweep.method}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep.name = name
    exp_path = f"{base.storage_path.rstrip('/')}/{name}"
    client = MlflowClient(base.mlflow_uri)
    exp_id = tracking.ensure_experiment(client, base.experiment)
    parent = find_parent(client, exp_id, name)
    if sweep.resume:
        if "://" not in exp_path and not Path(exp_path, "tuner.pkl").exists():
            raise ConfigError(f"resume: {exp_path} holds no sweep to resume (no tuner.pkl)")
    elif parent is not None or ("://" not in exp_path and Path(exp_path).exists()):
        raise ConfigError(f"name={name!r}: a sweep of that name exists in {exp_path}; pass --resume to continue it or choose another name")
    space = SearchSpace(sweep.method, base.lr)
    if parent is None:
        parent = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: name, "ood_ray.kind": "sweep", "ood_ray.method": sweep.method})
        args = {k: v for k, v in sweep.to_dict().items() if k != "base"}
        args["trial_runner"] = sweep.runner  # the path chosen, also when it was "auto"
        args["grace_period"] = sweep.grace  # the value used, also when it was derived
        client.log_batch(parent.info.run_id, params=tracking.params_of({**args, "base": base.to_dict()}))
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "search_space.json").write_text(json.dumps({"space": space.describe(), "posthoc_grid": METHODS[sweep.method].posthoc_grid()}, indent=2) + "\n")
            Path(tmp, "sweep.json").write_text(json.dumps(sweep.to_dict(), indent=2, default=str) + "\n")
            client.log_artifacts(parent.info.run_id, tmp)
    else:
        # the restored trials keep the path they started on (sweeps before trial_runner: "train")
        started = parent.data.params.get("trial_runner", "train")
        if started != sweep.runner:
            raise ConfigError(
                f"resume: sweep {name!r} started its trials with trial_runner={started!r}, this command would use {sweep.runner!r}; "
                f"pass the same --num-workers (and --trial-runner) as when the sweep started"
            )
        client.update_run(parent.info.run_id, status="RUNNING")
    parent_id = parent.info.run_id
    say(f"sweep {name!r}: MLflow parent run {parent_id} in experiment {base.experiment!r} at {base.mlflow_uri}")
    say(f"sweep folder {exp_path}; Optuna study {sweep.optuna_url(name)}")

    try:
        ensure_ray()
        cluster = ray.cluster_resources()
        gpus = sweep.gpus_per_worker if sweep.gpus_per_worker is not None else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
        concurrency = plan_concurrency(sweep, cluster, gpus)
        how = "automatic" if sweep.trial_runner == "auto" else "--trial-runner"
        if sweep.asha:
            say(f"ASHA may stop trials from epoch {sweep.grace} on (rungs at epochs {sweep.grace}, {sweep.grace * sweep.reduction_factor:g}, ...)")
        if sweep.runner == "tune":
            say(f"{sweep.num_trials} trials of {base.epochs} epochs, {concurrency} at a time; each trains in its Tune trial process (1 worker; {how})")
        else:
            say(f"{sweep.num_trials} trials of {base.epochs} epochs, {concurrency} at a time; each runs a Ray Train TorchTrainer with {base.num_workers} workers ({how})")
        metric = objective_metrics(base.objective)
        multi = len(metric) > 1
        points = ([default_point(sweep.method, base)] if sweep.include_default else []) + list(sweep.points_to_evaluate)
        searcher = SweepSearch(
            space=space,
            metric=metric if multi else metric[0],
            mode=["max"] * len(metric) if multi else "max",
            points_to_evaluate=points or None,
            seed=sweep.seed,
            storage=optuna.storages.RDBStorage(sweep.optuna_url(name)),
            study_name=name,
        )
        scheduler = (
            ASHAScheduler(metric="objective", mode="max", time_attr="training_iteration", max_t=base.epochs, grace_period=sweep.grace, reduction_factor=sweep.reduction_factor)
            if sweep.asha
            else None
        )
        # Tune saves its experiment state at most this often (default: >= 10 s); what a killed
        # driver leaves behind is at most this old, so --resume loses at most this much.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        trainable = tune.with_resources(tune.with_parameters(run_trial, benchmark=bench.to_spec()), trial_resources(sweep, gpus))
        # A "tune" trial is its own worker, so the worker retries (max_failures) are Tune's to make.
        retries = max(sweep.max_trial_failures, base.max_failures) if sweep.runner == "tune" else sweep.max_trial_failures
        recorder = SweepRecorder(base.mlflow_uri, exp_id, parent_id, name, base.epochs, sweep.num_trials)
        if sweep.resume:
            say(f"resuming sweep {name!r} from {exp_path}")
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"base": base.to_dict(), "sweep_name": name, "gpus_per_worker": gpus, "runner": sweep.runner},
                tune_config=tune.TuneConfig(
                    num_samples=sweep.num_trials, search_alg=searcher, scheduler=scheduler, max_concurrent_trials=concurrency, trial_dirname_creator=trial_dirname,
                    # A finished trial's actor (its process, torch and ood_ray imported) runs the next
                    # trial: one process start and its imports less per trial. A "tune" trial that
                    # ASHA stops ends its loop at its next step (TuneWorker.stop_requested); a
                    # "train" trial it stops is still inside trainer.fit(), so its actor cannot be
                    # reset for reuse.
                    reuse_actors=sweep.runner == "tune" or not sweep.asha,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=base.storage_path,
                    callbacks=[recorder],
                    failure_config=tune.FailureConfig(max_failures=retries),
                    # a "tune" trial's checkpoints: its last two, as a TorchTrainer keeps its own
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    verbose=0,
                ),
            )
        threading.Thread(target=preload_finish_imports, name="ood-ray-preload", daemon=True).start()
        grid = tuner.fit()
        relog_hint = (
            f"The sweep's trials are complete in {exp_path}. When MLflow answers again, run the same command with "
            f"--resume --name {name}: nothing is trained again, the missing records are logged and the best model is registered."
        )
        # catch up from what Tune stored: records missed during an MLflow outage, or before a resume
        catch_up = SweepRecorder(base.mlflow_uri, exp_id, parent_id, name, base.epochs, sweep.num_trials)
        catch_up.backfill(grid)
        if not catch_up.sync(force=True):
            raise tracking.TrackingError(f"MLflow at {base.mlflow_uri} does not answer; {catch_up.unlogged} records are not logged. {relog_hint}")
        close_orphans(sweep, client, parent_id, {trial_id_of(r) for r in grid})
        try:
            outcome = finish_sweep(sweep, grid, client, parent_id, exp_path, multi, gpus, t0)
        except Exception as e:
            if tracking.is_unreachable(e):
                raise tracking.TrackingError(f"MLflow at {base.mlflow_uri} failed while recording the result ({type(e).__name__}: {str(e)[:300]}). {relog_hint}") from e
            raise
    except BaseException as e:
        try:
            client.set_tag(parent_id, "ood_ray.error", f"{type(e).__name__}: {e}"[:5000])
            client.set_terminated(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        except Exception as also:  # noqa: BLE001 - MLflow itself may be what failed; keep the first error
            warnings.warn(f"could not mark the MLflow parent run {parent_id} as failed ({type(also).__name__})", stacklevel=2)
        raise
    return outcome


def preload_finish_imports() -> None:
    """Import what the end of a sweep needs (matplotlib and Optuna's plots, MLflow's pyfunc flavour)
    while the trials run: the driver is idle then, and the sweep's tail no longer waits for them."""
    with contextlib.suppress(Exception):  # only a head start: finish_sweep imports them anyway
        from optuna.visualization import matplotlib  # noqa: F401

        from . import plots, serve  # noqa: F401


def close_orphans(sweep: SweepConfig, client: MlflowClient, parent_id: str, known: set) -> None:
    """After a resumed sweep: close what a killed driver started but Tune never saved.

    Such a trial is unknown to the restored Tuner, so it never runs again: its Optuna trial is
    marked FAIL and its MLflow run KILLED, both saying why, instead of staying RUNNING for ever.
    """
    import optuna

    study = optuna.load_study(study_name=sweep.name, storage=sweep.optuna_url(sweep.name))
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            say(f"Optuna trial {t.number} was interrupted before the sweep's state was saved; marked FAIL")
    exp = client.get_run(parent_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"):
        if run.data.tags.get(TRIAL_TAG) not in known:
            client.set_tag(run.info.run_id, "ood_ray.outcome", "interrupted before the sweep's state was saved; not resumed")
            client.set_terminated(run.info.run_id, "KILLED")


def summarize(result) -> dict:
    m = dict(result.metrics or {})
    cfg = trial_config(result.config) if result.config else None
    if result.error or m.get("diverged"):
        status = "error"
    else:
        status = "completed" if cfg and m.get("epoch") == cfg.epochs else "stopped early"
    return {
        "trial_id": trial_id_of(result),
        "status": status,
        "epochs": int(m.get("epoch", 0) or 0),
        "objective": m.get("objective"),
        "val_acc": m.get("val_acc"),
        "val_auroc": m.get("val_auroc"),
        "checkpoint": checkpoint_of(m, result.path),
        "config": cfg.to_dict() if cfg else None,
        "metrics": {k: v for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)},
        "error": str(result.error)[:2000] if result.error else m.get("diverged"),
    }


def pareto_front(rows: list[dict], keys=("val_acc", "val_auroc")) -> list[dict]:
    """Rows not dominated on ``keys`` (all maximised)."""
    front = []
    for r in rows:
        v = [r[k] for k in keys]
        dominated = any(all(o[k] >= x for k, x in zip(keys, v, strict=True)) and any(o[k] > x for k, x in zip(keys, v, strict=True)) for o in rows)
        if not dominated:
            front.append(r)
    return front


def finish_sweep(sweep: SweepConfig, grid, client: MlflowClient, parent_id: str, exp_path: str, multi: bool, gpus: float, t0: float) -> SweepOutcome:
    base = sweep.base
    trials = [summarize(r) for r in grid]
    done = [t for t in trials if t["status"] == "completed" and t["objective"] is not None and math.isfinite(t["objective"])]
    if not done:
        errors = "; ".join(f"{t['trial_id']}: {t['error'] or t['status']}" for t in trials)[:3000]
        raise RuntimeError(f"sweep {sweep.name!r}: no trial completed all {base.epochs} epochs ({errors})")
    pareto = pareto_front(done) if multi else []
    pool = [t for t in pareto if t["val_acc"] >= base.min_val_acc] or pareto if multi else done
    best = max(pool, key=lambda t: (t["objective"], t["val_auroc"] or 0))
    default = None
    if sweep.include_default:
        point = default_point(sweep.method, base)
        default = next((t for t in trials if t["config"] and flat_point(t["config"], point) == point), None)
    say(f"best trial {best['trial_id']}: objective {best['objective']:.4f} (val_acc {best['val_acc']:.4f}, val_auroc {best['val_auroc']:.4f})")
    if default is not None and default["objective"] is not None:
        say(f"untuned default trial {default['trial_id']}: objective {default['objective']:.4f}")
    register = f"ood-ray-{sweep.method}" if sweep.register_name is None else sweep.register_name
    best_run = find_trial_run(client, parent_id, best["trial_id"])
    with ThreadPoolExecutor(1) as pool:
        # the model is logged and registered (mostly file copies and MLflow calls) while this
        # thread scores the test split and draws the plots
        logging_model = pool.submit(log_best_model, client, best_run, best["checkpoint"], register or None) if best_run else None
        if gpus > 0:  # on a GPU of the cluster: the driver's node may have none
            say("evaluating the best trial on the test split (a Ray task with a GPU)")
            task = ray.remote(evaluate_checkpoint).options(num_cpus=sweep.trial_cpus, num_gpus=min(gpus, 1.0))
            evaluation = ray.get(task.remote(best["checkpoint"], base.eval_batch_size))
        else:  # CPU only: every trial has ended, so this process may use the CPUs (no process to start)
            say("evaluating the best trial on the test split")
            evaluation = evaluate_checkpoint(best["checkpoint"], base.eval_batch_size)
        test_metrics = evaluation["test"]
        artifacts = write_artifacts(sweep, client, parent_id, trials, best, default, evaluation)
        model_uri = logging_model.result() if logging_model else None
    metrics = {f"best_{k}": v for k, v in best["metrics"].items() if k.startswith("val_") or k in ("objective", "temperature") or k.startswith("chosen_")}
    metrics.update({f"best_{k}": v for k, v in test_metrics.items()})
    if default is not None:
        metrics.update({f"default_{k}": v for k, v in default["metrics"].items() if k in ("objective", "val_acc", "val_auroc", "val_fpr95")})
    metrics["trials_completed"] = len(done)
    metrics["trials_stopped_early"] = sum(t["status"] == "stopped early" for t in trials)
    metrics["trials_failed"] = sum(t["status"] == "error" for t in trials)
    wall = time.perf_counter() - t0
    metrics["wall_time_s"] = wall
    tracking.log_metrics(client, parent_id, metrics, step=0)
    client.set_tag(parent_id, "ood_ray.best_trial", best["trial_id"])
    client.set_tag(parent_id, "ood_ray.best_checkpoint", best["checkpoint"])
    if best_run is not None:
        client.set_tag(parent_id, "ood_ray.best_run", best_run)
    if model_uri:
        client.set_tag(parent_id, "ood_ray.model_uri", model_uri)
    client.set_terminated(parent_id, "FINISHED")
    return SweepOutcome(sweep.name, parent_id, best, default, test_metrics, pareto, trials, wall, exp_path, model_uri, artifacts)


def find_trial_run(client: MlflowClient, parent_id: str, trial_id: str) -> str | None:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def log_best_model(client: MlflowClient, run_id: str, checkpoint_path: str, register: str | None) -> str:
    """Log the best checkpoint as a pyfunc model in its trial's run and register it."""
    import mlflow

    from .serve import log_ood_model

    mlflow.set_tracking_uri(client.tracking_uri)
    with ray.train.Checkpoint(checkpoint_path).as_directory() as d, mlflow.start_run(run_id=run_id):
        info = log_ood_model(d, name="model", registered_model_name=register)
    client.set_terminated(run_id, client.get_run(run_id).info.status)
    uri = f"models:/{register}/{info.registered_model_version}" if register and info.registered_model_version else info.model_uri
    say(f"best model logged: {info.model_uri}" + (f", registered as {uri}" if register else ""))
    return uri


def evaluate_checkpoint(checkpoint_path: str, batch_size: int) -> dict:
    """Test metrics of a checkpoint (single process) and the arrays the plots need."""
    import torch

    from .evaluate import collect, metrics_of, score_split
    from .train import load_benchmark, model_from_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the task was given one
    with ray.train.Checkpoint(checkpoint_path).as_directory() as d:
        model, meta, cfg = model_from_checkpoint(d)
    model = model.to(device)
    method = get_method(cfg.method, cfg.method_params)
    bench = load_benchmark(cfg)
    test_id, test_ood = score_split(model, method, bench, "test", 0, 1, device, batch_size)  # scored once
    test = metrics_of("test", method, bench, test_id, test_ood)
    with torch.no_grad():
        val = collect(model, method, bench.val, 0, 1, device, batch_size)
    temperature = float(model.head.temperature) if hasattr(model.head, "temperature") else None
    return {
        "test": test,
        "score": method.default_score,
        "test_id_scores": test_id[method.default_score],
        "test_ood_scores": {name: out[method.default_score] for name, out in test_ood.items()},
        "val_logits": val["logits"],
        "val_labels": val["labels"],
        "temperature": temperature,
        "method_params": method.params,
    }


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_table(test: dict) -> str:
    """Markdown table of the best trial's test metrics per OOD set, near, far and all."""
    sets = sorted({k[len("test_ood_") : -len("_auroc")] for k in test if k.startswith("test_ood_") and k.endswith("_auroc") and f"{k[: -len('_auroc')]}_fpr95" in test})
    cols = ("auroc", "fpr95", "fpr95_in", "aupr_in", "aupr_out")
    lines = ["| test OOD set | " + " | ".join(c.upper().replace("_", "-") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = [(s, f"test_ood_{s}_") for s in sets] + [(g, f"test_{g}_") for g in ("near", "far")] + [("all", "test_")]
    for label, pre in rows:
        if f"{pre}auroc" in test:
            lines.append(f"| {label} | " + " | ".join(f"{test.get(pre + c, math.nan):.4f}" for c in cols) + " |")
    lines.append("")
    lines.append(f"test accuracy {test.get('test_acc', math.nan):.4f}, ECE {test.get('test_ece', math.nan):.4f}, NLL {test.get('test_nll', math.nan):.4f}")
    return "\n".join(lines) + "\n"


def write_artifacts(sweep, client, parent_id, trials, best, default, evaluation) -> list[str]:
    """Plots and tables for the parent run; returns the artifact file names."""
    import optuna

    from . import plots

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        score = evaluation["score"]
        plots.roc_curves(evaluation["test_id_scores"], evaluation["test_ood_scores"], out / "roc_test.png", title=f"best trial {best['trial_id']}: ROC on test ({score})")
        plots.score_histograms(evaluation["test_id_scores"], evaluation["test_ood_scores"], out / "score_histograms_test.png", title=f"{score}: test ID vs each test OOD set")
        logits, labels = evaluation["val_logits"], evaluation["val_labels"]
        curves = {"as trained": softmax(logits)}
        t = evaluation["temperature"]
        if t is not None:
            curves = {"before calibration (T=1)": softmax(logits * t), f"after calibration (T={t:.4g})": softmax(logits)}
        plots.reliability_diagram(curves, labels, out / "reliability_val.png", title="validation ID reliability")
        (out / "test_table.md").write_text(f"# Best trial {best['trial_id']} on the test split ({score})\n\n" + test_table(evaluation["test"]))
        (out / "best_trial.json").write_text(json.dumps({k: best[k] for k in ("trial_id", "objective", "val_acc", "val_auroc", "checkpoint", "config")}, indent=2, default=str) + "\n")
        (out / "trials.json").write_text(json.dumps([{k: t_[k] for k in ("trial_id", "status", "epochs", "objective", "val_acc", "val_auroc", "checkpoint", "error")} for t_ in trials], indent=2, default=str) + "\n")
        try:
            study = optuna.load_study(study_name=sweep.name, storage=sweep.optuna_url(sweep.name))
            notes = plots.optuna_plots(study, out)
            for key, value in notes.items():
                if isinstance(value, str):
                    (out / f"{key}.txt").write_text(value + "\n")
        except Exception as e:  # noqa: BLE001 - plots are a convenience; say why they are missing
            (out / "optuna_plots.txt").write_text(f"Optuna plots not written: {type(e).__name__}: {e}\n")
        client.log_artifacts(parent_id, tmp)
        written = sorted(p.name for p in out.iterdir())
    return written


def format_outcome(o: SweepOutcome) -> str:
    lines = [
        f"sweep {o.name}: {len(o.trials)} trials in {o.wall_time_s:.0f}s ({sum(t['status'] == 'completed' for t in o.trials)} completed, "
        f"{sum(t['status'] == 'stopped early' for t in o.trials)} stopped early, {sum(t['status'] == 'error' for t in o.trials)} failed)",
        f"best trial {o.best['trial_id']}: objective {o.best['objective']:.4f}, val_acc {o.best['val_acc']:.4f}, val_auroc {o.best['val_auroc']:.4f}",
    ]
    if o.default is not None and o.default["objective"] is not None:
        lines.append(f"untuned default trial {o.default['trial_id']}: objective {o.default['objective']:.4f}")
    lines.append(f"best config: lr={o.best['config']['lr']:.4g} weight_decay={o.best['config']['weight_decay']:.3g} method_params={o.best['config']['method_params']}")
    lines.append(f"test: acc {o.test_metrics.get('test_acc', math.nan):.4f}  AUROC {o.test_metrics.get('test_auroc', math.nan):.4f}  FPR95 {o.test_metrics.get('test_fpr95', math.nan):.4f}")
    if o.pareto:
        lines.append("Pareto front (val_acc, val_auroc): " + ", ".join(f"{t['trial_id']} ({t['val_acc']:.4f}, {t['val_auroc']:.4f})" for t in o.pareto))
    lines.append(f"model: {o.model_uri}")
    lines.append(f"MLflow parent run {o.parent_run_id}; sweep folder {o.experiment_path}")
    return "\n".join(lines)
