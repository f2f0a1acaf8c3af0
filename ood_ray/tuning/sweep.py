"""``run_sweep``: the Tuner of a sweep (Optuna + ASHA, or PBT / PB2), its MLflow parent run, resume."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import threading
import time
import warnings
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from .. import ray_compat, tracking
from ..config import ConfigError, redacted
from ..engine.build import load_benchmark
from ..methods import METHODS
from ..objective import objective_metrics
from ..progress import say
from ..ray_train import ensure_ray
from ..tracking import liveness, provenance
from ..tracking.recorder import PARENT_TAG, SWEEP_TAG, TRIAL_TAG, SweepRecorder, trial_id_of
from .config import SweepConfig
from .report import SweepOutcome, finish_sweep
from .space import SearchSpace, default_point
from .trial import run_trial, trial_config


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


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


#: Modules of the package's first layout that a sweep's saved state may name (pickled by reference).
OLD_MODULES = re.compile(rb"ood_ray\.(?:tune|trial|serve|evaluate)(?![A-Za-z0-9_.])")


def check_layout(folder: Path, name: str) -> None:
    """Refuse, before anything is touched, to resume a sweep whose saved state (Tune's pickles)
    names modules this version no longer has: it could not be restored."""
    for pkl in sorted(folder.glob("*.pkl")):
        found = OLD_MODULES.search(pkl.read_bytes())
        if found:
            raise ConfigError(
                f"resume: sweep {name!r} was started by an older ood_ray ({pkl.name} needs module {found.group().decode()}); "
                "resume it with the version that started it, or start a new sweep"
            )


def find_parent(client: MlflowClient, experiment_id: str, name: str):
    runs = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{name}' and tags.`ood_ray.kind` = 'sweep'", max_results=1)
    return runs[0] if runs else None


def run_sweep(sweep: SweepConfig) -> SweepOutcome:
    """Run (or with ``resume`` continue) a sweep; returns the best trial and where everything is."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

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
    tracking.close_dead_runs(client)  # this sweep's own runs too, when its killed driver left them RUNNING
    parent = find_parent(client, exp_id, name)
    if sweep.resume:
        if "://" not in exp_path and not Path(exp_path, "tuner.pkl").exists():
            raise ConfigError(f"resume: {exp_path} holds no sweep to resume (no tuner.pkl)")
        if "://" not in exp_path:
            check_layout(Path(exp_path), name)
    elif parent is not None or ("://" not in exp_path and Path(exp_path).exists()):
        raise ConfigError(f"name={name!r}: a sweep of that name exists in {exp_path}; pass --resume to continue it or choose another name")
    space = SearchSpace(sweep.method, base.lr)
    kind = sweep.scheduler_kind
    pop_based = sweep.population_based  # PBT or PB2
    if pop_based:
        from . import pbt
    if parent is None:
        parent = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: name, "ood_ray.kind": "sweep", "ood_ray.method": sweep.method, **liveness.driver_tags()})
        args = {k: v for k, v in sweep.to_dict().items() if k != "base"}
        args["trial_runner"] = sweep.runner  # the path chosen, also when it was "auto"
        args["grace_period"] = sweep.grace  # the value used, also when it was derived
        args["scheduler"] = kind  # also when it came from --asha/--no-asha
        client.log_batch(parent.info.run_id, params=tracking.params_of({**args, "base": base.to_dict()}))
        provenance.record(client, parent.info.run_id, bench, "tuning")
        with tempfile.TemporaryDirectory() as tmp:
            described = {"space": space.describe(), "posthoc_grid": METHODS[sweep.method].posthoc_grid(), **({"pbt": pbt.pbt_plan(sweep)} if pop_based else {})}
            Path(tmp, "search_space.json").write_text(json.dumps(described, indent=2) + "\n")
            Path(tmp, "sweep.json").write_text(json.dumps(redacted(sweep.to_dict()), indent=2, default=str) + "\n")
            client.log_artifacts(parent.info.run_id, tmp)
    else:
        # the restored trials keep the path they started on (sweeps before trial_runner: "train")
        started = parent.data.params.get("trial_runner", "train")
        if started != sweep.runner:
            raise ConfigError(
                f"resume: sweep {name!r} started its trials with trial_runner={started!r}, this command would use {sweep.runner!r}; "
                f"pass the same --num-workers (and --trial-runner) as when the sweep started"
            )
        if parent.data.params.get("scheduler", kind) != kind:  # the restored Tuner keeps its own
            raise ConfigError(f"resume: sweep {name!r} started with --scheduler {parent.data.params['scheduler']}; pass the same --scheduler to resume it")
        liveness.claim(client, parent)  # this process drives it now (before it is RUNNING again)
        client.update_run(parent.info.run_id, status="RUNNING")
    parent_id = parent.info.run_id
    say(f"sweep {name!r}: MLflow parent run {parent_id} in experiment {base.experiment!r} at {base.mlflow_uri}")
    say(f"sweep folder {exp_path}" + (f"; {kind.upper()}: no Optuna study" if pop_based else f"; Optuna study {sweep.optuna_url(name)}"))

    try:
        ensure_ray()
        cluster = ray.cluster_resources()
        gpus = sweep.gpus_per_worker if sweep.gpus_per_worker is not None else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
        concurrency = plan_concurrency(sweep, cluster, gpus)
        how = "automatic" if sweep.trial_runner == "auto" else "--trial-runner"
        if kind == "asha":
            say(f"ASHA may stop trials from epoch {sweep.grace} on (rungs at epochs {sweep.grace}, {sweep.grace * sweep.reduction_factor:g}, ...)")
        if sweep.runner == "tune":
            say(f"{sweep.num_trials} trials of {base.epochs} epochs, {concurrency} at a time; each trains in its Tune trial process (1 worker; {how})")
        else:
            say(f"{sweep.num_trials} trials of {base.epochs} epochs, {concurrency} at a time; each runs a Ray Train TorchTrainer with {base.num_workers} workers ({how})")
        metric = objective_metrics(base.objective)
        multi = len(metric) > 1
        points = ([default_point(sweep.method, base)] if sweep.include_default else []) + list(sweep.points_to_evaluate)

        def new_searcher():  # only for a new sweep: creating one enqueues ``points`` in the study
            return ray_compat.SweepSearch(
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
            if kind == "asha"
            else None
        )
        population, sampled, keep = None, {}, 2  # a "tune" trial's checkpoints: its last two, as a TorchTrainer keeps its own
        if pop_based:  # the population: default point, given points, random draws (tuning/pbt.py)
            scheduler, population, sampled = pbt.make_pbt(sweep, concurrency)
            keep = sweep.pbt_interval + 2  # a donor's checkpoint must outlive its next `interval` epochs
            how = "perturbed" if kind == "pbt" else "PB2's GP-bandit choice of"
            say(f"{kind.upper()} every {sweep.pbt_interval} epochs: the worst quarter of the trials (at least one) continue from the best quarter's checkpoints with {how} {', '.join(pbt.pbt_plan(sweep)['mutated'])}")
        ray_compat.set_experiment_snapshot_interval(1)  # --resume loses at most ~1 s
        trainable = tune.with_resources(tune.with_parameters(run_trial, benchmark=bench.to_spec()), trial_resources(sweep, gpus))
        # A "tune" trial is its own worker, so the worker retries (max_failures) are Tune's to make.
        retries = max(sweep.max_trial_failures, base.max_failures) if sweep.runner == "tune" else sweep.max_trial_failures
        recorder_class = pbt.PBTRecorder if pop_based else SweepRecorder
        recorder = recorder_class(base.mlflow_uri, exp_id, parent_id, name, base.epochs, sweep.num_trials, trial_config, bench)
        if sweep.resume:
            say(f"resuming sweep {name!r} from {exp_path}")
            try:
                tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
            except ModuleNotFoundError as e:  # the sweep's state names modules of an older package layout
                if not (e.name or "").startswith("ood_ray"):
                    raise
                raise ConfigError(
                    f"resume: sweep {name!r} in {exp_path} was started by an older ood_ray (its saved state needs module {e.name}); "
                    "resume it with the version that started it, or start a new sweep"
                ) from None
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"base": base.to_dict(), "sweep_name": name, "gpus_per_worker": gpus, "runner": sweep.runner, **sampled},
                tune_config=tune.TuneConfig(
                    num_samples=sweep.num_trials, search_alg=population if population is not None else new_searcher(), scheduler=scheduler,
                    # PBT: every trial exists from the start and they take turns on the resources (a
                    # limit here would create the later trials only after the first ones ended)
                    max_concurrent_trials=None if pop_based else concurrency, trial_dirname_creator=trial_dirname,
                    # A finished trial's actor (its process, torch and ood_ray imported) runs the next
                    # trial: one process start and its imports less per trial. A "tune" trial that
                    # ASHA stops ends its loop at its next step (TuneWorker.stop_requested); a
                    # "train" trial it stops is still inside trainer.fit(), so its actor cannot be
                    # reset for reuse.
                    reuse_actors=sweep.runner == "tune" or kind != "asha",
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=base.storage_path,
                    callbacks=[recorder],
                    failure_config=tune.FailureConfig(max_failures=retries),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
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
        catch_up = recorder_class(base.mlflow_uri, exp_id, parent_id, name, base.epochs, sweep.num_trials, trial_config, bench)
        catch_up.backfill(grid)
        if pop_based:  # exploits the live recorder could not write yet (none after a resume: Tune restored its own)
            catch_up.take_over(recorder)
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
            tracking.set_tag(client, parent_id, "ood_ray.error", f"{type(e).__name__}: {e}"[:5000])
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

        from .. import plots, serving  # noqa: F401


def close_orphans(sweep: SweepConfig, client: MlflowClient, parent_id: str, known: set) -> None:
    """After a resumed sweep: close what a killed driver started but Tune never saved.

    Such a trial is unknown to the restored Tuner, so it never runs again: its Optuna trial is
    marked FAIL and its MLflow run KILLED, both saying why, instead of staying RUNNING for ever (or
    FAILED as a run whose driver was lost, ``tracking.liveness``).
    """
    import optuna

    if not sweep.population_based:  # a PBT sweep has no Optuna study
        study = optuna.load_study(study_name=sweep.name, storage=sweep.optuna_url(sweep.name))
        for t in study.trials:
            if t.state == optuna.trial.TrialState.RUNNING:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                say(f"Optuna trial {t.number} was interrupted before the sweep's state was saved; marked FAIL")
    exp = client.get_run(parent_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status != 'FINISHED'"):
        left = run.info.status == "RUNNING" or liveness.was_lost(run)  # closed at the start: its driver was gone
        if left and run.data.tags.get(TRIAL_TAG) not in known:
            tracking.set_tag(client, run.info.run_id, "ood_ray.outcome", "interrupted before the sweep's state was saved; not resumed")
            client.set_terminated(run.info.run_id, "KILLED")
