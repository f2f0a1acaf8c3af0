"""What a sweep costs besides training: Ray Tune [+ Train] against the same trials in-process.

    python bench/tune_overhead.py                      # every side, K=4 trials of 2 epochs, dismax
    python bench/tune_overhead.py --sides tune1 seq    # one-worker trials only
    # the older settings of the Train path (Ray's 2 s poll, preemption watcher, no actor reuse):
    python bench/tune_overhead.py --sides train2 seq --env RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2 \
        --env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 --tune-config reuse_actors=false

Prints ONE JSON object on stdout (everything else, Ray's output included, goes to stderr), whose
``figures`` are the four numbers the sweep path is judged by:

* ``one_worker_overhead_per_trial_s``: K one-worker trials through ``ood_ray.tune.run_sweep``
  (``trial_runner="tune"``: the loop runs in the Tune trial itself) against the same K trials in
  this process (plain Optuna, ``study.optimize`` over ``ood_ray.train.train_local``, the same
  ``train_loop``), per trial, each side's own measured compute (Σ ``train_time_s`` +
  ``eval_time_s`` of its reports) taken out first and the sweep's fixed costs excluded;
* ``two_worker_overhead_per_trial_s``: the same K trials with two workers each
  (``trial_runner="train"``: a Ray Train ``TorchTrainer`` per trial, each worker half the CPUs);
* ``fixed_per_sweep_s``: the quickstart sweep's costs outside its trials (driver set-up,
  ``ray.init`` of a fresh local Ray, Tune start and stop, the MLflow catch-up, the best trial's test
  evaluation, plots and tables, model logging and registration);
* ``quickstart_compute_fraction``: ``python jobs/tune_dismax.py`` as the README runs it (the CLI's
  tune defaults, 8 trials x 8 epochs, ASHA), Σ train + eval time over every trial's reports ÷ the
  sweep's wall time.

The overhead sides run the SAME K configurations (``--trials`` points drawn once from the sweep's
search space with a seeded random sampler; same base config and seeds; ASHA off; concurrency 1;
nothing registered). Sides run in the order given by ``--sides`` (default: quickstart first, on a
fresh Ray, as a user's first sweep; then the one-worker, two-worker and in-process sides).

A breakdown per side is measured from timestamps written by light instrumentation
(``--no-instrument``: totals only):

* in the driver: ``ensure_ray``, ``Tuner.fit``, ``finish_sweep`` and its parts (test evaluation,
  artifacts, model logging), and the ``SweepRecorder`` hooks (when Tune saw each trial
  start/report/end, and MLflow write time);
* in each trial actor: process creation time, entry of the trainable, its imports, its reports
  (one-worker trials), ``fit()`` (two-worker trials);
* in each Train controller (an extra internal callback): controller start, worker-group start
  (placement group + worker actors, then train context + torch process group + callbacks),
  train-fn launch, each report reaching the controller, worker-group shutdown, controller end;
* in each Train worker: process creation time, entry of the train fn, its imports, each
  ``ray.train.report`` call and return (checkpoint upload), exit.

A sampler thread also adds up the CPU seconds of every Ray process by role (trial actor, Tune's
queue actor, Train controller, workers, Train's helper actors, Ray's daemons): far less noisy than
wall time on a shared machine, and it counts the processes each trial starts.

Variants: ``--env K=V`` (set before Ray starts; every local Ray process inherits it),
``--tune-config K=V`` (a keyword of run_sweep's ``tune.TuneConfig``, e.g. ``reuse_actors=true``),
``--concurrency``, ``--sequential-from`` (an earlier run's in-process side).

Targets: one-worker trials <= 3 s overhead per trial, two-worker trials <= 10 s, fixed per-sweep
cost <= 12 s, quickstart compute fraction >= 0.5 on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# output: stdout carries exactly one JSON object


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import capture_stdout, emit  # noqa: E402
from _common import log as _common_log  # noqa: E402


def log(msg: str) -> None:
    _common_log(msg, "tune-overhead")


# ---------------------------------------------------------------------------------------------
# instrumentation: JSON lines appended to one file by every process (all on this machine).
# These functions are defined in __main__, so cloudpickle ships them by value to Ray's processes.

EVENTS_PATH: str | None = None


def rec(ev: str, **kw) -> None:
    if not EVENTS_PATH:
        return
    line = json.dumps({"t": kw.pop("t", time.time()), "ev": ev, "pid": os.getpid(), **kw}, default=str) + "\n"
    with open(EVENTS_PATH, "a") as f:  # one short O_APPEND write per event: lines do not interleave
        f.write(line)


def proc_info() -> dict:
    import psutil

    p = psutil.Process()
    c = p.cpu_times()
    return {"proc_created": p.create_time(), "cpu_s": round(c.user + c.system, 3)}


def timed_train_loop_per_worker(config: dict) -> None:
    """Train worker: the project's ``train_loop_per_worker`` with timestamps around it."""
    t_enter = time.time()
    import ray.train

    name = ray.train.get_context().get_experiment_name()
    rec("worker_enter", t=t_enter, run=name, **proc_info())
    t0 = time.time()
    import ood_ray.train as otr

    rec("worker_imported", run=name, dur=time.time() - t0)
    if not getattr(otr.RayWorker, "_bench_timed", False):
        orig_report = otr.RayWorker.report

        def report(self, metrics, checkpoint_dir):
            rec("worker_report_call", run=name, epoch=metrics.get("epoch"), train_time_s=metrics.get("train_time_s"), eval_time_s=metrics.get("eval_time_s"), rank=self.rank)
            orig_report(self, metrics, checkpoint_dir)
            rec("worker_report_return", run=name, epoch=metrics.get("epoch"), rank=self.rank)

        otr.RayWorker.report = report
        otr.RayWorker._bench_timed = True
    getattr(otr, "_bench_orig_loop", otr.train_loop_per_worker)(config)
    rec("worker_exit", run=name, **proc_info())


def make_timing_callback():
    """A Ray Train internal callback (controller + worker group + report hooks) that records times."""
    from ray.train.v2._internal.execution.callback import (
        ControllerCallback,
        ReportCallback,
        WorkerGroupCallback,
    )

    class TimingCallback(ControllerCallback, WorkerGroupCallback, ReportCallback):
        def __init__(self):
            self.run = None

        def after_controller_start(self, train_run_context):
            self.run = train_run_context.run_config.name
            rec("controller_start", run=self.run, **proc_info())

        def before_worker_group_start(self, worker_group_context):
            rec("wg_start_begin", run=self.run)

        def before_init_train_context(self, workers):
            # placement group ready, worker actors created and answering (their processes started)
            rec("wg_workers_created", run=self.run)
            return {}

        def after_worker_group_start(self, worker_group):
            rec("wg_started", run=self.run)

        def after_worker_group_training_start(self, worker_group):
            rec("train_fn_launched", run=self.run)

        def after_report(self, training_report, metrics):
            rec("controller_report", run=self.run, epoch=(metrics[0] or {}).get("epoch") if metrics else None)

        def before_worker_group_shutdown(self, worker_group):
            rec("wg_shutdown_begin", run=self.run)

        def after_worker_group_shutdown(self, worker_group_context):
            rec("wg_shutdown_end", run=self.run)

        def after_controller_finish(self, result):
            rec("controller_finish", run=self.run, **proc_info())

    return TimingCallback()


def timed_run_trial(config: dict, **params) -> None:
    """Tune trainable: ``ood_ray.trial.run_trial`` with timestamps, and the Train side patched."""
    t_enter = time.time()
    from ray import tune

    tid = tune.get_context().get_trial_id()
    rec("trial_enter", t=t_enter, trial=tid, **proc_info())
    t0 = time.time()
    import ood_ray.train as otr
    import ood_ray.trial as otrial

    rec("trial_imported", trial=tid, dur=time.time() - t0)
    if config.get("runner") == "tune":  # the loop runs right here: time its reports
        run = f"{config['sweep_name']}-{tid}"
        if not hasattr(otr.TuneWorker, "_bench_orig_report"):
            otr.TuneWorker._bench_orig_report = otr.TuneWorker.report

        def report(self, metrics, checkpoint_dir):
            rec("worker_report_call", run=run, epoch=metrics.get("epoch"), train_time_s=metrics.get("train_time_s"), eval_time_s=metrics.get("eval_time_s"), rank=0)
            otr.TuneWorker._bench_orig_report(self, metrics, checkpoint_dir)
            rec("worker_report_return", run=run, epoch=metrics.get("epoch"), rank=0)

        otr.TuneWorker.report = report
        rec("worker_imported", run=run, dur=0.0)
    elif not hasattr(otr, "_bench_orig_loop"):  # once per process (the actor may be reused)
        otr._bench_orig_loop = otr.train_loop_per_worker
        otr.train_loop_per_worker = timed_train_loop_per_worker
        orig_make = otr.make_trainer

        def make_trainer(cfg, name, callbacks, *a, **kw):
            trainer = orig_make(cfg, name, list(callbacks) + [make_timing_callback()], *a, **kw)
            orig_fit = trainer.fit

            def fit():
                rec("fit_begin", run=name)
                try:
                    return orig_fit()
                finally:
                    rec("fit_end", run=name)

            trainer.fit = fit
            return trainer

        otr.make_trainer = make_trainer
    otrial.run_trial(config, **params)  # params: what run_sweep passes with tune.with_parameters
    rec("trial_exit", trial=tid, **proc_info())


def patch_tune_config(overrides: dict) -> None:
    """``--tune-config k=v``: run_sweep's ``tune.TuneConfig(...)`` gets these keyword values."""
    import ray.tune

    orig = ray.tune.TuneConfig

    def tune_config(*a, **kw):
        return orig(*a, **{**kw, **overrides})

    ray.tune.TuneConfig = tune_config


def install_driver_instrumentation() -> None:
    """Patch the driver-side functions run_sweep looks up at call time (module globals); once."""
    from ray.tune import Tuner

    import ood_ray.train as otr
    import ood_ray.tune as otu

    if getattr(otu, "_bench_instrumented", False):
        return
    otu._bench_instrumented = True

    def timed(mod, attr, ev):
        orig = getattr(mod, attr)

        def wrapper(*a, **kw):
            rec(ev + "_begin")
            try:
                return orig(*a, **kw)
            finally:
                rec(ev + "_end")

        setattr(mod, attr, wrapper)

    timed(otr, "ensure_ray", "ensure_ray")
    timed(otu, "finish_sweep", "finish_sweep")
    timed(otu, "evaluate_checkpoint", "evaluate_checkpoint")
    timed(otu, "write_artifacts", "write_artifacts")
    timed(otu, "log_best_model", "log_best_model")
    timed(otu, "close_orphans", "close_orphans")
    timed(Tuner, "fit", "tuner_fit")
    otu.run_trial = timed_run_trial
    base = otu.SweepRecorder

    class TimedRecorder(base):
        def on_trial_start(self, iteration, trials, trial, **info):
            rec("tune_trial_start", trial=trial.trial_id)
            super().on_trial_start(iteration, trials, trial, **info)
            rec("tune_trial_start_logged", trial=trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rec("tune_trial_result", trial=trial.trial_id, epoch=result.get("epoch"))
            super().on_trial_result(iteration, trials, trial, result, **info)
            rec("tune_trial_result_logged", trial=trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            rec("tune_trial_complete", trial=trial.trial_id)
            super().on_trial_complete(iteration, trials, trial, **info)
            rec("tune_trial_complete_logged", trial=trial.trial_id)

    otu.SweepRecorder = TimedRecorder


# ---------------------------------------------------------------------------------------------
# CPU accounting of Ray's processes (by role), sampled from the driver


ROLES = {  # process-title prefixes (titles can be read truncated) -> role
    "ImplicitFu": "trial_actor",
    "_Inner": "trial_actor",
    "RayTrainWo": "train_worker",
    "TrainContr": "train_controller",
    "_QueueActo": "tune_queue_actor",
    "Placement": "train_pg_cleaner",
    "Preemption": "train_preemption_watcher",
    "Synchroniz": "train_sync_actor",
    "DatasetMan": "train_dataset_manager",
    "evaluate_r": "finish_evaluate_task",
}


def role_of(name: str, cmdline: list[str]) -> str | None:
    title = " ".join(cmdline[:1]) if cmdline else name
    if title.startswith("ray::"):
        role = title[len("ray::") :].split(".")[0].split(" ")[0]
        return next((v for k, v in ROLES.items() if role.startswith(k)), role)
    joined = " ".join(cmdline)
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py", "agent"):
        if key in joined:
            return "ray_daemons"
    return None


class CpuSampler(threading.Thread):
    """Every ``period`` s: CPU seconds of each Ray process (descendants of this driver and of Ray's
    session daemons), kept per pid with its last role; summed by role at the end."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.stop_flag = threading.Event()
        self.seen: dict[int, tuple[str, float, float]] = {}  # pid -> (role, cpu_s, create_time)
        self.baseline: dict[int, float] = {}

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        procs = me.children(recursive=True)
        for p in procs:
            try:
                with p.oneshot():
                    role = role_of(p.name(), p.cmdline())
                    if role is None:
                        continue
                    c = p.cpu_times()
                    cpu = c.user + c.system
                    prev = self.seen.get(p.pid)
                    if role == "IDLE" and prev is not None:  # keep the role it had while working
                        role = prev[0]
                    self.seen[p.pid] = (role, cpu, p.create_time())
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.sample()
            self.stop_flag.wait(self.period)

    def stop(self) -> dict:
        self.stop_flag.set()
        self.join()
        self.sample()
        by_role: dict[str, dict] = {}
        for role, cpu, _ in self.seen.values():
            r = by_role.setdefault(role, {"processes": 0, "cpu_s": 0.0})
            r["processes"] += 1
            r["cpu_s"] += cpu
        return {k: {"processes": v["processes"], "cpu_s": round(v["cpu_s"], 1)} for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]["cpu_s"])}


# ---------------------------------------------------------------------------------------------
# the two sides


def make_points(method: str, base_lr: float, k: int, seed: int) -> list[dict]:
    """K points of the sweep's search space (flat Optuna names), drawn with a seeded sampler."""
    import optuna

    from ood_ray.tune import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(method, base_lr)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(k):
        t = study.ask()
        space(t)
        points.append(dict(t.params))
    return points


def make_sweep(args, tmp: Path, points: list[dict], runner: str, workers: int):
    """The overhead sweep of one side: the K points, ASHA off, ``workers`` per trial."""
    from ood_ray.config import TrainConfig
    from ood_ray.data.default import ensure_default
    from ood_ray.tune import SweepConfig

    base = {
        "data": str(ensure_default()),
        "epochs": args.epochs,
        "num_workers": workers,
        "cpus_per_worker": args.cpus_per_worker / workers,  # the same CPUs per trial on every side
        "batch_size": args.batch_size,
        "storage_path": str(tmp / "ray"),
        "mlflow_uri": f"sqlite:///{tmp}/mlflow.db",
        "experiment": "tune-overhead",
        "delta_tpr": 0.95,
    }
    return SweepConfig(
        method=args.method,
        base=TrainConfig.from_dict(base),
        num_trials=len(points),
        trial_cpus=args.trial_cpus,
        trial_runner=runner,
        concurrency=args.concurrency,
        name=f"overhead-{runner}{workers}-{time.strftime('%Y%m%d-%H%M%S')}",
        seed=args.seed,
        asha=False,
        include_default=False,
        points_to_evaluate=points,
        register_name="",
    ).validate()


def quickstart_sweep(tmp: Path):
    """``python jobs/tune_dismax.py`` as the README runs it: the CLI's tune defaults, its own MLflow."""
    from ood_ray.cli import TUNE_DEFAULTS
    from ood_ray.config import TrainConfig
    from ood_ray.tune import SweepConfig

    base = TrainConfig.from_dict({**TUNE_DEFAULTS, "storage_path": str(tmp / "ray"), "mlflow_uri": f"sqlite:///{tmp}/quickstart.db"})
    return SweepConfig(method="dismax", base=base, name=f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}").validate()


def run_sequential(sweep, points: list[dict], tmp: Path) -> dict:
    import optuna

    from ood_ray.train import train_local
    from ood_ray.tune import SearchSpace, trial_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(sweep.method, sweep.base.lr)
    base = sweep.base.to_dict()
    trials = []

    def objective(trial) -> float:
        t0 = time.perf_counter()
        cfg = trial_config({"base": base, **space(trial)})
        reports = train_local(cfg, tmp / f"seq-{sweep.name}-{trial.number}")
        wall = time.perf_counter() - t0
        compute = sum(r["train_time_s"] + r["eval_time_s"] for r in reports)
        trials.append({"number": trial.number, "params": dict(trial.params), "wall_s": round(wall, 2), "compute_s": round(compute, 2), "train_images": sum(r["train_images"] for r in reports), "objective": reports[-1]["objective"], "val_acc": reports[-1]["val_acc"]})
        log(f"sequential trial {trial.number}: {wall:.1f}s ({compute:.1f}s compute), objective {reports[-1]['objective']:.4f}")
        return reports[-1]["objective"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    for p in points:
        study.enqueue_trial(p)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=len(points))
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "trials": trials}


def run_tune(sweep, tmp: Path, instrument: bool) -> dict:
    from ood_ray.tune import run_sweep

    if instrument:
        install_driver_instrumentation()
    sampler = CpuSampler()
    sampler.start()
    rec("run_sweep_begin")
    t0 = time.perf_counter()
    out = run_sweep(sweep)
    wall = time.perf_counter() - t0
    rec("run_sweep_end")
    cpu = sampler.stop()
    # the trials' own reports, from Tune's folder (result.json per trial)
    trials = []
    for t in out.trials:
        rows = [json.loads(line) for line in Path(out.experiment_path, f"trial_{t['trial_id']}", "result.json").read_text().splitlines() if line.strip()]
        trials.append(
            {
                "trial_id": t["trial_id"],
                "params": {k: t["config"][k] for k in ("lr", "weight_decay")} | t["config"]["method_params"],
                "epochs": len(rows),
                "compute_s": round(sum(r["train_time_s"] + r["eval_time_s"] for r in rows), 2),
                "time_total_s": round(rows[-1]["time_total_s"], 2),
                "train_images": sum(r["train_images"] for r in rows),
                "objective": t["objective"],
                "val_acc": t["val_acc"],
            }
        )
    return {"wall_s": round(wall, 2), "trials": trials, "cpu_by_role": cpu, "experiment_path": out.experiment_path, "runner": sweep.runner}


# ---------------------------------------------------------------------------------------------
# breakdown from the event log


def breakdown(events: list[dict], trial_ids: list[str], sweep_name: str) -> dict:
    def first(ev, **match):
        for e in events:
            if e["ev"] == ev and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    def all_of(ev, **match):
        return [e for e in events if e["ev"] == ev and all(e.get(k) == v for k, v in match.items())]

    def span(a, b):
        return None if a is None or b is None else round(b["t"] - a["t"], 2)

    fixed = {
        "driver_setup_s": span(first("run_sweep_begin"), first("ensure_ray_begin")),
        "ray_init_s": span(first("ensure_ray_begin"), first("ensure_ray_end")),
        "setup_to_tuner_fit_s": span(first("ensure_ray_end"), first("tuner_fit_begin")),
        "tune_start_to_first_trial_s": span(first("tuner_fit_begin"), first("tune_trial_start")),
        "last_trial_end_to_fit_end_s": span(all_of("tune_trial_complete")[-1] if all_of("tune_trial_complete") else None, first("tuner_fit_end")),
        "catch_up_s": span(first("tuner_fit_end"), first("finish_sweep_begin")),
        "finish_sweep_s": span(first("finish_sweep_begin"), first("finish_sweep_end")),
        "finish_evaluate_s": None,
        "finish_artifacts_s": span(first("write_artifacts_begin"), first("write_artifacts_end")),
        "finish_log_model_s": span(first("log_best_model_begin"), first("log_best_model_end")),
    }
    fixed["finish_evaluate_s"] = span(first("finish_sweep_begin"), first("write_artifacts_begin"))
    fixed["total_fixed_s"] = round(sum(v for k, v in fixed.items() if v is not None and k in ("driver_setup_s", "ray_init_s", "setup_to_tuner_fit_s", "tune_start_to_first_trial_s", "last_trial_end_to_fit_end_s", "catch_up_s", "finish_sweep_s")), 2)
    fixed["run_sweep_s"] = span(first("run_sweep_begin"), first("run_sweep_end"))

    per_trial = []
    prev_complete = None
    for tid in trial_ids:
        run = f"{sweep_name}-{tid}"
        ev = {
            "tune_start": first("tune_trial_start", trial=tid),
            "trial_enter": first("trial_enter", trial=tid),
            "trial_imported": first("trial_imported", trial=tid),
            "fit_begin": first("fit_begin", run=run),
            "controller_start": first("controller_start", run=run),
            "wg_start_begin": first("wg_start_begin", run=run),
            "wg_workers_created": first("wg_workers_created", run=run),
            "wg_started": first("wg_started", run=run),
            "train_fn_launched": first("train_fn_launched", run=run),
            "worker_enter": first("worker_enter", run=run),
            "worker_imported": first("worker_imported", run=run),
            "worker_exit": first("worker_exit", run=run),
            "wg_shutdown_begin": first("wg_shutdown_begin", run=run),
            "wg_shutdown_end": first("wg_shutdown_end", run=run),
            "controller_finish": first("controller_finish", run=run),
            "fit_end": first("fit_end", run=run),
            "trial_exit": first("trial_exit", trial=tid),
            "tune_complete": first("tune_trial_complete", trial=tid),
            "tune_complete_logged": first("tune_trial_complete_logged", trial=tid),
        }
        calls = all_of("worker_report_call", run=run, rank=0)
        rets = all_of("worker_report_return", run=run, rank=0)
        ctrl = all_of("controller_report", run=run)
        tune_results = all_of("tune_trial_result", trial=tid)
        compute = sum((c.get("train_time_s") or 0) + (c.get("eval_time_s") or 0) for c in calls)
        report_upload = round(sum(r["t"] - c["t"] for c, r in zip(calls, rets, strict=False)), 2) if rets else None
        # worker time from its imports to its last report's return that is neither compute nor
        # report: model/data set-up before epoch 1 and between epochs (data stream start-up etc.)
        worker_busy = span(ev["worker_imported"], rets[-1]) if rets else None
        row = {
            "trial_id": tid,
            "gap_before_s": span(prev_complete, ev["tune_start"]) if prev_complete else None,
            "tune_start_to_trainable_s": span(ev["tune_start"], ev["trial_enter"]),
            "trial_actor_process_age_at_start_s": round(ev["trial_enter"]["t"] - ev["trial_enter"]["proc_created"], 2) if ev["trial_enter"] else None,
            "trial_imports_s": (ev["trial_imported"] or {}).get("dur"),
            "make_trainer_s": span(ev["trial_imported"], ev["fit_begin"]),
            "controller_start_s": span(ev["fit_begin"], ev["controller_start"]),
            "controller_to_worker_group_s": span(ev["controller_start"], ev["wg_start_begin"]),
            "worker_group_start_s": span(ev["wg_start_begin"], ev["wg_started"]),
            "wg_placement_group_and_worker_actors_s": span(ev["wg_start_begin"], ev["wg_workers_created"]),
            "wg_context_backend_and_callbacks_s": span(ev["wg_workers_created"], ev["wg_started"]),
            "train_fn_launch_s": span(ev["wg_started"], ev["train_fn_launched"]),
            "worker_fn_enter_s": span(ev["train_fn_launched"], ev["worker_enter"]),
            "worker_process_age_at_enter_s": round(ev["worker_enter"]["t"] - ev["worker_enter"]["proc_created"], 2) if ev["worker_enter"] else None,
            "worker_imports_s": (ev["worker_imported"] or {}).get("dur"),
            "worker_setup_and_between_epochs_s": round(worker_busy - compute - report_upload, 2) if worker_busy is not None else None,
            "compute_s": round(compute, 2),
            "report_checkpoint_upload_s": report_upload,
            "report_to_controller_s": [round(c["t"] - r["t"], 2) for r, c in zip(rets, ctrl, strict=False)],
            "controller_to_tune_s": [round(t["t"] - c["t"], 2) for c, t in zip(ctrl, tune_results, strict=False)],
            "last_report_to_worker_exit_s": span(rets[-1] if rets else None, ev["worker_exit"]),
            "worker_exit_to_shutdown_begin_s": span(ev["worker_exit"], ev["wg_shutdown_begin"]),
            "worker_group_shutdown_s": span(ev["wg_shutdown_begin"], ev["wg_shutdown_end"]),
            "shutdown_to_controller_finish_s": span(ev["wg_shutdown_end"], ev["controller_finish"]),
            "controller_finish_to_fit_return_s": span(ev["controller_finish"], ev["fit_end"]),
            "fit_return_to_tune_complete_s": span(ev["fit_end"], ev["tune_complete"]),
            "mlflow_on_complete_s": span(ev["tune_complete"], ev["tune_complete_logged"]),
            "trial_span_s": span(ev["tune_start"], ev["tune_complete"]),
            "trial_actor_cpu_s": (ev["trial_exit"] or {}).get("cpu_s"),
            "controller_cpu_s": (ev["controller_finish"] or {}).get("cpu_s"),
            "worker_cpu_s": (ev["worker_exit"] or {}).get("cpu_s"),
        }
        row["in_trial_overhead_s"] = round(row["trial_span_s"] - compute, 2) if row["trial_span_s"] is not None else None
        per_trial.append(row)
        prev_complete = ev["tune_complete"]

    def mean(key):
        vals = [r[key] for r in per_trial if isinstance(r.get(key), int | float)]
        return round(statistics.mean(vals), 2) if vals else None

    def mean_sum(key):
        vals = [sum(r[key]) for r in per_trial if isinstance(r.get(key), list) and r[key]]
        return round(statistics.mean(vals), 2) if vals else None

    keys = [k for k in per_trial[0] if k not in ("trial_id",)] if per_trial else []
    means = {k: (mean_sum(k) if isinstance(per_trial[0][k], list) else mean(k)) for k in keys}
    # trial 1 has no gap_before; the trial actor's import time matters only for fresh actors
    return {"fixed": fixed, "per_trial_mean": means, "per_trial": per_trial}


# ---------------------------------------------------------------------------------------------


SIDES = ("quickstart", "tune1", "train2", "seq")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="K: trials on each overhead side (default 4)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial on the overhead sides (default 2)")
    p.add_argument("--method", default="dismax", help="method of the overhead sides (default dismax)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default 32, the TrainConfig default)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs of a one-worker trial; a two-worker trial gives each worker half (default 1)")
    p.add_argument("--trial-cpus", type=float, default=0.5, help="CPUs of a two-worker trial's Tune trial actor (default 0.5, the SweepConfig default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K points and of the searchers")
    p.add_argument("--concurrency", type=int, default=1, help="trials at a time on the overhead sides (default 1)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="what to run, in this order (default: all): the README quickstart, K one-worker trials (in the Tune trial), K two-worker trials (TorchTrainer), the K trials in-process")
    p.add_argument("--tune-config", action="append", default=[], metavar="KEY=VALUE", help="override a keyword of run_sweep's tune.TuneConfig (JSON value, e.g. reuse_actors=true); repeatable")
    p.add_argument("--sequential-from", metavar="JSON", help="take the sequential side from an earlier output of this script (same settings) instead of running it")
    p.add_argument("--no-instrument", action="store_true", help="no timestamps from inside Ray (totals only)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable before Ray starts (repeatable); inherited by every Ray process of the local cluster")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp folder, removed)")
    return p.parse_args(argv)


def side_summary(side: dict, events_path: str | None, sweep_name: str) -> dict:
    k = len(side["trials"])
    out = {
        "runner": side["runner"],
        "wall_s": side["wall_s"],
        "trials": k,
        "compute_s": round(sum(t["compute_s"] for t in side["trials"]), 2),
        "compute_per_trial_s": round(statistics.mean(t["compute_s"] for t in side["trials"]), 2),
        "trial_rows": side["trials"],
        "cpu_s_by_ray_process_role": side["cpu_by_role"],
    }
    if events_path and Path(events_path).exists():
        events = sorted((json.loads(line) for line in Path(events_path).read_text().splitlines() if line.strip()), key=lambda e: e["t"])
        order_ids = [e["trial"] for e in events if e["ev"] == "tune_trial_start"]
        out["breakdown"] = breakdown(events, order_ids, sweep_name)
        out["fixed_costs_s"] = out["breakdown"]["fixed"]["total_fixed_s"]
    return out


def overhead(side: dict, seq: dict) -> dict:
    """Per-trial overhead of a Tune side against the in-process side, each side's compute taken out
    first (on a shared machine the compute itself moves run to run), the fixed costs excluded."""
    k = side["trials"]
    seq_other = seq["wall_s"] - sum(t["compute_s"] for t in seq["trials"])
    tune_other = side["wall_s"] - side["compute_s"]
    fixed = side.get("fixed_costs_s")
    out = {"overhead_per_trial_incl_fixed_s": round((tune_other - seq_other) / k, 2)}
    if fixed is not None:
        out["overhead_per_trial_s"] = round((tune_other - fixed - seq_other) / k, 2)
    return out


def main(argv=None) -> dict:
    global EVENTS_PATH
    args = parse_args(argv)
    # what Ray gives its workers (OMP_NUM_THREADS = their CPUs): the in-process side must not run
    # multi-threaded BLAS/OpenMP while the Train workers run single-threaded ones
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(args.cpus_per_worker))))
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    os.environ.setdefault("TQDM_DISABLE", "1")
    capture_stdout()
    tmp_ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="tune-overhead-")
    with tmp_ctx as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        t_imp = time.perf_counter()
        import ray

        import ood_ray.train  # noqa: F401 - imports before the clocks start (every side)
        import ood_ray.tune  # noqa: F401

        import_s = time.perf_counter() - t_imp
        if args.tune_config:
            patch_tune_config({k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.tune_config)})
        points = make_points(args.method, 0.05, args.trials, args.seed)
        log(f"sides {args.sides}; overhead sides: {args.trials} trials x {args.epochs} epochs of {args.method}; points: {points}")
        result: dict = {
            "what": "run_sweep (Ray Tune [+ Train]) against the same trials in-process with plain Optuna; the README quickstart's compute fraction",
            "settings": {k: v for k, v in vars(args).items() if k != "keep"} | {"points": points, "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "driver_import_s": round(import_s, 2)},
        }
        sides: dict = {}
        for side in args.sides:
            try:
                if side == "seq":
                    if args.sequential_from:
                        sides["seq"] = json.loads(Path(args.sequential_from).read_text())["sequential"]
                        result["sequential_taken_from"] = args.sequential_from
                        continue
                    log("sequential side (plain Optuna, train_local)")
                    seq = run_sequential(make_sweep(args, tmp, points, "tune", 1), points, tmp)
                    k = len(points)
                    sides["seq"] = {**seq, "per_trial_wall_s": round(seq["wall_s"] / k, 2), "compute_per_trial_s": round(statistics.mean(t["compute_s"] for t in seq["trials"]), 2), "in_process_overhead_per_trial_s": round((seq["wall_s"] - sum(t["compute_s"] for t in seq["trials"])) / k, 2)}
                    log(f"sequential: {seq['wall_s']:.1f}s")
                    continue
                sweep = quickstart_sweep(tmp) if side == "quickstart" else make_sweep(args, tmp, points, *(("tune", 1) if side == "tune1" else ("train", 2)))
                EVENTS_PATH = None if args.no_instrument else str(tmp / f"events-{sweep.name}.jsonl")
                log(f"{side} side: run_sweep, {sweep.num_trials} trials, runner {sweep.runner}")
                sides[side] = side_summary(run_tune(sweep, tmp, not args.no_instrument), EVENTS_PATH, sweep.name)
                log(f"{side}: {sides[side]['wall_s']:.1f}s")
            except Exception as e:  # noqa: BLE001 - report what the other sides measured, and why this one failed
                log(f"{side} side failed: {type(e).__name__}: {e}")
                result[f"{side}_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        if "seq" in sides:
            result["sequential"] = sides["seq"]
        for side, label in (("tune1", "one_worker"), ("train2", "two_worker")):
            if side in sides:
                result[label] = sides[side] | (overhead(sides[side], sides["seq"]) if "seq" in sides else {})
        if "quickstart" in sides:
            q = sides["quickstart"]
            result["quickstart"] = q | {"compute_fraction": round(q["compute_s"] / q["wall_s"], 3), "epochs_trained": sum(t["epochs"] for t in q["trial_rows"])}
        figures = {
            "one_worker_overhead_per_trial_s": result.get("one_worker", {}).get("overhead_per_trial_s"),
            "two_worker_overhead_per_trial_s": result.get("two_worker", {}).get("overhead_per_trial_s"),
            # the fixed costs of a user's sweep: fresh Ray, test evaluation, plots, model registration
            "fixed_per_sweep_s": (result.get("quickstart") or result.get("one_worker") or {}).get("fixed_costs_s"),
            "quickstart_compute_fraction": result.get("quickstart", {}).get("compute_fraction"),
        }
        result["figures"] = figures
        result["targets"] = {"one_worker_overhead_per_trial_s": "<= 3", "two_worker_overhead_per_trial_s": "<= 10", "fixed_per_sweep_s": "<= 12", "quickstart_compute_fraction": ">= 0.5"}
        result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        if ray.is_initialized():
            ray.shutdown()
    return result


if __name__ == "__main__":
    emit(main())
