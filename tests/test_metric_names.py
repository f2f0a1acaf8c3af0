"""Metric names have one owner: keys are built from the set and score names, never parsed back.

The sets here are named with underscores (``ood_faces``) and the method has a second score
(``mps``): the two cases that the old key parsers got wrong (listed ``faces_mps`` as an OOD set, or
dropped ``ood_faces``). Also the comparison's statistics and the provenance a run records.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ood_ray import metric_names as names
from ood_ray.compare import BASELINE, MethodResult, mean_ci, paired_p, tables
from ood_ray.config import TrainConfig
from ood_ray.engine.evaluate import split_metrics
from ood_ray.train import TrainOutcome

SETS = {"ood_faces": "far", "faces": "far", "near_letters": "near"}


def outputs(seed=0, shift=1.0):
    rng = np.random.default_rng(seed)
    id_out = {"logits": rng.normal(size=(50, 3)), "labels": rng.integers(0, 3, 50), "mmles": rng.normal(shift, 1, 50), "mps": rng.normal(shift, 1, 50)}
    ood = {s: {"logits": rng.normal(size=(30, 3)), "mmles": rng.normal(0, 1, 30), "mps": rng.normal(0, 1, 30)} for s in SETS}
    return id_out, ood


def test_keys_of_sets_with_underscores_and_a_second_score():
    id_out, ood = outputs()
    m = split_metrics("test", id_out, ood, SETS, ["mmles", "mps"], "mmles")
    assert names.set_key("test", "ood_faces", "auroc") == "test_ood_ood_faces_auroc" in m
    assert names.set_key("test", "faces", "auroc", "mps") == "test_ood_faces_mps_auroc" in m
    assert names.mean_key("test", "fpr95", "near", "mps") in m and names.mean_key("test", "auroc") in m
    assert [label for label, _ in names.rows(m, "test", list(SETS))] == ["ood_faces", "faces", "near_letters", "near", "far", "all"]
    assert [label for label, _ in names.rows(m, "test", list(SETS), score="mps")] == ["ood_faces", "faces", "near_letters", "near", "far", "all"]
    table = names.ood_table(m, "test", list(SETS))
    assert "faces_mps" not in table and "| ood_faces |" in table
    assert f"{m['test_ood_ood_faces_auroc']:.4f}" in table
    # the default score's row and the second score's row differ
    assert names.ood_table(m, "test", list(SETS), score="mps") != table
    lines = names.text_table(m, "test", list(SETS))
    assert len(lines) == 7 and lines[1].startswith("ood_faces")


def test_mean_key_refuses_an_unknown_group():
    with pytest.raises(ValueError, match="group"):
        names.mean_key("test", "auroc", "middle")


def test_mean_ci_and_paired_test():
    mean, ci = mean_ci([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert ci == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t(0.975, df=2) * sd / sqrt(n)
    assert math.isnan(mean_ci([0.5])[1])
    # better on every seed by varying margins: significant; a wash: not
    assert paired_p([0.9, 0.95, 0.93], [0.8, 0.81, 0.85], True) < 0.05
    assert paired_p([0.9, 0.7, 0.93], [0.8, 0.81, 0.85], True) > 0.05
    assert paired_p([0.1, 0.2], [0.3, 0.4], False) == 0.0  # lower is better, equal margins
    assert math.isnan(paired_p([0.9], [0.8], True))


def outcome(metrics, seed):
    return TrainOutcome("run", {**metrics, "seed": seed}, "", "", "", 0.0, list(SETS))


def test_comparison_table_marks_methods_against_msp():
    results = {}
    for method, shift in ((BASELINE, 0.5), ("outlier_exposure", 2.0), ("logitnorm", -1.0)):
        r = results[method] = MethodResult(method, TrainConfig(method=method))
        for seed in range(3):
            id_out, ood = outputs(seed, shift)
            r.runs.append(outcome(split_metrics("test", id_out, ood, SETS, ["mps"], "mps"), seed))
    text = tables(results, list(SETS))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "▲" in rows["outlier_exposure"] and "▼" not in rows["outlier_exposure"]
    assert "▼" in rows["logitnorm"]
    assert "▲" not in rows[BASELINE] and "▼" not in rows[BASELINE]
    assert "| method | ood_faces | faces | near_letters |" in text
    assert " ± " in rows["outlier_exposure"]


def test_provenance_commit_versions_and_dataset_digest(digits_ood, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from ood_ray.data.manifest import Benchmark
    from ood_ray.tracking import provenance

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one): the commit is recorded
        assert provenance.code_version()["commit"] == head.stdout.strip()
    versions = provenance.package_versions()
    assert {"python", "torch", "mlflow", "ray", "ood-ray"} <= set(versions)

    bench = Benchmark.load(digits_ood)
    copy = tmp_path / "copy"
    shutil.copytree(Path(digits_ood).parent, copy)
    assert provenance.benchmark_digest(Benchmark.load(copy / "benchmark.json")) == provenance.benchmark_digest(bench)
    test_manifest = Path(Benchmark.load(copy / "benchmark.json").test.path)
    d = json.loads(test_manifest.read_text())
    d["shards"][0]["sha256"] = "0" * 64  # another shard content
    test_manifest.write_text(json.dumps(d))
    assert provenance.benchmark_digest(Benchmark.load(copy / "benchmark.json")) != provenance.benchmark_digest(bench)

    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("p"))
    provenance.record(client, run.info.run_id, bench)
    got = client.get_run(run.info.run_id)
    assert got.data.tags["ood_ray.version.torch"] == versions["torch"]
    (ds,) = got.inputs.dataset_inputs
    assert ds.dataset.name == bench.name and ds.dataset.digest == provenance.benchmark_digest(bench)[:16]
    assert ds.tags[0].value == "training"


@pytest.mark.parametrize(("args", "message"), [(["--seeds", "0"], "--seeds >= 1"), (["--tune-trials", "-1"], "--tune-trials must be >= 0"), (["--methods", "nope"], "unknown method")])
def test_cli_compare_rejects_bad_counts(args, message, capsys):
    from ood_ray.cli import main

    assert main(["compare", *args]) == 2
    assert message in capsys.readouterr().err
