"""Every invalid setting fails before any Ray or MLflow work, with a message naming key and value.

No Ray, no data: ``TrainConfig.from_dict`` / ``SweepConfig.validate`` / ``plan_concurrency`` are
called directly (cluster resources passed as a dict), and once through the CLI.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ood_ray.config import ConfigError, TrainConfig
from ood_ray.methods import METHODS, get_method
from ood_ray.objective import OBJECTIVES
from ood_ray.tuning.config import SweepConfig
from ood_ray.tuning.sweep import plan_concurrency

DELTA_METHODS = sorted(name for name, cls in METHODS.items() if "delta" in cls.defaults)


def config_error(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(d)
    return str(e.value)


def assert_names(msg: str, key: str, value: str) -> None:
    """``key=value`` (value as str() or repr()) appears in the message."""
    assert re.search(rf"\b{re.escape(key)}\b", msg), f"{key!r} not named in: {msg}"
    assert value in msg, f"{value!r} not named in: {msg}"


# --- method hyperparameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params,key,value",
    [
        # λ of Outlier Exposure must be >= 0
        ("outlier_exposure", {"lam": -1}, "lam", "lam=-1"),
        ("outlier_exposure", {"lam": -0.5}, "lam", "lam=-0.5"),
        ("outlier_exposure", {"outlier_ratio": 0}, "outlier_ratio", "outlier_ratio=0"),
        # β (the confidence budget) must be > 0
        ("confidence", {"budget": 0}, "budget", "budget (β)=0"),
        ("confidence", {"budget": -0.3}, "budget", "budget (β)=-0.3"),
        # ε (input preprocessing) must be >= 0
        ("confidence", {"epsilon": -0.001}, "epsilon", "epsilon (ε)=-0.001"),
        ("confidence", {"lam": -1}, "lam", "lam=-1"),
        ("confidence", {"cutout": -2}, "cutout", "cutout=-2"),
        ("dismax", {"alpha": -1}, "alpha", "alpha=-1"),
        ("dismax", {"entropic_scale": 0}, "entropic_scale", "entropic_scale=0"),
        ("dismax", {"calibration_bins": 0}, "calibration_bins", "calibration_bins=0"),
        ("dismax", {"calibration_bounds": [5, 1]}, "calibration_bounds", "[5, 1]"),
        ("dismax", {"calibration_objective": "brier"}, "calibration_objective", "'brier'"),
    ],
)
def test_method_param_out_of_range(method, params, key, value):
    msg = config_error({"method": method, "method_params": params})
    assert msg.startswith("method_params=")
    assert_names(msg, key, value)


@pytest.mark.parametrize("method", DELTA_METHODS)
@pytest.mark.parametrize("delta", [-0.1, 1.5, float("nan"), float("inf")])
def test_delta_outside_unit_interval(method, delta):
    msg = config_error({"method": method, "method_params": {"delta": delta}})
    assert_names(msg, "delta", f"delta={delta}")


def test_every_method_with_a_threshold_is_checked():
    assert {"softmax", "outlier_exposure", "confidence", "dismax"} <= set(DELTA_METHODS)
    for name in DELTA_METHODS:  # δ = None turns the threshold off and is valid
        assert TrainConfig.from_dict({"method": name, "method_params": {"delta": None}}).method_params == {"delta": None}


@pytest.mark.parametrize(
    "method,params,key,value",
    [
        ("outlier_exposure", {"lam": "abc"}, "lam", "lam='abc'"),
        ("outlier_exposure", {"lam": None}, "lam", "lam=None"),
        ("outlier_exposure", {"lam": [0.5]}, "lam", "lam=[0.5]"),
        ("outlier_exposure", {"lam": True}, "lam", "lam=True"),
        ("outlier_exposure", {"lam": float("inf")}, "lam", "lam=inf"),
        ("outlier_exposure", {"outlier_ratio": 0.001}, "outlier_ratio", "outlier_ratio=0.001"),
        ("confidence", {"budget": "0.3"}, "budget", "budget (β)='0.3'"),
        ("confidence", {"budget": float("nan")}, "budget", "budget (β)=nan"),
        ("confidence", {"epsilon": float("inf")}, "epsilon", "epsilon (ε)=inf"),
        ("confidence", {"cutout": 2.5}, "cutout", "cutout=2.5"),
        ("dismax", {"calibration_bins": 7.5}, "calibration_bins", "calibration_bins=7.5"),
        ("dismax", {"calibration_bins": "15"}, "calibration_bins", "calibration_bins='15'"),
        ("dismax", {"calibration_bounds": "0.001,100"}, "calibration_bounds", "'0.001,100'"),
        ("dismax", {"calibration_bounds": [0.001]}, "calibration_bounds", "[0.001]"),
        ("dismax", {"calibration_objective": 1}, "calibration_objective", "calibration_objective=1"),
        ("softmax", {"delta": "0.5"}, "delta", "delta='0.5'"),
    ],
)
def test_method_param_wrong_type(method, params, key, value):
    msg = config_error({"method": method, "method_params": params})
    assert_names(msg, key, value)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_params_not_a_mapping_or_unknown(method):
    assert_names(config_error({"method": method, "method_params": "lam=1"}), "method_params", "'lam=1'")
    assert_names(config_error({"method": method, "method_params": None}), "method_params", "None")
    msg = config_error({"method": method, "method_params": {"lamda": 0.5, 3: 1}})
    assert_names(msg, "lamda", "unknown parameter")
    assert "3" in msg


# --- score names --------------------------------------------------------------------------------
# Each method reports all of its scores and uses its own default_score / threshold_score; only
# DisMax lets its default score be chosen (its `score` parameter), and only among its own scores.


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("key", ["score", "default_score", "threshold_score"])
def test_score_names_cannot_be_smuggled_in_as_params(method, key):
    msg = config_error({"method": method, "method_params": {key: "mahalanobis"}})
    if method == "dismax" and key == "score":
        assert_names(msg, "score", "'mahalanobis'; choose one of: mps, es")
    else:
        assert_names(msg, key, "unknown parameter")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("params", [{}, {"epsilon": 0.002}])
def test_method_score_names_are_consistent(method, params):
    params = {k: v for k, v in params.items() if k in METHODS[method].defaults}
    m = get_method(method, params)
    names = m.score_names()
    assert m.default_score in names and m.threshold_score in names, (m.default_score, m.threshold_score, names)
    assert len(names) == len(set(names))


# --- training settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,key,value",
    [
        ({"method": "oe"}, "method", "'oe'"),
        ({"method": "Softmax"}, "method", "'Softmax'"),
        ({"backbone": "resnet1000"}, "backbone", "'resnet1000'"),
        ({"objective": "auc"}, "objective", "'auc'"),
        ({"objective": "fpr@95"}, "objective", "'fpr@95'"),
        ({"epochs": 1.5}, "epochs", "1.5"),
        ({"epochs": True}, "epochs", "True"),
        ({"epochs": "3"}, "epochs", "'3'"),
        ({"epochs": 0}, "epochs", "0"),
        ({"batch_size": -32}, "batch_size", "-32"),
        ({"lr": "abc"}, "lr", "'abc'"),
        ({"lr": float("nan")}, "lr", "nan"),
        ({"lr": float("inf")}, "lr", "inf"),
        ({"weight_decay": float("nan")}, "weight_decay", "nan"),
        ({"weight_decay": -1e-4}, "weight_decay", "-0.0001"),
        ({"momentum": -0.9}, "momentum", "-0.9"),
        ({"momentum": 1.5}, "momentum", "1.5"),
        ({"step_gamma": 0}, "step_gamma", "0"),
        ({"step_milestones": 0.5}, "step_milestones", "0.5"),
        ({"step_milestones": [0.5, "x"]}, "step_milestones", "'x'"),
        ({"step_milestones": [0.5, 1.5]}, "step_milestones", "1.5"),
        ({"hflip": "yes"}, "hflip", "'yes'"),
        ({"nesterov": 1}, "nesterov", "1"),
        ({"use_gpu": "auto"}, "use_gpu", "'auto'"),
        ({"shuffle_buffer": -1}, "shuffle_buffer", "-1"),
        ({"seed": -1}, "seed", "-1"),
        ({"data_seed": -3}, "data_seed", "-3"),
        ({"min_val_acc": 1.5}, "min_val_acc", "1.5"),
        ({"delta_tpr": 1.0}, "delta_tpr", "1.0"),
        ({"delta_tpr": "0.95"}, "delta_tpr", "'0.95'"),
        ({"cpus_per_worker": float("inf")}, "cpus_per_worker", "inf"),
        ({"max_failures": -1}, "max_failures", "-1"),
        ({"experiment": ""}, "experiment", "''"),
        ({"experiment": 7}, "experiment", "7"),
        ({"data": 42}, "data", "42"),
        ({"data": "bench\x00mark"}, "data", "'bench\\x00mark'"),
        ({"storage_path": ["a"]}, "storage_path", "['a']"),
        ({"mlflow_uri": "./mlruns"}, "mlflow_uri", "'./mlruns'"),
        ({"mlflow_uri": "sqlite:///a\x00b.db"}, "mlflow_uri", "sqlite:///a"),
        ({"method_params": []}, "method_params", "[]"),
    ],
)
def test_train_setting_invalid(d, key, value):
    assert_names(config_error(d), key, value)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_known_objectives_pass(objective):
    assert TrainConfig.from_dict({"objective": objective}).objective == objective


def test_numbers_of_the_right_kind_pass():
    import numpy as np

    cfg = TrainConfig.from_dict({"epochs": np.int64(3), "lr": 1, "step_milestones": (0.3, 0.6), "method": "confidence", "method_params": {"lam": np.float32(0.2), "cutout": 2.0}})
    assert cfg.epochs == 3 and type(cfg.epochs) is int and cfg.step_milestones == [0.3, 0.6]
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # validate is idempotent


# --- sweeps -------------------------------------------------------------------------------------


def sweep(tmp_path, **kw) -> SweepConfig:
    base = TrainConfig(num_workers=kw.pop("num_workers", 1), storage_path=str(tmp_path / "ray"), mlflow_uri=f"sqlite:///{tmp_path}/m.db")
    return SweepConfig(method=kw.pop("method", "dismax"), base=base, **kw)


@pytest.mark.parametrize("num_trials", [0, -1, -100, 2.5, "8", None])
def test_sweep_num_trials_invalid(tmp_path, num_trials):
    with pytest.raises(ConfigError) as e:
        sweep(tmp_path, num_trials=num_trials).validate()
    assert_names(str(e.value), "num_trials", f"num_trials={num_trials!r}")


def test_sweep_unknown_method(tmp_path):
    with pytest.raises(ConfigError) as e:
        sweep(tmp_path, method="oe").validate()
    assert_names(str(e.value), "method", "'oe'")


def test_sweep_bad_base_is_named(tmp_path):
    s = sweep(tmp_path, method="outlier_exposure")
    s.base.method_params = {"lam": -2}
    with pytest.raises(ConfigError) as e:
        s.validate()
    assert_names(str(e.value), "lam", "lam=-2")


# plan_concurrency with 2 workers x 2 GPUs on a 1-GPU cluster is covered in test_tune.py; these are the
# cases it leaves out: a cluster without GPUs and a single worker wanting more GPUs than exist.
@pytest.mark.parametrize(
    "cluster,gpus_per_worker,workers,need,have",
    [
        ({"CPU": 16}, 1, 1, "1", "0"),
        ({"CPU": 16, "GPU": 0}, 0.5, 4, "2", "0"),
        ({"CPU": 64, "GPU": 4}, 8, 1, "8", "4"),
        ({"CPU": 64, "GPU": 2.0}, 1.5, 2, "3", "2"),
    ],
)
def test_more_gpus_per_trial_than_the_cluster_has(tmp_path, cluster, gpus_per_worker, workers, need, have):
    s = sweep(tmp_path, num_workers=workers).validate()
    with pytest.raises(ConfigError) as e:
        plan_concurrency(s, cluster, gpus_per_worker=gpus_per_worker)
    msg = str(e.value)
    assert_names(msg, "gpus_per_worker", f"gpus_per_worker={gpus_per_worker}")
    assert f"num_workers={workers}" in msg and f"needs {need} GPUs per trial; the cluster has {have}" in msg


# --- the command line ---------------------------------------------------------------------------


def fail_if_called(*args, **kwargs):
    raise AssertionError("reached training: validation should have failed first")


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--method", "outlier_exposure", "--param", "lam=-1"], "lam=-1"),
        (["--method", "outlier_exposure", "--param", "lam=abc"], "lam='abc'"),
        (["--method", "confidence", "--param", "budget=0"], "budget (β)=0"),
        (["--method", "confidence", "--param", "epsilon=-0.1"], "epsilon (ε)=-0.1"),
        (["--method", "dismax", "--param", "delta=1.5"], "delta=1.5"),
        (["--method", "oe", "--param", "lam=0.5"], "method='oe'"),
        (["--objective", "auc"], "objective='auc'"),
        (["--momentum", "nan"], "momentum=nan"),
    ],
)
def test_cli_train_rejects_before_any_work(tmp_path, capsys, monkeypatch, argv, named):
    import ood_ray.train
    from ood_ray.cli import main

    monkeypatch.setattr(ood_ray.train, "run_training", fail_if_called)
    monkeypatch.setattr(ood_ray.train, "ensure_ray", fail_if_called)
    common = ["--storage-path", str(tmp_path / "ray"), "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main(["train", *argv, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ood-ray: error: ") and named in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"concurrency": "2"}, "concurrency"),
        ({"trial_cpus": float("inf")}, "trial_cpus"),
        ({"num_trials": True}, "num_trials"),
        ({"grace_period": 1.5}, "grace_period"),
        ({"max_trial_failures": -5}, "max_trial_failures"),
        ({"name": 5}, "name"),
        ({"gpus_per_worker": "x"}, "gpus_per_worker"),
        ({"reduction_factor": float("nan")}, "reduction_factor"),
    ],
)
def test_sweep_config_types_from_python(kw, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        SweepConfig(method="softmax", base=TrainConfig(), **kw).validate()


# --- every failure is one line, exit 2 (the traceback only with --debug) ----------------------


@pytest.fixture()
def bad_files(tmp_path):
    from PIL import Image

    np.savez(tmp_path / "obj.npz", images=np.array([object()], dtype=object), labels=np.zeros(1))
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, int))
    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, int))
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    for name, url in (("null", None), ("number", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"name": "m", "role": "train", "image_size": [8, 8], "mode": "L", "class_names": ["a"], "shards": [{"url": url, "count": 1}]}))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bomb" / "c0").mkdir(parents=True)
    Image.new("L", (12000, 16000)).save(tmp_path / "bomb" / "c0" / "big.png")  # 192 Mpx: above PIL's bomb limit
    return tmp_path


@pytest.mark.parametrize(
    "argv,named",
    [
        (["train", "--param", "lam=["], "--param 'lam=['"),
        (["train", "--method", "outlier_exposure", "--param", 'lam=!!python/object/apply:os.system ["id"]'], "not a YAML value"),
        (["train", "--config", "{d}/bin.yaml"], "bin.yaml: not a text file"),
        (["train", "--config", "{d}"], "is not a file"),
        (["train", "--data-seed", "4294967296"], "data_seed=4294967296"),
        (["train", "--epochs", "10000000"], "epochs=10000000"),
        (["train", "--augment-pad", "1000000000"], "augment_pad=1000000000"),
        (["train", "--method", "outlier_exposure", "--param", "outlier_ratio=1e9"], "outlier_ratio=1000000000.0"),
        (["data", "verify", "{d}/null"], "shards[0].url must be a non-empty string, got None"),
        (["data", "verify", "{d}/number"], "shards[0].url must be a non-empty string, got 5"),
        (["data", "verify", "{d}/ok.npz"], "ok.npz: not a text file"),
        (["data", "build-default", "--out", "{d}/bd", "--seed", "-1"], "seed must be a non-negative int, got -1"),
        (["data", "build-default", "--out", "{d}/afile"], "afile"),
        (["data", "shard", "--npz", "{d}/obj.npz", "--out", "{d}/o", "--name", "x", "--role", "train"], "obj.npz: cannot read its arrays"),
        (["data", "shard", "--npz", "{d}/empty.npz", "--out", "{d}/o", "--name", "x", "--role", "train"], "empty.npz: 'images' (0)"),
        (["data", "shard", "--npz", "{d}/ok.npz", "--out", "{d}/o", "--name", "x", "--role", "train", "--image-size", "0", "0"], "--image-size 0 0"),
        (["data", "shard", "--npz", "{d}/ok.npz", "--out", "{d}/o", "--name", "x", "--role", "train", "--upload", "{d}/up", "--upload-cmd", "cp {{src}} {{dst}} {{x}}"], "upload command 'cp {src} {dst} {x}'"),
        (["data", "shard", "--folder", "{d}/bomb", "--out", "{d}/o", "--name", "x", "--role", "train", "--image-size", "8", "8", "--mode", "L"], "big.png: cannot read image"),
    ],
)
def test_cli_failures_are_one_line(bad_files, capsys, argv, named):
    from ood_ray.cli import main

    argv = [a.format(d=bad_files) for a in argv]
    storage = ["--storage-path", str(bad_files / "ray"), "--mlflow-uri", f"sqlite:///{bad_files}/mlflow.db"] if argv[0] == "train" else []
    assert main([*argv, *storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ood-ray: error: ") and named in err, err
    assert "Traceback" not in err and not (bad_files / "ray").exists()


def test_debug_shows_the_traceback(tmp_path):
    from ood_ray.cli import main

    with pytest.raises(ConfigError, match="epochs=10000000"):
        main(["--debug", "train", "--epochs", "10000000", "--storage-path", str(tmp_path / "ray")])
