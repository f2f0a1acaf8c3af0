"""Train several methods with the same backbone, budget and seed, and tabulate their test metrics."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from . import tracking
from .config import TrainConfig
from .methods import get_method
from .progress import say
from .train import TrainOutcome, run_training

OOD_COLUMNS = ("auroc", "fpr95", "aupr_in")


def ood_sets(metrics: dict) -> list[str]:
    """Names of the test OOD sets found in a metrics dict (per-set keys of the default score)."""
    names = {k[len("test_ood_") : -len("_auroc")] for k in metrics if k.startswith("test_ood_") and k.endswith("_auroc")}
    return sorted(n for n in names if f"test_ood_{n}_fpr95" in metrics)


def markdown_table(outcomes: dict[str, TrainOutcome]) -> str:
    """Accuracy, ECE, NLL, then AUROC / FPR95 / AUPR-In per test OOD set and for near, far, all."""
    first = next(iter(outcomes.values())).metrics
    sets = [s for s in ood_sets(first) if all(f"test_ood_{s}_auroc" in o.metrics for o in outcomes.values())]
    groups = [("near", "test_near_"), ("far", "test_far_"), ("all", "test_")]
    cols = [(s, f"test_ood_{s}_") for s in sets] + [g for g in groups if f"{g[1]}auroc" in first]
    head = ["method", "score", "acc", "ECE", "NLL"] + [f"{name} AUROC / FPR95 / AUPR-In" for name, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, out in outcomes.items():
        m = out.metrics
        cells = [method, get_method(method).default_score, f"{m['test_acc']:.4f}", f"{m['test_ece']:.4f}", f"{m['test_nll']:.4f}"]
        for _, pre in cols:
            cells.append(" / ".join(f"{m[pre + c]:.3f}" for c in OOD_COLUMNS))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def compare_methods(base: TrainConfig, methods: list[str], out: str | None = None) -> tuple[str, Path, dict[str, TrainOutcome]]:
    """Train ``methods`` one after the other from ``base``; returns (table, markdown path, runs)."""
    outcomes: dict[str, TrainOutcome] = {}
    for name in methods:
        cfg = dataclasses.replace(base, method=name, method_params={}, run_name=f"compare-{name}").validate()
        say(f"compare: training {name}")
        outcomes[name] = run_training(cfg)
    table = markdown_table(outcomes)
    header = (
        f"# Method comparison on {Path(base.data).parent.name if base.data else 'digits-ood'}\n\n"
        f"backbone {base.backbone}, {base.epochs} epochs, batch {base.batch_size}, lr {base.lr}, seed {base.seed}, "
        f"{base.num_workers} workers. Test split; each cell is AUROC / FPR95 (OOD positive) / AUPR-In of the "
        "method's own score.\n\n"
    )
    path = Path(out) if out else Path(base.storage_path).parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + table)
    client = MlflowClient(base.mlflow_uri)
    exp_id = tracking.ensure_experiment(client, base.experiment)
    run = client.create_run(exp_id, run_name="compare-methods", tags={"ood_ray.kind": "comparison"})
    client.log_batch(run.info.run_id, params=tracking.params_of({"methods": ",".join(methods), **{k: v for k, v in base.to_dict().items() if k not in ("method", "method_params", "run_name")}}))
    for name, o in outcomes.items():
        tracking.log_metrics(client, run.info.run_id, {f"{name}.{k}": v for k, v in o.metrics.items() if k.startswith("test_") and k.count("_") <= 3}, step=0)
        client.set_tag(o.run_id, "ood_ray.comparison_run", run.info.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "comparison.md"
        p.write_text(header + table)
        client.log_artifact(run.info.run_id, str(p))
    client.set_terminated(run.info.run_id, "FINISHED")
    return table, path, outcomes
