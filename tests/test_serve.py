"""Serving: a checkpoint folder -> model, OODPredictor, and the MLflow pyfunc model (real torch and
a real sqlite MLflow store; no Ray)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, PARAMS, SIZE, images, make_checkpoint, png
from mlflow.tracking import MlflowClient
from PIL import Image

from ood_ray.config import TrainConfig
from ood_ray.engine.evaluate import normalize
from ood_ray.serving import COLUMNS, OODPredictor, load_model_dir, log_ood_model


def direct(model, method, x: np.ndarray) -> dict[str, np.ndarray]:
    """The method's eval_batch on the whole batch, as evaluation runs it."""
    with torch.enable_grad() if method.eval_needs_grad else torch.no_grad():
        out = method.eval_batch(model, normalize(torch.from_numpy(x[:, None])))
    return {k: v.detach().float().numpy() for k, v in out.items()}


@pytest.fixture(params=list(PARAMS))
def checkpoint(request, tmp_path):
    return make_checkpoint(tmp_path / f"ckpt-{request.param}", request.param)


@pytest.fixture()
def tracking(mlflow_uri, monkeypatch):
    """The sqlite store of this test as the tracking URI, with an experiment whose artifacts live
    beside it in tmp_path. Also undoes mlflow.pyfunc.load_model's prepending of the model's code
    folder to sys.path, so later tests (and Ray workers) import ood_ray from the source tree."""
    from ood_ray.tracking import ensure_experiment

    saved_path = list(sys.path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # restored after the test
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        yield ensure_experiment(MlflowClient(mlflow_uri), "t")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved_path


# ---------------------------------------------------------------------------
# load_model_dir
# ---------------------------------------------------------------------------


def test_load_model_dir_round_trips_weights(checkpoint):
    directory, original, method = checkpoint
    model, meta, cfg = load_model_dir(directory)
    assert not model.training
    saved, loaded = original.state_dict(), model.state_dict()
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), k
    assert meta == json.loads((directory / "model.json").read_text())
    assert isinstance(cfg, TrainConfig) and cfg.method == method.name
    assert cfg.method_params == PARAMS[method.name]


def test_load_model_dir_errors_name_the_file(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    state = (directory / "state.pt").read_bytes()

    (directory / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="state.pt"):
        load_model_dir(directory)
    (directory / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="state.pt"):
        load_model_dir(directory)
    (directory / "state.pt").write_bytes(state)

    meta = (directory / "model.json").read_text()
    (directory / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json"):
        load_model_dir(directory)
    (directory / "model.json").write_text(
        json.dumps({**json.loads(meta), "class_names": ["a", "b"]})
    )
    with pytest.raises(ValueError, match="state.pt.*model.json"):  # 2-class head, 10-class weights
        load_model_dir(directory)
    (directory / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_model_dir(directory)
    (directory / "model.json").write_text(meta)

    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_dir(directory)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# OODPredictor
# ---------------------------------------------------------------------------


def test_predictor_matches_eval_batch(checkpoint):
    directory, model, method = checkpoint
    x = images()
    predictor = OODPredictor.from_dir(directory)
    df = predictor.predict(x)
    assert list(df.columns) == list(COLUMNS) and len(df) == len(x)

    out = direct(model, method, x)
    delta = method.params["delta"]
    pred = out["logits"].argmax(1)
    thr = out[method.threshold_score]
    unknown = thr < delta
    np.testing.assert_array_equal(df["predicted_class"], pred)
    np.testing.assert_array_equal(df["class_name"], [CLASSES[i] for i in pred])
    np.testing.assert_array_equal(df["score"], out[method.default_score])
    np.testing.assert_array_equal(df["threshold_value"], thr)
    np.testing.assert_array_equal(df["unknown"], unknown)
    np.testing.assert_array_equal(df["label"], np.where(unknown, "unknown", df["class_name"]))
    assert (df["score_name"] == method.default_score).all()
    assert (df["threshold_score"] == method.threshold_score).all()
    assert (df["delta"] == delta).all()

    batched = OODPredictor.from_dir(directory, batch_size=4).predict(x)
    pd.testing.assert_frame_equal(batched, df, check_exact=False, rtol=1e-5, atol=1e-6)


def test_predictor_input_forms_agree(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    predictor = OODPredictor.from_dir(directory)
    x = images(5)
    ref = predictor.predict(x)
    files = []
    for i, a in enumerate(x):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(a))
    forms = {
        "NCHW": x[:, None],
        "NHWC": x[..., None],
        "int64": x.astype(np.int64),
        "tensor": torch.from_numpy(x),
        "nested lists": x.tolist(),
        "PIL": [Image.fromarray(a, mode="L") for a in x],
        "PIL RGB": [Image.fromarray(a, mode="L").convert("RGB") for a in x],
        "paths": [str(f) for f in files],
        "Paths": files,
        "bytes": [png(a) for a in x],
        "DataFrame": pd.DataFrame({"image": [png(a) for a in x]}),
    }
    for name, form in forms.items():
        pd.testing.assert_frame_equal(predictor.predict(form), ref, obj=name)
    single = predictor.predict(Image.fromarray(x[0], mode="L"))
    pd.testing.assert_frame_equal(single, ref.iloc[:1])
    assert predictor.predict(np.zeros((0, *SIZE), np.uint8)).empty


def test_delta_extremes(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    x = images(20)
    none = OODPredictor.from_dir(directory, delta=0.0).predict(x)
    assert not none["unknown"].any() and (none["label"] == none["class_name"]).all()
    every = OODPredictor.from_dir(directory, delta=1.0).predict(x)
    assert every["unknown"].all() and (every["label"] == "unknown").all()
    off = OODPredictor.from_dir(directory, delta=None).predict(x)
    assert not off["unknown"].any() and off["delta"].isna().all()
    with pytest.raises(ValueError, match="delta"):
        OODPredictor.from_dir(directory, delta=1.5)


def test_wrong_input_raises(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    predictor = OODPredictor.from_dir(directory)
    with pytest.raises(ValueError, match=r"expects 8x8.*got 10x12"):
        predictor.predict(np.zeros((2, 10, 12), np.uint8))
    with pytest.raises(ValueError, match=r"expects 8x8.*got 9x8"):
        predictor.predict([Image.new("L", (8, 9))])  # PIL sizes are (width, height)
    with pytest.raises(ValueError, match="got 8x8 with 3 channel"):
        predictor.predict(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.full((2, 8, 8), 0.5))
    with pytest.raises(ValueError, match="column 'image'"):
        predictor.predict(pd.DataFrame({"x": [b""]}))
    with pytest.raises(ValueError, match="decode"):
        predictor.predict([b"not an image"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor.predict(["missing.png"])


# ---------------------------------------------------------------------------
# MLflow pyfunc
# ---------------------------------------------------------------------------


def test_log_register_load_and_predict(tmp_path, tracking):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "dismax")
    x = images(6)
    expected = OODPredictor.from_dir(directory).predict(x)
    with mlflow.start_run(experiment_id=tracking) as run:
        info = log_ood_model(directory, registered_model_name="ood-test")
    assert info.registered_model_version == 1
    assert MlflowClient().get_model_version("ood-test", "1").run_id == run.info.run_id
    meta = info.metadata
    assert meta["method"] == "dismax" and meta["delta"] == 0.15
    assert meta["default_score"] == "es" and meta["threshold_score"] == "mps"
    assert meta["temperature"] == 0.7
    assert info.signature is None  # no input example: arrays and DataFrames both accepted

    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl"))
    reqs = Path(local, "requirements.txt").read_text()
    assert "torch==" in reqs and "mlflow==" in reqs and "ray" not in reqs
    code = os.path.join(local, "code", "ood_ray")
    assert os.path.isfile(os.path.join(code, "serving", "pyfunc.py"))
    assert not any("__pycache__" in d for d, _, _ in os.walk(code))

    loaded = mlflow.pyfunc.load_model("models:/ood-test/1")
    pd.testing.assert_frame_equal(loaded.predict(x), expected)
    frame = pd.DataFrame({"image": [png(a) for a in x]})
    pd.testing.assert_frame_equal(loaded.predict(frame), expected)

    # what `mlflow models serve` does with JSON bodies: base64 strings in a column, or nested lists
    b64 = [base64.b64encode(png(a)).decode() for a in x]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}}
    assert_same(serve_json(loaded, body), expected)
    assert_same(serve_json(loaded, {"inputs": x.tolist()}), expected)

    # the model loads and predicts where ood_ray is not importable: from its own code copy
    assert_same(run_without_ood_ray(local, x, tmp_path), expected)


def test_signature_from_png_example_carries_delta_param(tmp_path, tracking):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "confidence")
    x = images(4)
    frame = pd.DataFrame({"image": [png(a) for a in x]})
    with mlflow.start_run(experiment_id=tracking):
        info = log_ood_model(directory, input_example=(frame, {"delta": 0.5}))
    assert info.signature.inputs.input_names() == ["image"]
    assert info.metadata["method"] == "confidence" and "temperature" not in info.metadata
    assert info.signature.outputs.input_names() == list(COLUMNS)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    expected = OODPredictor.from_dir(directory).predict(x)
    pd.testing.assert_frame_equal(loaded.predict(frame), expected)
    every = loaded.predict(frame, params={"delta": 1.0})
    assert every["unknown"].all() and (every["delta"] == 1.0).all()
    # over HTTP the binary column arrives base64-encoded and MLflow decodes it from the schema
    b64 = [base64.b64encode(png(a)).decode() for a in x]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}}
    assert_same(serve_json(loaded, body), expected)
    body["params"] = {"delta": 1.0}
    assert_same(serve_json(loaded, body), every)


def test_log_needs_an_active_run(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_ood_model(directory)


def assert_same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal up to JSON's float rounding and dtypes."""
    assert list(got.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=False, rtol=1e-6)


def serve_json(model, body: dict) -> pd.DataFrame:
    """The scoring server's /invocations handler on a JSON body (no HTTP server needed)."""
    from mlflow.pyfunc import scoring_server

    res = scoring_server.invocations(
        json.dumps(body), "application/json", model, model.metadata.get_input_schema()
    )
    assert res.status == 200, res.response
    return pd.DataFrame(json.loads(res.response)["predictions"])


def run_without_ood_ray(model_dir: str, x: np.ndarray, tmp_path) -> pd.DataFrame:
    """Load the pyfunc model in a fresh interpreter that cannot import the installed ood_ray."""
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        """
        import importlib.util, os, sys
        from pathlib import Path
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(f, "__module__", "").startswith("__editable__")]
        sys.path[:] = [p for p in sys.path if not Path(p or ".", "ood_ray").is_dir()]
        if importlib.util.find_spec("ood_ray") is not None:
            sys.exit(3)
        import mlflow.pyfunc, numpy as np
        model = mlflow.pyfunc.load_model(sys.argv[1])
        assert sys.modules["ood_ray"].__file__.startswith(os.path.join(sys.argv[1], "code")), \\
            sys.modules["ood_ray"].__file__
        model.predict(np.load(sys.argv[2])).to_json(sys.argv[3], orient="split")
        """
    )
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script, model_dir, str(tmp_path / "x.npy"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 3:
        pytest.skip("ood_ray is importable from site-packages; cannot hide it")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pd.read_json(out, orient="split", dtype=False)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` gray pixels, with no pixel data at all."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_image_size_is_refused_from_the_header_before_decoding(tmp_path):
    """A tiny file may declare a huge image: every serving entry refuses it on its declared size
    (decoding would fail here, there being no pixel data, and would cost its size in memory)."""
    _, model, method = make_checkpoint(tmp_path / "ckpt", "softmax")
    predictor = OODPredictor.from_dir(tmp_path / "ckpt")
    bomb = png_header_only(13000, 13000)
    (tmp_path / "bomb.png").write_bytes(bomb)
    expected = "image size mismatch: the model expects 8x8 (HxW) with 1 channel(s) (mode L), got 13000x13000"
    for entry in (
        lambda: predictor.image_array(tmp_path / "bomb.png"),  # ood-ray predict
        lambda: predictor.predict([bomb]),  # bytes
        lambda: predictor.predict(pd.DataFrame({"image": [base64.b64encode(bomb).decode()]})),  # mlflow models serve
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            entry()


def test_unknown_score_name_in_the_model_card_is_refused(tmp_path, capsys):
    from ood_ray.cli import main

    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    meta = json.loads((directory / "model.json").read_text())
    (directory / "model.json").write_text(json.dumps({**meta, "threshold_score": "mahalanobis"}))
    with pytest.raises(ValueError, match="model.json: threshold_score 'mahalanobis' is not a score of method 'softmax'"):
        OODPredictor.from_dir(directory)
    (tmp_path / "x.png").write_bytes(png())
    assert main(["predict", "--model", str(directory), str(tmp_path / "x.png")]) == 2
    assert "threshold_score 'mahalanobis'" in capsys.readouterr().err
