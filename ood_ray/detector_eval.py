"""``ood-ray evaluate``: every post-hoc detector on one trained checkpoint, in one table.

Each detector is fitted on the train split's features (at most ``fit_samples``, evenly spread),
its parameters are chosen on the val split (``Detector.grid``, mean val AUROC over the val OOD
sets, as in training), and then it is scored once on the test split: AUROC, FPR95 and AUPR-In (the
trapezoid, as OpenOOD computes it) per test OOD set and averaged over near, far and all sets, and the
AURC of its risk-coverage curve on test ID. The checkpoint's own default score
(``method_<score>``) is a row too, for reference. No retraining; the test split is read only for
the final scores. The table goes to the terminal, a Markdown file and an MLflow run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metric_names as names
from .checkpoint import method_of
from .config import (
    ConfigError,
    TrainConfig,
    check_detectors,
    default_tracking_uri,
    redact,
    results_dir,
)
from .data.default import ensure_default
from .data.manifest import Benchmark
from .engine.detect import Scorer, collect_features, search
from .engine.evaluate import score_split, scoring_mode, split_metrics
from .progress import say

COLUMNS = ("auroc", "fpr95", "aupr_in_trapz")  # AUPR-In as OpenOOD v1.5 computes it (trapezoid)


@dataclass
class DetectorTable:
    """What ``evaluate_checkpoint`` found: per detector its chosen parameters, val AUROC and the
    flat test metrics (keys of ``metric_names`` with the detector as the score)."""

    checkpoint: str
    method: str
    rows: list[str]  # score tags in table order: method_<score>, then the detectors
    params: dict[str, dict] = field(default_factory=dict)
    fitted: dict[str, dict] = field(default_factory=dict)  # detector -> values its fit found (``Detector.fitted``: tempscale's T)
    val_auroc: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    ood_sets: list[str] = field(default_factory=list)
    groups: dict[str, str | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # detector -> why it was left out
    run_id: str | None = None
    markdown_path: str | None = None
    wall_time_s: float = 0.0

    def best(self, key: str = "auroc", group: str = names.ALL) -> str:
        """The row with the highest test ``key`` over ``group`` (lowest for FPR95)."""
        sign = -1.0 if key.startswith("fpr") else 1.0
        return max(self.rows, key=lambda r: sign * self.metrics.get(names.mean_key("test", key, group, r), -math.inf * sign))

    def val_choice(self) -> str:
        """The detector a val-only choice picks (highest mean val AUROC; the first one on ties),
        as ``--detectors`` does in training (which never picks the method's own score row)."""
        rows = self.rows[1:] or self.rows
        return max(rows, key=lambda r: (self.val_auroc.get(r, -math.inf), -rows.index(r)))

    def markdown(self) -> str:
        groups = [g for g in (*names.GROUPS, names.ALL) if any(names.mean_key("test", "auroc", g, r) in self.metrics for r in self.rows)]
        head = ["detector", "parameters", "val AUROC", "AURC ↓", *self.ood_sets, *(f"**{g}**" for g in groups)]
        lines = [
            f"Test split: AUROC / FPR95 / AUPR-In of `{self.method}` at `{self.checkpoint}` per OOD set, and AURC on test ID. "
            "Detectors fitted on train features, parameters chosen on val; higher AUROC and AUPR-In and lower FPR95 and AURC are better. "
            "AUPR-In is the trapezoid under the PR curve, as OpenOOD v1.5 computes it; AURC the area under the risk-coverage curve.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]

        def cell(prefix: str) -> str:
            vals = [self.metrics.get(prefix + c, math.nan) for c in COLUMNS]
            return " / ".join(f"{v:.3f}" for v in vals)

        for r in self.rows:
            params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.get(r, {}).items())
            params = ", ".join([*([params] if params else []), *(f"{k}={v:.4g} (fitted)" for k, v in self.fitted.get(r, {}).items())]) or "-"
            val = self.val_auroc.get(r, math.nan)
            aurc = self.metrics.get(names.selective_key("test", "aurc", r), math.nan)
            cells = [cell(names.set_key("test", s, "", r)) for s in self.ood_sets]
            cells += [cell(names.mean_key("test", "", g, r)) for g in groups]
            lines.append(f"| {r} | {params} | {val:.3f} | {aurc:.4f} | " + " | ".join(cells) + " |")
        if self.skipped:
            lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())]
        return "\n".join(lines) + "\n"


def resolve_benchmark(cfg: TrainConfig | None, data: str | None) -> Benchmark:
    """The benchmark to evaluate on: ``data``, else the one the checkpoint was trained on."""
    if data:
        return Benchmark.load(data)
    if cfg is not None and cfg.data:
        if not Path(cfg.data).exists():
            raise ConfigError(f"the checkpoint was trained on {cfg.data}, which is not on this machine; pass --data BENCHMARK")
        return Benchmark.load(cfg.data)
    return Benchmark.load(ensure_default(seed=cfg.data_seed if cfg is not None else 0))


def check_fits(bench: Benchmark, meta: dict) -> None:
    """The benchmark's images and classes must be the model's."""
    if list(bench.train.image_size) != list(meta["image_size"]) or bench.train.mode != meta["mode"]:
        raise ConfigError(
            f"{bench.path}: images are {bench.train.image_size[0]}x{bench.train.image_size[1]} {bench.train.mode}, "
            f"the model takes {meta['image_size'][0]}x{meta['image_size'][1]} {meta['mode']}"
        )
    if bench.class_names != list(meta["class_names"]):
        raise ConfigError(f"{bench.path}: classes {bench.class_names} differ from the model's {meta['class_names']}")
    if not bench.ood_val or not bench.ood_test:
        raise ConfigError(f"{bench.path}: needs val and test OOD sets (ood_val, ood_test) to choose and score detectors")


def evaluate_checkpoint(checkpoint: str, detectors: list[str] | None = None, *, tracking_uri: str | None = None, **kwargs) -> DetectorTable:
    """Score ``detectors`` (None or ``["all"]``: every one the model's head supports) on the
    checkpoint at ``checkpoint`` (a folder or an MLflow model URI); ``kwargs`` as ``evaluate_model``
    (``data``, ``experiment``, ``out``, ``fit_samples``, ``batch_size``, ``log_mlflow``)."""
    from .serving import load_predictor

    tracking_uri = tracking_uri or default_tracking_uri()
    predictor = load_predictor(checkpoint, tracking_uri)
    return evaluate_model(predictor.model, predictor.meta, predictor.config, str(checkpoint), detectors, tracking_uri=tracking_uri, **kwargs)


def evaluate_model(
    model,
    meta: dict,
    cfg: TrainConfig | None,
    label: str,
    detectors: list[str] | None = None,
    *,
    data: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "ood-ray",
    out: str | Path | None = None,
    fit_samples: int = 50_000,
    batch_size: int = 256,
    log_mlflow: bool = True,
    bench: Benchmark | None = None,
) -> DetectorTable:
    """``evaluate_checkpoint`` on a model already built: ``model`` (a ``Classifier``), its
    ``model.json`` dict ``meta`` and training config ``cfg`` (None for a model trained elsewhere),
    named ``label`` in the table and the MLflow run."""
    t0 = time.perf_counter()
    if fit_samples < 1:
        raise ConfigError(f"fit_samples={fit_samples}: must be >= 1")
    tracking_uri = tracking_uri or default_tracking_uri()
    method = method_of(meta)  # the method's own scores; a detector the checkpoint carries is re-chosen here
    chosen = check_detectors(meta["method"], meta["method_params"], detectors or ["all"])
    bench = bench or resolve_benchmark(cfg, data)
    check_fits(bench, meta)
    say(f"evaluating {len(chosen)} detectors on {meta['method']} ({meta['backbone']}) with {bench.path}")
    train = collect_features(model, method, bench.train, 0, 1, "cpu", batch_size, limit=fit_samples)
    val, test = Scorer(model, method, bench, "val", 0, 1, "cpu", batch_size), Scorer(model, method, bench, "test", 0, 1, "cpu", batch_size)
    own = f"method_{method.default_score}"
    table = DetectorTable(checkpoint=label, method=meta["method"], rows=[own], ood_sets=list(bench.ood_test), groups={n: m.group for n, m in bench.ood_test.items()})
    if not detectors or "all" in detectors:
        from .detectors import DETECTORS

        table.skipped = {n: f"needs a linear head; {meta['method']} has none" for n in DETECTORS if n not in chosen}
    # the method's own default score (with its input preprocessing, if any), for reference
    own_val = split_metrics("val", *_outputs(model, method, bench, "val", batch_size), {n: m.group for n, m in bench.ood_val.items()}, [method.default_score], "")
    table.val_auroc[own] = own_val[names.mean_key("val", "auroc", names.ALL, method.default_score)]
    id_out, ood_outs = _outputs(model, method, bench, "test", batch_size)
    id_scores = {own: id_out[method.default_score]}
    ood_scores = {n: {own: o[method.default_score]} for n, o in ood_outs.items()}
    results, failed = search(chosen, train, val, model, method)
    table.skipped.update({n: f"cannot be fitted: {why}" for n, why in failed.items()})
    for i, result in enumerate(results, 1):
        name, det = result["name"], result["detector"]
        s_id, s_ood = test.scores(det)
        id_scores[name] = s_id
        for n, s in s_ood.items():
            ood_scores[n][name] = s
        table.rows.append(name)
        table.params[name] = result["params"]
        if fitted := det.fitted():
            table.fitted[name] = fitted
        table.val_auroc[name] = result["val_auroc"]
        say(f"[{i}/{len(results)}] {name}: val AUROC {result['val_auroc']:.4f} with {result['params'] or 'no parameters'} ({result['candidates']} tried)")
    id_all = {"logits": test.id["logits"], "labels": test.id["labels"], **{k: v.astype(np.float64) for k, v in id_scores.items()}}
    metrics = split_metrics("test", id_all, ood_scores, table.groups, table.rows, "")
    table.metrics = metrics  # with the checkpoint's test accuracy, ECE, NLL (the same for every row)
    table.wall_time_s = time.perf_counter() - t0
    path = Path(out) if out else results_dir() / f"detectors-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.markdown())
    table.markdown_path = str(path)
    if log_mlflow:
        table.run_id = _log(table, tracking_uri, experiment, bench)
    return table


def evaluate_imported(spec: str, pretrained: str | None, detectors: list[str] | None = None, *, data: str | None = None, input_size: int | None = None, **kwargs) -> DetectorTable:
    """``evaluate_checkpoint`` for a model trained elsewhere (``ood_ray.imported``): ``spec`` is
    ``torchvision:<name>``, ``timm:<name>`` or ``module:function``; ``data`` is required."""
    from .imported import build_imported

    if not data:
        raise ConfigError("--model needs --data BENCHMARK (a model trained elsewhere has no benchmark of its own)")
    if input_size is not None and input_size < 8:
        raise ConfigError(f"--input-size {input_size}: must be >= 8")
    bench = Benchmark.load(data)
    model, meta = build_imported(spec, pretrained, bench, input_size)
    label = spec + (f" ({pretrained})" if pretrained else "")
    return evaluate_model(model, meta, None, label, detectors, data=data, bench=bench, **kwargs)


def _outputs(model, method, bench: Benchmark, split: str, batch_size: int):
    with scoring_mode(method):
        return score_split(model, method, bench, split, 0, 1, "cpu", batch_size)


def _log(table: DetectorTable, tracking_uri: str, experiment: str, bench: Benchmark) -> str:
    from mlflow.tracking import MlflowClient

    from . import tracking
    from .tracking import provenance

    tracking.check_tracking(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = tracking.ensure_experiment(client, experiment)
    run = tracking.open_run(client, exp_id, f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}", tags={"ood_ray.kind": "detector-evaluation", "ood_ray.checkpoint": redact(table.checkpoint), "ood_ray.method": table.method})
    run_id = run.info.run_id
    params = {"detectors": ",".join(table.rows[1:]), **{f"{r}.{k}": v for r, p in table.params.items() for k, v in p.items()}}
    client.log_batch(run_id, params=tracking.params_of(params))
    provenance.record(client, run_id, bench)
    fitted = {f"{r}.fitted_{k}": v for r, f in table.fitted.items() for k, v in f.items()}
    metrics = {**table.metrics, **{names.mean_key("val", "auroc", names.ALL, r): v for r, v in table.val_auroc.items()}, **fitted, "wall_time_s": table.wall_time_s}
    tracking.log_metrics(client, run_id, metrics, 0)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "detectors.md").write_text(table.markdown())
        client.log_artifact(run_id, str(Path(tmp, "detectors.md")))
        blob = {"checkpoint": table.checkpoint, "method": table.method, "rows": table.rows, "params": table.params, "fitted": table.fitted, "val_auroc": table.val_auroc, "metrics": table.metrics, "skipped": table.skipped}
        Path(tmp, "detectors.json").write_text(json.dumps(blob, indent=1, default=float) + "\n")
        client.log_artifact(run_id, str(Path(tmp, "detectors.json")))
    client.set_terminated(run_id, "FINISHED")
    return run_id
