"""Post-hoc detectors on real checkpoints: chosen on val after training, carried by the checkpoint
into the predictor, and ``ood-ray evaluate``'s table logged to MLflow. In-process training (no Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ood_ray import metric_names as names
from ood_ray.checkpoint import load_model_dir, load_state
from ood_ray.config import ConfigError, TrainConfig, check_detectors
from ood_ray.detectors import DETECTORS
from ood_ray.serving import OODPredictor

CANDIDATES = ["energy", "knn", "mahalanobis"]


@pytest.fixture(scope="module")
def trained(digits_ood, tmp_path_factory):
    """An OE checkpoint trained 3 epochs whose detector was chosen among CANDIDATES, and its reports."""
    from ood_ray.engine import train_local

    root = tmp_path_factory.mktemp("detectors")
    cfg = TrainConfig(method="outlier_exposure", data=str(digits_ood), epochs=3, num_workers=1, delta_tpr=0.95, evaluate_test=True, detectors=CANDIDATES)
    reports = train_local(cfg, root / "run")
    return reports[-1]["checkpoint_path"], reports, root


def test_training_chooses_the_detector_with_the_best_val_auroc(trained):
    checkpoint, reports, _ = trained
    last = reports[-1]
    per_detector = {n: last[f"detector_{n}_val_auroc"] for n in CANDIDATES}
    chosen = last["ood_ray.detector"]
    assert chosen == max(per_detector, key=per_detector.get)
    assert last["val_auroc"] == pytest.approx(per_detector[chosen])  # the headline score is the detector's
    assert "test_auroc" in last and names.mean_key("test", "auroc", names.ALL, "msp") in last  # the method's own score stays, tagged
    assert "ood_ray.detector" not in reports[0]  # earlier epochs: the method's own score
    meta = json.loads((Path(checkpoint) / "model.json").read_text())
    assert meta["detector"]["name"] == chosen and meta["threshold_score"] == chosen and meta["default_score"] == chosen
    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    assert cfg["detectors"] == [chosen]
    saved = load_state(checkpoint)["detector"]
    assert saved and all(isinstance(v, torch.Tensor) for v in saved.values())


def test_the_predictor_scores_with_the_checkpoint_s_detector_and_its_delta(trained, digits_ood):
    checkpoint, reports, _ = trained
    model, meta, cfg = load_model_dir(checkpoint)
    assert model.detector is not None and model.detector.name == meta["detector"]["name"]
    predictor = OODPredictor(model, meta, cfg)
    assert predictor.threshold_score == meta["detector"]["name"] and predictor.delta == pytest.approx(meta["detector"]["delta"])
    from ood_ray.data.manifest import Benchmark
    from ood_ray.data.streams import eval_batches

    bench = Benchmark.load(digits_ood)
    x, _, _ = next(iter(eval_batches(bench.test, 0, 1, 64)))
    rows = predictor.predict(x.numpy())
    with torch.no_grad():
        expected = model.detector.score(model.features(x.float() / 127.5 - 1.0)).double().numpy()
    np.testing.assert_allclose(rows["threshold_value"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (rows["unknown"] == (rows["threshold_value"] < predictor.delta)).all()
    # δ set on val ID at 95 %: about 5 % of test ID is rejected, not all and not none
    assert 0.0 < rows["unknown"].mean() < 0.3


def test_evaluate_table_matches_training_choice_and_is_logged(trained, tmp_path):
    from ood_ray.detector_eval import evaluate_checkpoint

    checkpoint, reports, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = evaluate_checkpoint(checkpoint, ["msp", "knn", "mahalanobis", "odin", "tempscale"], tracking_uri=uri, experiment="eval", out=tmp_path / "t.md")
    assert table.rows == ["method_msp", "msp", "knn", "mahalanobis", "odin", "tempscale"]
    assert set(table.fitted) == {"tempscale"} and table.fitted["tempscale"]["T"] > 0  # what its fit found on val ID
    # the same fit and the same val search as in training give the same val AUROC
    for n in ("knn", "mahalanobis"):
        assert table.val_auroc[n] == pytest.approx(reports[-1][f"detector_{n}_val_auroc"], abs=1e-6)
    for r in table.rows:
        for s in table.ood_sets:
            assert 0.0 <= table.metrics[names.set_key("test", s, "auroc", r)] <= 1.0
    # the detector msp on a linear head is the method's own msp
    assert table.metrics[names.mean_key("test", "auroc", names.ALL, "msp")] == pytest.approx(table.metrics[names.mean_key("test", "auroc", names.ALL, "method_msp")], abs=1e-6)
    text = (tmp_path / "t.md").read_text()
    assert "| knn |" in text and "k=" in text
    assert f"| tempscale | T={table.fitted['tempscale']['T']:.4g} (fitted) |" in text
    run = MlflowClient(uri).get_run(table.run_id)
    assert run.data.metrics["tempscale.fitted_T"] == pytest.approx(table.fitted["tempscale"]["T"])
    assert run.data.metrics[names.mean_key("test", "auroc", names.ALL, "knn")] == pytest.approx(table.metrics[names.mean_key("test", "auroc", names.ALL, "knn")])
    assert run.data.tags["ood_ray.kind"] == "detector-evaluation"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(table.run_id)}
    assert {"detectors.md", "detectors.json"} <= arts


def test_evaluate_command_prints_the_table(trained, tmp_path, capsys):
    from ood_ray.cli import main

    checkpoint, _, _ = trained
    assert main(["evaluate", "--checkpoint", checkpoint, "--detectors", "energy,react", "--no-mlflow", "--out", str(tmp_path / "e.md")]) == 0
    out = capsys.readouterr().out
    assert "| react |" in out and "| energy |" in out and "chosen on val: " in out and "best on test: AUROC" in out
    assert main(["evaluate", "--checkpoint", checkpoint, "--detectors", "nope", "--no-mlflow"]) == 2
    assert "unknown detector(s) 'nope'" in capsys.readouterr().err


def test_detectors_that_need_a_linear_head_are_refused_for_dismax():
    with pytest.raises(ConfigError, match="vim.*linear classification head.*dismax"):
        check_detectors("dismax", {}, ["knn", "vim"])
    everything = check_detectors("dismax", {}, ["all"])
    assert "knn" in everything and "mahalanobis" in everything and "msp" in everything
    assert not [n for n in everything if DETECTORS[n].needs_linear_head]
    assert check_detectors("confidence", {}, ["all"]) == list(DETECTORS)  # its class head is linear
    with pytest.raises(ConfigError, match="detectors"):
        TrainConfig(method="dismax", detectors=["ash"]).validate()
    # "all" is kept as given and expanded per method where it is used (compare shares one base)
    cfg = TrainConfig(method="softmax", detectors=["all", "all"]).validate()
    assert cfg.detectors == ["all"]
    assert dataclasses.replace(cfg, method="dismax").validate().detectors == ["all"]


def test_a_dismax_checkpoint_carries_a_feature_detector(digits_ood, tmp_path):
    from ood_ray.engine import train_local

    cfg = TrainConfig(method="dismax", data=str(digits_ood), epochs=2, num_workers=1, delta_tpr=0.95, evaluate_test=False, detectors=["maxlogit", "knn"])
    last = train_local(cfg, tmp_path / "run")[-1]
    predictor = OODPredictor.from_dir(last["checkpoint_path"])
    assert predictor.threshold_score == last["ood_ray.detector"] in ("maxlogit", "knn")
    assert len(predictor.predict(np.zeros((3, 8, 8), np.uint8))) == 3


def test_mlflow_records_the_chosen_detector_of_a_model(trained, tmp_path):
    """The registered model (the checkpoint folder) keeps the fitted detector."""
    from ood_ray.serving import load_predictor, log_ood_model

    checkpoint, _, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            info = log_ood_model(checkpoint, name="model")
    finally:
        mlflow.set_tracking_uri(before)
    assert info.metadata["threshold_score"] == json.loads((Path(checkpoint) / "model.json").read_text())["detector"]["name"]
    loaded = load_predictor(info.model_uri, uri)
    assert loaded.model.detector is not None and loaded.threshold_score == loaded.model.detector.name


def test_demo_page_answers_with_the_detector_and_its_delta(trained, monkeypatch):
    """The "Don't know" page scores with the checkpoint's detector; δ (on an unbounded score) is a
    number field starting at the checkpoint's δ, and δ above every score rejects every image."""
    from streamlit.testing.v1 import AppTest

    from ood_ray.serving import demo

    checkpoint, _, _ = trained
    meta = json.loads((Path(checkpoint) / "model.json").read_text())
    monkeypatch.setenv(demo.ENV["model"], checkpoint)
    app = Path(demo.__file__).with_name("demo_app.py")
    at = AppTest.from_file(str(app), default_timeout=120).run()
    at.multiselect(key="samples").set_value(["ID (test)", "OOD: letters"]).run()
    assert not at.exception and not at.error
    assert at.number_input(key="delta").value == pytest.approx(meta["delta"], rel=1e-4)
    captions = " ".join(c.value for c in at.caption)
    assert f"{meta['detector']['name']} = " in captions
    at.number_input(key="delta").set_value(1e9).run()
    assert at.subheader[0].value.startswith("8 of 8 images rejected")
    at.number_input(key="delta").set_value(-1e9).run()
    assert at.subheader[0].value.startswith("0 of 8 images rejected")


def test_the_fit_subset_is_spread_over_classes_and_the_same_for_any_worker_count(trained, digits_ood):
    from ood_ray.data.manifest import Benchmark
    from ood_ray.engine.detect import collect_features, in_subset
    from ood_ray.methods import get_method

    checkpoint, _, _ = trained
    model, meta, _ = load_model_dir(checkpoint)
    method = get_method(meta["method"], meta["method_params"])
    bench = Benchmark.load(digits_ood)
    sub = collect_features(model, method, bench.train, 0, 1, "cpu", 64, limit=150)
    assert 0 < len(sub["keys"]) <= 150 and list(sub["keys"]) == sorted(sub["keys"])
    assert set(sub["labels"].tolist()) == set(range(10))
    stride = -(-bench.train.num_samples // 150)
    assert all(in_subset(k, stride) for k in sub["keys"])  # chosen by key alone: no rank or order in it
    # two ranks' shares (gathered by hand: no process group here) give the same subset as one
    shares = [collect_features(model, method, bench.train, r, 2, "cpu", 64, limit=150) for r in (0, 1)]
    assert sorted(k for s in shares for k in s["keys"])[:150] == list(sub["keys"])
    full = collect_features(model, method, bench.train, 0, 1, "cpu", 64)
    assert len(full["keys"]) == bench.train.num_samples


def test_a_detector_that_cannot_be_fitted_is_left_out_and_delta_is_carried_over(digits_ood, tmp_path):
    """Eight train samples cannot give Mahalanobis all ten class means: it is left out, knn is
    chosen. Without --delta-tpr, δ on knn's score accepts the share of val ID the method's δ did."""
    from ood_ray.data.manifest import Benchmark
    from ood_ray.engine import train_local
    from ood_ray.engine.detect import carried_delta
    from ood_ray.methods import get_method

    cfg = TrainConfig(method="softmax", data=str(digits_ood), epochs=1, num_workers=1, evaluate_test=False, detectors=["mahalanobis", "knn"], detector_fit_samples=8, method_params={"delta": 0.5})
    last = train_local(cfg, tmp_path / "run")[-1]
    assert last["ood_ray.detector"] == "knn" and "detector_mahalanobis_val_auroc" not in last
    assert last["detector_fit_samples"] <= 8
    model, meta, _ = load_model_dir(last["checkpoint_path"])
    assert meta["delta"] == pytest.approx(last["chosen_detector_delta"])
    # the same share of val ID accepted by the method's δ on msp and by the carried δ on knn
    bench = Benchmark.load(digits_ood)
    predictor = OODPredictor(model, meta)
    from ood_ray.data.streams import eval_batches

    images = np.concatenate([x.numpy() for x, _, _ in eval_batches(bench.val, 0, 1, 256)])
    out = predictor.outputs(images)
    own_share = float(np.mean(out["msp"] >= 0.5))
    assert float(np.mean(out["knn"] >= meta["delta"])) == pytest.approx(own_share, abs=0.02)
    assert carried_delta(model, get_method("softmax", {"delta": None}), bench, out["knn"].astype(np.float64), 0, 1, "cpu", 256) is None


def test_choosing_a_detector_needs_val_ood_sets(trained, digits_ood):
    from ood_ray.data.manifest import Benchmark, DataError
    from ood_ray.engine.detect import choose_detector
    from ood_ray.methods import get_method

    checkpoint, _, _ = trained
    model, meta, _ = load_model_dir(checkpoint)
    bench = Benchmark.load(digits_ood)
    bench.ood_val = {}
    cfg = TrainConfig(method="outlier_exposure", data=str(digits_ood), detectors=["knn"])
    with pytest.raises(DataError, match="needs val OOD sets"):
        choose_detector(model, get_method(meta["method"], meta["method_params"]), cfg, bench, 0, 1, "cpu")


def test_detectors_flag_takes_commas_like_evaluate():
    from ood_ray.cli import build_parser, config_from_args

    ns = build_parser().parse_args(["train", "--detectors", "knn,vim", "energy"])
    assert config_from_args(ns).detectors == ["knn", "vim", "energy"]


def test_odin_scores_images_through_the_wrapper_and_a_restored_checkpoint(trained, digits_ood):
    """ODIN needs the model and input gradients: in ``WithDetector.eval_batch`` (run under no_grad,
    as evaluation does) and after ``restore_detector`` rebinds it to a loaded model."""
    from ood_ray.checkpoint import restore_detector
    from ood_ray.data.manifest import Benchmark
    from ood_ray.data.streams import eval_batches
    from ood_ray.engine.detect import collect_features, fit
    from ood_ray.methods import get_method
    from ood_ray.methods.with_detector import WithDetector

    checkpoint, _, _ = trained
    model, meta, _ = load_model_dir(checkpoint)
    method = get_method(meta["method"], meta["method_params"])
    bench = Benchmark.load(digits_ood)
    train = collect_features(model, method, bench.train, 0, 1, "cpu", 256, limit=50)
    det = fit("odin", {"temperature": 10.0, "epsilon": 0.0014}, train, model, method)
    x = next(iter(eval_batches(bench.test, 0, 1, 32)))[0].float() / 127.5 - 1.0
    with torch.no_grad():
        out = WithDetector(method, det, 0.5).eval_batch(model, x)
    expected = det.score(x)
    np.testing.assert_allclose(out["odin"].numpy(), expected.numpy(), rtol=1e-6)
    assert not np.allclose(expected.numpy(), make_plain_msp(model, x, 10.0))  # the perturbation moved the scores
    fresh, _, _ = load_model_dir(checkpoint)
    restored = restore_detector(fresh, method, {"name": "odin", "params": det.params}, det.state(), Path("model.json"), Path("state.pt"))
    np.testing.assert_allclose(restored.score(x).numpy(), expected.numpy(), rtol=1e-6)


def make_plain_msp(model, x, temperature: float) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(x).double() / temperature, 1).amax(1).numpy()
