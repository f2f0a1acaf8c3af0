"""Recording a sweep in MLflow from its driver (so a sqlite store is safe): ``SweepRecorder``, a
Ray Tune callback that keeps one child run per trial under the sweep's parent run, resume-safe and
tolerant of MLflow outages. (One training run's epochs: ``epochs.EpochLogger``.)
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray import tune

from ..progress import say
from . import liveness, provenance
from .store import log_metrics, params_of, set_tag

TRIAL_TAG = "ood_ray.trial_id"
SWEEP_TAG = "ood_ray.sweep"
PARENT_TAG = "mlflow.parentRunId"
#: Report keys recorded besides the val_/train_/state_/chosen_/skipped_ ones; every registered
#: method's ``calibration_keys`` are added (a method declares what its calibration returns).
METRIC_KEYS = ("objective", "epoch", "lr", "eval_time_s", "start_epoch", "posthoc_candidates", "worker_rss_mb")
METRIC_PREFIXES = ("val_", "train_", "state_", "chosen_", "skipped_", "detector_")
#: Report keys with a string value recorded as tags of the run (the post-hoc detector chosen).
TAG_KEYS = ("ood_ray.detector",)


@functools.cache
def calibration_keys() -> frozenset[str]:
    """Every registered method's ``calibration_keys`` (read once)."""
    from ..methods import METHODS  # the sweep driver has them imported already

    return frozenset(k for m in METHODS.values() for k in m.calibration_keys)


def is_metric(key: str) -> bool:
    """Whether a report key is one of ours (Tune adds its own: timestamps, pid, ...)."""
    return key.startswith(METRIC_PREFIXES) or key in METRIC_KEYS or key in calibration_keys()


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

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str, epochs: int, num_trials: int, config_of: Callable, bench=None):
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent_run_id
        self.dataset = provenance.dataset_input(bench, "tuning") if bench is not None else None  # each trial run's input
        self.config_of = config_of  # a trial's Tune config -> its TrainConfig (module level: pickled)
        self.sweep_name, self.epochs, self.num_trials = sweep_name, epochs, num_trials
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.logged: dict[str, int] = {}  # trial id -> last epoch MLflow has
        self.configs: dict[str, dict] = {}  # trial id -> Tune config (to create its run)
        self.pending: dict[str, dict[int, dict]] = {}  # trial id -> epoch -> metrics not yet logged
        self.ends: dict[str, tuple[str, str]] = {}  # trial id -> (status, outcome) not yet written
        self.seen: dict[str, int] = {}  # trial id -> its failures when it last started
        self.client = MlflowClient(uri)
        self.down_since: float | None = None
        self.failed_writes = 0

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        d = self.__dict__.copy()
        d["client"] = None
        return d

    def __setstate__(self, d):
        d.setdefault("seen", {})  # a recorder pickled by a sweep of an older version
        self.__dict__.update(d)
        self.client = MlflowClient(self.uri)

    # --- what Tune tells us -------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.configs[trial.trial_id] = trial.config
        self.sync()
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        failures, before = trial.num_failures, self.seen.get(trial.trial_id)
        self.seen[trial.trial_id] = failures
        if before is not None:  # again: a retry after a failure, or a PBT trial's next turn (silent: its epochs follow)
            if failures > before:
                epoch = (trial.last_result or {}).get("epoch")
                say(f"trial {trial.trial_id} restarts after failure {failures}" + (f" (last reported epoch {epoch})" if epoch else "") + " from its checkpoint")
            return
        say(f"trial {trial.trial_id} started ({done}/{self.num_trials} done); MLflow run {self.runs.get(trial.trial_id, '(not created yet)')}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, epoch = trial.trial_id, int(result.get("epoch", 0))
        self.configs[tid] = trial.config
        if epoch > self.logged.get(tid, 0):
            metrics = {k: v for k, v in result.items() if is_metric(k) or (k in TAG_KEYS and isinstance(v, str))}
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
                metrics = {k: v for k, v in row.items() if is_metric(k) and isinstance(v, int | float) and math.isfinite(v)}
                metrics.update({k: row[k] for k in TAG_KEYS if isinstance(row.get(k), str)})
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
                log_metrics(self.client, run_id, metrics, epoch)
                for key in ("ood_ray.checkpoint", *TAG_KEYS):
                    if key in metrics:
                        set_tag(self.client, run_id, key, metrics[key])
                self.logged[tid] = epoch
            del self.pending[tid][epoch]
        self.pending.pop(tid, None)
        if tid in self.ends:
            status, note = self.ends[tid]
            if self.client.get_run(run_id).info.status != status:
                set_tag(self.client, run_id, "ood_ray.outcome", note)
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
            reopen = found[0].info.status != "RUNNING" and tid not in self.ends
            if reopen or found[0].info.status == "RUNNING" or liveness.was_lost(found[0]):
                liveness.claim(self.client, found[0])  # this driver's now (a resumed sweep)
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
        elif tid in self.configs:
            cfg = self.config_of(self.configs[tid])
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.sweep_name}-{tid}",
                tags={PARENT_TAG: self.parent, TRIAL_TAG: tid, SWEEP_TAG: self.sweep_name, "ood_ray.method": cfg.method, **provenance.tags(), **liveness.driver_tags()},
            )
            run_id = run.info.run_id
            if self.dataset is not None:
                self.client.log_inputs(run_id, datasets=[self.dataset])
            self.client.log_batch(run_id, params=params_of(cfg.to_dict()))
            self.logged[tid] = 0
        else:
            return None
        self.runs[tid] = run_id
        return run_id


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


def find_trial_run(client: MlflowClient, parent_id: str, trial_id: str) -> str | None:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None
