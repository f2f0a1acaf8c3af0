"""``SweepConfig``: everything a sweep needs, checked before Ray starts."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, TrainConfig, results_dir
from ..methods import METHODS


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
    asha: bool = True  # the scheduler when ``scheduler`` is unset: ASHA (True) or none (False)
    scheduler: str | None = None  # "asha", "pbt", "pb2" or "none"; None = from ``asha``
    pbt_interval: int = 2  # PBT: epochs between a trial's exploit/explore steps
    grace_period: int | None = None  # epochs before ASHA may stop a trial; None = a quarter of the epochs (>= 1)
    reduction_factor: float = 2.0
    include_default: bool = True  # the first trial is the untuned default configuration
    points_to_evaluate: list[dict] = field(default_factory=list)  # further fixed trials (flat Optuna names)
    register_name: str | None = None  # MLflow registered model; None = "ood-ray-<method>", "" = don't register
    alias: str = "champion"  # registered-model alias set on the best trial's version ("" = none)
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

        if not isinstance(self.alias, str) or (self.alias and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,254}", self.alias) or self.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.alias))):
            bad("alias", "an MLflow alias: letters, digits, _ and -, starting with a letter or _, not 'latest' or v<number> ('' = none)")
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
        if self.scheduler not in (None, "asha", "pbt", "pb2", "none"):
            bad("scheduler", "choose asha (early stopping), pbt (Population Based Training), pb2 (PBT whose new values a GP bandit chooses) or none")
        if self.population_based:
            if not is_int(self.pbt_interval) or not 1 <= self.pbt_interval < self.base.epochs:
                bad("pbt_interval", f"PBT's interval is an integer number of epochs in [1, epochs - 1 = {self.base.epochs - 1}] (no step follows the last epoch)")
            if self.runner == "train":
                bad(
                    "scheduler",
                    "PBT restarts a trial from another trial's checkpoint, which Ray 2.60 can do only for a trial that trains in its own "
                    "Tune trial process: use --trial-runner tune (with --num-workers 1). A trial that runs a Ray Train TorchTrainer hands "
                    "Tune no checkpoint to clone (TuneReportCallback forwards only its path) and cannot start from a given one",
                )
        return self

    @property
    def scheduler_kind(self) -> str:
        """The trial scheduler: ``scheduler`` when given, else ``asha`` or ``none`` from ``asha``."""
        return self.scheduler or ("asha" if self.asha else "none")

    @property
    def population_based(self) -> bool:
        """PBT or PB2: trials continue from each other's checkpoints; no Optuna study."""
        return self.scheduler_kind in ("pbt", "pb2")

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
