"""The best trial after a sweep: choosing it, scoring it on the test split, the parent run's artifacts."""

from __future__ import annotations

import json
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from mlflow.tracking import MlflowClient

from .. import metric_names as names
from .. import tracking
from ..checkpoint import load_model_dir
from ..config import redacted
from ..methods import METHODS, get_method
from ..methods.with_detector import scoring_method
from ..progress import say
from ..tracking.recorder import checkpoint_of, find_trial_run, trial_id_of
from .config import SweepConfig
from .space import default_point, flat_point
from .trial import trial_config


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
    if model_uri and register and model_uri.startswith(f"models:/{register}/"):
        crown(client, sweep, register, model_uri.rsplit("/", 1)[1], best, test_metrics, len(done))
    keep = ("objective", *METHODS[sweep.method].calibration_keys)
    metrics = {f"best_{k}": v for k, v in best["metrics"].items() if k.startswith(("val_", "chosen_")) or k in keep}
    metrics.update({f"best_{k}": v for k, v in test_metrics.items()})
    if default is not None:
        metrics.update({f"default_{k}": v for k, v in default["metrics"].items() if k in ("objective", "val_acc", "val_auroc", "val_fpr95")})
    metrics["trials_completed"] = len(done)
    metrics["trials_stopped_early"] = sum(t["status"] == "stopped early" for t in trials)
    metrics["trials_failed"] = sum(t["status"] == "error" for t in trials)
    wall = time.perf_counter() - t0
    metrics["wall_time_s"] = wall
    tracking.log_metrics(client, parent_id, metrics, step=0)
    tracking.set_tag(client, parent_id, "ood_ray.best_trial", best["trial_id"])
    tracking.set_tag(client, parent_id, "ood_ray.best_checkpoint", best["checkpoint"])
    if isinstance(best["metrics"].get("ood_ray.detector"), str):  # --detectors: the best trial's choice
        tracking.set_tag(client, parent_id, "ood_ray.detector", best["metrics"]["ood_ray.detector"])
    if best_run is not None:
        tracking.set_tag(client, parent_id, "ood_ray.best_run", best_run)
    if model_uri:
        tracking.set_tag(client, parent_id, "ood_ray.model_uri", model_uri)
    client.set_terminated(parent_id, "FINISHED")
    return SweepOutcome(sweep.name, parent_id, best, default, test_metrics, pareto, trials, wall, exp_path, model_uri, artifacts)


def model_card(sweep: SweepConfig, best: dict, test_metrics: dict, completed: int) -> tuple[str, dict[str, str]]:
    """The registered version's description (Markdown) and tags: what it is, what it was chosen on,
    how it scores on test, its threshold and the command that made it."""
    import json
    import shlex
    import sys
    from pathlib import Path

    from .. import config as cfgmod
    from ..engine.build import load_benchmark
    from ..tracking.provenance import benchmark_digest

    base = sweep.base
    with ray.train.Checkpoint(best["checkpoint"]).as_directory() as d:  # local or remote storage
        meta = json.loads(Path(d, "model.json").read_text())
    bench = load_benchmark(base)
    digest = benchmark_digest(bench)[:16]  # as in the runs' dataset input
    m = best["metrics"]

    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    delta = meta.get("delta")
    lines = [
        f"**{meta['method']}** on `{meta['backbone']}`, the best of sweep `{sweep.name}` ({completed} trial{'' if completed == 1 else 's'} completed): trial {best['trial_id']}.",
        "",
        f"- data: `{bench.path}` (digest {digest}), {len(meta['class_names'])} classes, {meta['image_size'][0]}x{meta['image_size'][1]} {meta['mode']}",
        f"- chosen on val: objective {f(best['objective'])} (`{base.objective}`), val accuracy {f(m.get('val_acc'))}, val AUROC {f(m.get('val_auroc'))}",
        f"- test (scored once, after the choice): accuracy {f(test_metrics.get('test_acc'))}, AUROC {f(test_metrics.get('test_auroc'))}, FPR95 {f(test_metrics.get('test_fpr95'))}",
        f"- \"don't know\" below δ = {f(delta)} on `{meta.get('threshold_score')}`" if delta is not None else f"- no δ: every image gets a class (`{meta.get('threshold_score')}` is its score)",
        f"- command: `{cfgmod.redact(shlex.join(sys.argv))}`",
    ]
    tags = {
        "ood_ray.method": meta["method"],
        "ood_ray.backbone": meta["backbone"],
        "ood_ray.data_digest": digest,
        "ood_ray.sweep": sweep.name or "",
        "ood_ray.trial_id": str(best["trial_id"]),
        "ood_ray.val_objective": f(best["objective"]),
        "ood_ray.test_auroc": f(test_metrics.get("test_auroc")),
    }
    return "\n".join(lines) + "\n", tags


def crown(client: MlflowClient, sweep: SweepConfig, register: str, version: str, best: dict, test_metrics: dict, completed: int) -> None:
    """Write the model card into the best version's description and tags, and point the alias at it."""
    card, tags = model_card(sweep, best, test_metrics, completed)
    client.update_model_version(register, version, description=card)
    for k, v in tags.items():
        client.set_model_version_tag(register, version, k, v)
    if sweep.alias:
        client.set_registered_model_alias(register, sweep.alias, version)
        say(f"alias {sweep.alias}: models:/{register}@{sweep.alias} is version {version}")


def log_best_model(client: MlflowClient, run_id: str, checkpoint_path: str, register: str | None) -> str:
    """Log the best checkpoint as a pyfunc model in its trial's run and register it."""
    import mlflow

    from ..serving import log_ood_model
    from ..tracking import liveness

    mlflow.set_tracking_uri(client.tracking_uri)
    liveness.claim(client, client.get_run(run_id))  # RUNNING for a moment: under this process's name
    with ray.train.Checkpoint(checkpoint_path).as_directory() as d, mlflow.start_run(run_id=run_id):
        info = log_ood_model(d, name="model", registered_model_name=register)
    client.set_terminated(run_id, client.get_run(run_id).info.status)
    uri = f"models:/{register}/{info.registered_model_version}" if register and info.registered_model_version else info.model_uri
    say(f"best model logged: {info.model_uri}" + (f", registered as {uri}" if register else ""))
    return uri


def evaluate_checkpoint(checkpoint_path: str, batch_size: int) -> dict:
    """Test metrics of a checkpoint (single process) and the arrays the plots need."""
    import torch

    from ..engine.build import load_benchmark
    from ..engine.evaluate import collect, metrics_of, score_split

    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the task was given one
    with ray.train.Checkpoint(checkpoint_path).as_directory() as d:
        model, meta, cfg = load_model_dir(d)
    model = model.to(device)
    method = scoring_method(get_method(cfg.method, cfg.method_params), model, meta)  # with its detector, if any
    bench = load_benchmark(cfg)
    test_id, test_ood = score_split(model, method, bench, "test", 0, 1, device, batch_size)  # scored once
    test = metrics_of("test", method, bench, test_id, test_ood)
    with torch.no_grad():
        val = collect(model, method, bench.val, 0, 1, device, batch_size)
    temperature = method.temperature(model)
    return {
        "test": test,
        "score": method.default_score,
        "test_id_scores": test_id[method.default_score],
        "test_ood_scores": {name: out[method.default_score] for name, out in test_ood.items()},
        "test_id_all_scores": {name: test_id[name] for name in method.score_names()},
        "test_correct": test_id["logits"].argmax(1) == test_id["labels"],
        "val_logits": val["logits"],
        "val_labels": val["labels"],
        "temperature": temperature,
        "method_params": method.params,
    }


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_table(test: dict, sets: list[str]) -> str:
    """Markdown table of the best trial's test metrics per OOD set, near, far and all."""
    return (
        names.ood_table(test, "test", sets)
        + f"\ntest accuracy {test.get('test_acc', math.nan):.4f}, ECE {test.get('test_ece', math.nan):.4f}, NLL {test.get('test_nll', math.nan):.4f}\n"
    )


def write_artifacts(sweep, client, parent_id, trials, best, default, evaluation) -> list[str]:
    """Plots and tables for the parent run; returns the artifact file names."""
    import optuna

    from .. import plots

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        score = evaluation["score"]
        plots.roc_curves(evaluation["test_id_scores"], evaluation["test_ood_scores"], out / "roc_test.png", title=f"best trial {best['trial_id']}: ROC on test ({score})")
        plots.score_histograms(evaluation["test_id_scores"], evaluation["test_ood_scores"], out / "score_histograms_test.png", title=f"{score}: test ID vs each test OOD set")
        plots.risk_coverage(evaluation["test_id_all_scores"], evaluation["test_correct"], out / "risk_coverage_test.png", title=f"best trial {best['trial_id']}: risk-coverage on test ID")
        logits, labels = evaluation["val_logits"], evaluation["val_labels"]
        curves = {"as trained": softmax(logits)}
        t = evaluation["temperature"]
        if t is not None:
            curves = {"before calibration (T=1)": softmax(logits * t), f"after calibration (T={t:.4g})": softmax(logits)}
        plots.reliability_diagram(curves, labels, out / "reliability_val.png", title="validation ID reliability")
        (out / "test_table.md").write_text(f"# Best trial {best['trial_id']} on the test split ({score})\n\n" + test_table(evaluation["test"], list(evaluation["test_ood_scores"])))
        (out / "best_trial.json").write_text(json.dumps(redacted({k: best[k] for k in ("trial_id", "objective", "val_acc", "val_auroc", "checkpoint", "config")}), indent=2, default=str) + "\n")
        (out / "trials.json").write_text(json.dumps(redacted([{k: t_[k] for k in ("trial_id", "status", "epochs", "objective", "val_acc", "val_auroc", "checkpoint", "error")} for t_ in trials]), indent=2, default=str) + "\n")
        try:
            if sweep.population_based:
                raise LookupError(f"a {sweep.scheduler_kind.upper()} sweep has no Optuna study; each trial's run records its exploits (tags ood_ray.pbt.*)")
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
