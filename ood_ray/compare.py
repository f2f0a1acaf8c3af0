"""``ood-ray compare``: methods side by side, each tuned with the same budget, over several seeds.

For every method: with ``tune_trials > 0`` a sweep of that many trials (the same epochs, workers,
search budget and objective for every method) chooses its configuration on the validation split;
with ``tune_trials == 0`` the method's defaults are used. The configuration is then trained once
per seed and evaluated once on the test split. The table gives mean ± 95 % confidence interval
(Student t over seeds) per cell and marks the cells where a method is better (▲) or worse (▼)
than MSP (softmax) by a one-sided paired t-test over the seeds at level 0.05.

Everything goes to MLflow: a parent run ``compare-methods`` with the table, a bar chart with error
bars and the per-seed values, and as its children each method's sweep and seed runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from . import metric_names as names
from .config import TrainConfig
from .methods import get_method
from .progress import say
from .train import TrainOutcome, run_training

BASELINE = "softmax"
LEVEL = 0.05  # one-sided paired t-test
#: (column, metric key builder, higher is better) of the main table.
COLUMNS = (
    ("acc", names.id_key("test", "acc"), True),
    ("ECE", names.id_key("test", "ece"), False),
    ("near AUROC", names.mean_key("test", "auroc", "near"), True),
    ("far AUROC", names.mean_key("test", "auroc", "far"), True),
    ("all AUROC", names.mean_key("test", "auroc"), True),
    ("near FPR95", names.mean_key("test", "fpr95", "near"), False),
    ("far FPR95", names.mean_key("test", "fpr95", "far"), False),
    ("all FPR95", names.mean_key("test", "fpr95"), False),
    ("AURC ↓", names.selective_key("test", "aurc"), False),
)


@dataclass
class MethodResult:
    method: str
    config: TrainConfig  # what every seed trained (the sweep's choice, or the defaults)
    runs: list[TrainOutcome] = field(default_factory=list)  # one per seed
    sweep_run_id: str | None = None
    tuned: dict | None = None  # the sweep's chosen lr, weight_decay, method_params


@dataclass
class Comparison:
    table: str  # Markdown: the header, the main table and the per-set AUROC table
    path: Path
    parent_run_id: str
    results: dict[str, MethodResult]
    wall_time_s: float


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (NaN with fewer than 2 values)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else math.nan, math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def paired_p(values, baseline, higher_is_better: bool) -> float:
    """One-sided paired t-test p-value that ``values`` beat ``baseline`` (same seeds, same order).
    NaN with fewer than 2 pairs; when every difference is equal, 0 if it favours ``values`` else 1."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if len(a) < 2 or len(a) != len(b):
        return math.nan
    d = a - b if higher_is_better else b - a
    if np.allclose(d, d[0]):
        return 0.0 if d[0] > 0 else 1.0
    return float(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)


def _cell(values, base_values, higher: bool, is_baseline: bool, digits: int = 3) -> str:
    mean, ci = mean_ci(values)
    text = f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}")
    if base_values is None or is_baseline or len(values) < 2:
        return text
    if paired_p(values, base_values, higher) < LEVEL:
        return text + " ▲"
    if paired_p(base_values, values, higher) < LEVEL:
        return text + " ▼"
    return text


def values_of(result: MethodResult, key: str) -> list[float]:
    return [float(o.metrics.get(key, math.nan)) for o in result.runs]


def tables(results: dict[str, MethodResult], sets: list[str]) -> str:
    """The main table (mean ± 95 % CI, ▲/▼ against MSP) and the per-set AUROC table."""
    base = results.get(BASELINE)
    head = ["method", "score", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        chosen = sorted({str(o.metrics["ood_ray.detector"]) for o in r.runs if o.metrics.get("ood_ray.detector")})  # --detectors: per seed
        cells = [name, "/".join(chosen) or get_method(name, r.config.method_params).default_score]
        for _, key, higher in COLUMNS:
            cells.append(_cell(values_of(r, key), values_of(base, key) if base else None, higher, name == BASELINE))
        lines.append("| " + " | ".join(cells) + " |")
    per_set = ["| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for name, r in results.items():
        cells = [_cell(values_of(r, names.set_key("test", s, "auroc")), values_of(base, names.set_key("test", s, "auroc")) if base else None, True, name == BASELINE) for s in sets]
        per_set.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nTest AUROC per OOD set:\n\n" + "\n".join(per_set) + "\n"


def summary(results: dict[str, MethodResult], sets: list[str]) -> dict:
    """Per method and metric: the per-seed values, mean, CI half-width and the p-value against MSP."""
    keys = list(COLUMNS) + [(f"{s} AUROC", names.set_key("test", s, "auroc"), True) for s in sets]
    base = results.get(BASELINE)
    out: dict = {}
    for name, r in results.items():
        out[name] = {"config": {"lr": r.config.lr, "weight_decay": r.config.weight_decay, "method_params": r.config.method_params}, "seeds": [o.metrics.get("seed") for o in r.runs], "metrics": {}}
        for label, key, higher in keys:
            vals = values_of(r, key)
            mean, ci = mean_ci(vals)
            p = paired_p(vals, values_of(base, key), higher) if base is not None and name != BASELINE else math.nan
            out[name]["metrics"][key] = {"label": label, "values": vals, "mean": mean, "ci95": ci, "p_better_than_msp": p}
    return out


def tune_method(base: TrainConfig, method: str, trials: int, name: str, parent_run_id: str, sweep_options: dict) -> tuple[TrainConfig, str, dict]:
    """An equal-budget sweep of ``method``; returns its chosen config, its parent run and the choice."""
    from mlflow.tracking import MlflowClient

    from .tuning.config import SweepConfig
    from .tuning.sweep import run_sweep

    sweep = SweepConfig(method=method, base=dataclasses.replace(base, method=method, method_params={}, run_name=None), num_trials=trials, name=name, register_name="", seed=base.seed, **sweep_options)
    outcome = run_sweep(sweep)
    MlflowClient(base.mlflow_uri).set_tag(outcome.parent_run_id, "mlflow.parentRunId", parent_run_id)
    chosen = TrainConfig.from_dict(outcome.best["config"])
    cfg = dataclasses.replace(base, method=method, lr=chosen.lr, weight_decay=chosen.weight_decay, method_params=dict(chosen.method_params))
    return cfg, outcome.parent_run_id, {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "method_params": cfg.method_params}


def compare_methods(
    base: TrainConfig,
    methods: list[str],
    out: str | None = None,
    tune_trials: int = 0,
    seeds: int = 1,
    sweep_options: dict | None = None,
) -> Comparison:
    """Tune (optionally) and train every method over ``seeds`` seeds from ``base.seed`` on; one table.

    With ``tune_trials > 0`` the seed runs repeat the sweep's post-hoc search (ε, calibration) on
    val, as its trials did; ``base`` supplies everything else (epochs, workers, batch, data).
    """
    from mlflow.tracking import MlflowClient

    from . import tracking
    from .engine.build import load_benchmark
    from .tracking import provenance

    if tune_trials < 0 or seeds < 1:
        raise ValueError(f"tune_trials must be >= 0 and seeds >= 1, got tune_trials={tune_trials}, seeds={seeds}")
    t0 = time.perf_counter()
    base = base.validate()
    if tune_trials:
        base = dataclasses.replace(base, posthoc_search=True)
    bench = load_benchmark(base, verify=True)
    tracking.check_tracking(base.mlflow_uri)
    client = MlflowClient(base.mlflow_uri)
    exp_id = tracking.ensure_experiment(client, base.experiment)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracking.open_run(client, exp_id, f"compare-{stamp}", tags={"ood_ray.kind": "comparison"})
    pid = parent.info.run_id
    say(f"compare: MLflow parent run {pid}; {len(methods)} methods x {seeds} seed(s)" + (f", each tuned with {tune_trials} trials" if tune_trials else ", untuned defaults"))
    client.log_batch(pid, params=tracking.params_of({"methods": ",".join(methods), "tune_trials": tune_trials, "seeds": seeds, **{k: v for k, v in base.to_dict().items() if k not in ("method", "method_params", "run_name")}}))
    provenance.record(client, pid, bench, "evaluation")
    results: dict[str, MethodResult] = {}
    try:
        for name in methods:
            cfg = dataclasses.replace(base, method=name, method_params={}).validate()
            r = results[name] = MethodResult(name, cfg)
            if tune_trials:
                say(f"compare: tuning {name} ({tune_trials} trials)")
                r.config, r.sweep_run_id, r.tuned = tune_method(base, name, tune_trials, f"compare-{stamp}-{name}", pid, sweep_options or {})
                say(f"compare: {name} chose {r.tuned}")
            for seed in range(base.seed, base.seed + seeds):
                say(f"compare: training {name}, seed {seed}")
                run_cfg = dataclasses.replace(r.config, seed=seed, evaluate_test=True, run_name=f"compare-{name}-seed{seed}")
                o = run_training(run_cfg, tags={"mlflow.parentRunId": pid, "ood_ray.comparison_run": pid})
                o.metrics["seed"] = seed
                r.runs.append(o)
    except BaseException as e:
        tracking.set_tag(client, pid, "ood_ray.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(pid, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    sets = [s for s in bench.ood_test if all(names.set_key("test", s, "auroc") in o.metrics for r in results.values() for o in r.runs)]
    wall = time.perf_counter() - t0
    header = (
        f"# Method comparison on {bench.name}\n\n"
        f"backbone {base.backbone}, {base.epochs} epochs, batch {base.batch_size}, {base.num_workers} worker(s); "
        + (f"each method tuned by a {tune_trials}-trial sweep (objective {base.objective}, val split), " if tune_trials else f"untuned defaults (lr {base.lr}), ")
        + f"then trained with seeds {base.seed}..{base.seed + seeds - 1}. Test split; each cell is the mean"
        + (" ± the 95 % CI half-width over seeds; ▲/▼: better/worse than softmax (MSP) by a one-sided paired t-test, p < 0.05" if seeds > 1 else "")
        + ". AUROC and FPR95 use the method's own score, OOD as the positive class; "
        "AURC (lower is better) is the area under that score's risk-coverage curve on test ID. "
        f"Wall time {wall / 60:.1f} min.\n\n"
    )
    text = header + tables(results, sets)
    if tune_trials:
        text += "\nChosen configurations:\n\n" + "".join(f"- {n}: {r.tuned}\n" for n, r in results.items())
    path = Path(out) if out else Path(base.storage_path).parent / f"compare-{stamp}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    summ = summary(results, sets)
    for name, s in summ.items():
        flat = {}
        for key, v in s["metrics"].items():
            flat.update({f"{name}.{key}.mean": v["mean"], f"{name}.{key}.ci95": v["ci95"], f"{name}.{key}.p_vs_msp": v["p_better_than_msp"]})
        tracking.log_metrics(client, pid, {k: v for k, v in flat.items() if not math.isnan(v)}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        from . import plots

        (Path(tmp) / "comparison.md").write_text(text)
        (Path(tmp) / "comparison.json").write_text(json.dumps(summ, indent=2, default=str) + "\n")
        plots.comparison_bars({n: {c[0]: values_of(r, c[1]) for c in COLUMNS if c[0] not in ("ECE", "AURC ↓")} for n, r in results.items()}, Path(tmp) / "comparison.png", title=f"{bench.name}: mean ± 95 % CI over {seeds} seed(s)")
        client.log_artifacts(pid, tmp)
    client.log_metric(pid, "wall_time_s", wall)
    client.set_terminated(pid, "FINISHED")
    return Comparison(text, path, pid, results, wall)
