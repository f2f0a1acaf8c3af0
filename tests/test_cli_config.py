"""Config validation, the CLI's data commands and its error messages, MLflow store checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ood_ray.cli import main
from ood_ray.config import ConfigError, TrainConfig, normalize_tracking_uri
from ood_ray.data.manifest import DataError
from ood_ray.tracking import TrackingError, check_tracking


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "softmaxx"}, "method='softmaxx': unknown method; choose one of: confidence, dismax, logitnorm, outlier_exposure, rotpred, softmax, t2fnorm"),
        ({"backbone": "resnet19"}, "backbone='resnet19': unknown backbone 'resnet19'; choose one of: .*small_cnn.*torchvision:<name>"),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 33, "num_workers": 2}, "batch_size=33: must be divisible by num_workers=2"),
        ({"optimizer": "lion"}, "optimizer='lion'"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"cpus_per_worker": 0}, "cpus_per_worker=0"),
        ({"method_params": {"lam": 0.5}}, "unknown parameter.*lam"),
        ({"colour": "red"}, "unknown key.*colour"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(kw)


def test_config_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OOD_RAY_RESULTS", raising=False)
    cfg = TrainConfig.from_dict({"data": "bench/benchmark.json"})
    assert cfg.data == str(tmp_path / "bench/benchmark.json")
    assert cfg.storage_path == str(tmp_path / "ood-ray-results/ray")
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path}/ood-ray-results/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert TrainConfig.from_dict({}).mlflow_uri == f"sqlite:///{tmp_path}/x.db"


def test_file_store_refused():
    with pytest.raises(ConfigError, match="file stores"):
        normalize_tracking_uri("file:./mlruns")


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 0.1\n")
    cfg = TrainConfig.from_file(tmp_path / "c.yaml", lr=0.2)
    assert (cfg.epochs, cfg.lr) == (3, 0.2)
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) epochz"):
        TrainConfig.from_file(tmp_path / "bad.yaml")


def test_unreachable_mlflow_server():
    with pytest.raises(TrackingError, match=r"http://127.0.0.1:9 is unreachable"):
        check_tracking("http://127.0.0.1:9", timeout=2)


def test_unusable_sqlite_path(tmp_path):
    (tmp_path / "file").write_text("x")
    uri = f"sqlite:///{tmp_path}/file/sub/mlflow.db"
    with pytest.raises(TrackingError, match="cannot create folder"):
        check_tracking(uri)


def test_cli_train_errors_are_messages_not_tracebacks(capsys, tmp_path):
    assert main(["train", "--method", "nope"]) == 2
    assert "method='nope': unknown method" in capsys.readouterr().err
    assert main(["train", "--backbone", "vgg"]) == 2
    assert "backbone='vgg'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.json")]) == 2
    assert "benchmark spec not found" in capsys.readouterr().err
    assert main(["train", "--mlflow-uri", "http://127.0.0.1:9", "--data", str(tmp_path / "missing.json")]) == 2


def test_cli_train_unreachable_mlflow(capsys, digits_ood):
    assert main(["train", "--data", str(digits_ood), "--mlflow-uri", "http://127.0.0.1:9"]) == 2
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_cli_shard_npz_and_verify(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), labels=rng.integers(0, 4, 30))
    assert main(["data", "shard", "--npz", str(tmp_path / "a.npz"), "--out", str(tmp_path / "s"), "--name", "a", "--role", "train", "--maxcount", "8"]) == 0
    m = json.loads((tmp_path / "s/manifest.json").read_text())
    assert m["num_samples"] == 30 and len(m["shards"]) == 4 and m["class_names"] == ["0", "1", "2", "3"]
    assert main(["data", "verify", str(tmp_path / "s")]) == 0
    assert "30 samples in 4 shards" in capsys.readouterr().out
    (tmp_path / "s/a-000001.tar").write_bytes(b"tampered")
    assert main(["data", "verify", str(tmp_path / "s")]) == 2
    assert "a-000001.tar has sha256" in capsys.readouterr().err
    np.savez(tmp_path / "b.npz", pictures=np.zeros((2, 8, 8), np.uint8))
    assert main(["data", "shard", "--npz", str(tmp_path / "b.npz"), "--out", str(tmp_path / "t"), "--name", "b", "--role", "train"]) == 2
    assert "no array named 'images'" in capsys.readouterr().err


def test_cli_build_default_and_verify(tmp_path, capsys):
    assert main(["data", "build-default", "--out", str(tmp_path / "d")]) == 0
    assert main(["data", "verify", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 16 and "1077 samples" in out


def test_cli_list_and_bool_flags():
    from ood_ray.cli import build_parser, config_from_args

    ns = build_parser().parse_args(["train", "--step-milestones", "0.3", "0.6", "--no-nesterov", "--hflip", "--param", "x=1"])
    assert ns.step_milestones == [0.3, 0.6] and ns.nesterov is False and ns.hflip is True
    ns = build_parser().parse_args(["train", "--schedule", "step", "--step-milestones", "0.3", "0.6"])
    assert config_from_args(ns).step_milestones == [0.3, 0.6]


@pytest.mark.parametrize("command", [["evaluate", "--checkpoint", "ck"], ["predict", "--model", "m", "x.png"], ["demo"]])
def test_model_commands_take_the_training_commands_mlflow_flag(command):
    # train, tune and compare name the store --mlflow-uri; the commands that read a model take both
    from ood_ray.cli import build_parser

    for flag in ("--tracking-uri", "--mlflow-uri"):
        ns = build_parser().parse_args([*command, flag, "sqlite:///x.db"])
        assert ns.tracking_uri == "sqlite:///x.db", flag


def test_storage_uri_is_kept():
    assert TrainConfig.from_dict({"storage_path": "s3://bucket/ood"}).storage_path == "s3://bucket/ood"


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ood_ray.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)
    (tmp_path / "db").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path}/db/mlflow.db")
    exp = client.get_experiment(ensure_experiment(client, "e"))
    assert exp.artifact_location.endswith(f"{tmp_path}/db/mlartifacts/e")


def test_cli_shard_upload_streams_back_through_pipe_urls(tmp_path, capsys, monkeypatch):
    """``--upload`` sends each shard away as it is written; the manifest reads them via pipe: URLs.

    The "remote" is a local folder and the commands are cp/cat, standing in for aws s3 cp.
    """
    import numpy as np

    from ood_ray.cli import main
    from ood_ray.data.manifest import Manifest
    from ood_ray.data.streams import eval_batches

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (25, 8, 8), dtype=np.uint8), rng.integers(0, 3, 25)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    remote = tmp_path / "bucket"
    remote.mkdir()
    argv = ["data", "shard", "--npz", str(tmp_path / "a.npz"), "--out", str(tmp_path / "local"), "--name", "up", "--role", "train", "--maxcount", "10"]
    assert main([*argv, "--upload", str(remote), "--upload-cmd", "cp {src} {dst}", "--read-cmd", "cat {url}"]) == 0
    assert sorted(p.name for p in remote.iterdir()) == ["manifest.json", "up-000000.tar", "up-000001.tar", "up-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["manifest.json"]  # no local shard left
    assert "OOD_RAY_ALLOW_PIPE='cat {url}'" in capsys.readouterr().out  # a custom read command must be allowed
    with pytest.raises(DataError, match=r"shards\[0\]\.url would run the shell command 'cat "):
        Manifest.load(tmp_path / "local")
    monkeypatch.setenv("OOD_RAY_ALLOW_PIPE", "cat {url}")
    m = Manifest.load(tmp_path / "local")
    assert all(u.startswith("pipe:cat ") for u in m.urls())
    got = sorted((k, int(y)) for _, ys, ks in eval_batches(m, 0, 1, 7) for k, y in zip(ks, ys, strict=True))
    assert got == [(f"{i:07d}", int(labels[i])) for i in range(25)]
    # a failing upload names the shard and the command
    assert main([*argv, "--upload", str(tmp_path / "missing" / "dir"), "--upload-cmd", "cp {src} {dst}", "--read-cmd", "cat {url}"]) == 2
    assert "uploading" in capsys.readouterr().err
