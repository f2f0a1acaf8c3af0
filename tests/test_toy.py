"""ood_ray.toy: 2-D confidence maps of the registered methods (in-process, no Ray).

One run of the four default methods (seed 0, logged to a sqlite MLflow store) is shared by the
module; the determinism tests retrain single methods, which is cheap because each method reseeds
torch and so does not depend on the others.
"""

from __future__ import annotations

import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from ood_ray.methods import METHODS
from ood_ray.toy import DEFAULT_TOY_METHODS, TOY_METHODS, run_toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FOUR = ["softmax", "outlier_exposure", "confidence", "dismax"]
NUMBERS = ("delta", "train_acc", "val_acc", "auroc_box")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    threads = torch.get_num_threads()
    uri = f"sqlite:///{tmp}/m.db"
    result = run_toy(out=tmp / "nested" / "figs" / "toy.png", seed=0, methods=FOUR, mlflow_uri=uri, experiment="ood-ray-toy")
    return {"result": result, "uri": uri, "threads": threads}


def test_png_is_written_into_new_folders(toy):
    path = toy["result"]["path"]
    assert path.is_file() and path.parent.name == "figs"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 30_000 < len(data) < 5_000_000, len(data)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 800 and height > 700, (width, height)


def test_every_method_learns_the_blobs(toy):
    methods = toy["result"]["methods"]
    assert list(methods) == FOUR
    for name, r in methods.items():
        assert r["val_acc"] > 0.9, (name, r["val_acc"])
        assert r["train_acc"] > 0.9, (name, r["train_acc"])
        assert r["seconds"] > 0


def test_scores_and_deltas_follow_each_method(toy):
    for name, r in toy["result"]["methods"].items():
        cls = METHODS[name]
        low, high = cls.threshold_range
        assert r["threshold_score"] == cls.threshold_score
        # not clipped to a bound: the threshold score is not saturated on val ID
        assert low < r["delta"] < high, (name, r["delta"])
        assert r["params"]["delta"] == r["delta"]
        grid = toy["result"]["grids"][name]
        assert grid["score"].shape == grid["threshold"].shape == (200, 200)
        assert np.isfinite(grid["score"]).all() and np.isfinite(grid["threshold"]).all()
        # the δ contour exists: part of the plane is "don't know", part is known
        assert grid["threshold"].min() < r["delta"] < grid["threshold"].max(), name
    dismax = toy["result"]["methods"]["dismax"]
    assert (dismax["score"], dismax["threshold_score"]) == ("es", "mps")
    assert dismax["params"]["alpha"] == 0  # FPR mixes image quadrants: off for 2-D points
    assert toy["result"]["methods"]["confidence"]["score"] == "confidence"


def test_outlier_exposure_separates_the_box_best(toy):
    # OE is trained on exactly the uniform box: over seeds 0..4 its box AUROC was 0.89-0.90 and
    # softmax's 0.34-0.41.
    m = toy["result"]["methods"]
    assert m["outlier_exposure"]["auroc_box"] > 0.8
    assert m["outlier_exposure"]["auroc_box"] > m["softmax"]["auroc_box"] + 0.3


def test_same_seed_same_numbers_other_seed_different(toy, tmp_path):
    first = toy["result"]
    # reversed order and a subset: a method's result must not depend on what ran before it
    again = run_toy(out=tmp_path / "again.png", seed=0, methods=["dismax", "confidence"])
    for name in ("dismax", "confidence"):
        for key in NUMBERS:
            assert again["methods"][name][key] == first["methods"][name][key], (name, key)
        assert again["methods"][name]["params"] == first["methods"][name]["params"]
        np.testing.assert_array_equal(again["grids"][name]["score"], first["grids"][name]["score"])
    other = run_toy(out=tmp_path / "other.png", seed=1, methods=["confidence"])
    assert other["methods"]["confidence"]["delta"] != first["methods"]["confidence"]["delta"]
    assert not np.array_equal(other["grids"]["confidence"]["score"], first["grids"]["confidence"]["score"])
    assert again["run_id"] is None and other["run_id"] is None


def test_bad_method_and_bad_suffix_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"'no_such_method'.*softmax.*dismax"):
        run_toy(out=tmp_path / "t.png", methods=["softmax", "no_such_method"])
    with pytest.raises(ValueError, match=r"toy\.jpg.*\.png"):
        run_toy(out=tmp_path / "toy.jpg", methods=["softmax"])
    assert not any(tmp_path.iterdir())


def test_choices_and_process_state(toy):
    assert set(DEFAULT_TOY_METHODS) == set(FOUR) and "logitnorm" in TOY_METHODS
    assert set(TOY_METHODS) <= set(METHODS)
    assert torch.get_num_threads() == toy["threads"]  # run_toy restores the thread count
    assert plt.get_fignums() == []  # the figure was closed


def test_mlflow_run_has_params_metrics_and_png(toy):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(toy["uri"])
    run = client.get_run(toy["result"]["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "ood-ray-toy"
    params, metrics = run.data.params, run.data.metrics
    assert params["seed"] == "0"
    assert params["dismax.alpha"] == "0.0"
    assert params["outlier_exposure.lam"] == "0.5"
    assert "confidence.budget" in params
    for name, r in toy["result"]["methods"].items():
        assert float(params[f"{name}.delta"]) == pytest.approx(r["delta"])
        for key in ("delta", "val_acc", "auroc_box", "seconds"):
            assert metrics[f"{name}.{key}"] == pytest.approx(r[key]), (name, key)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["toy.png"]
