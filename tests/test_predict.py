"""``ood-ray predict``, ``ood_ray.serving.predict`` and a real ``mlflow models serve`` over HTTP, on a
real sqlite MLflow store with a logged and registered (untrained, so cheap) model; no Ray."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import free_port, images, make_checkpoint, png
from mlflow.tracking import MlflowClient
from PIL import Image

from ood_ray.cli import main
from ood_ray.serving import (
    COLUMNS,
    ModelLoadError,
    OODPredictor,
    load_predictor,
    log_ood_model,
    predict,
)
from ood_ray.tracking import ensure_experiment

NAME = "ood-predict-test"
N = 6
LINE = re.compile(r"^(\S+)  class=(\S+)  msp=(\d\.\d{4})  δ=(\d\.\d{4})  (known|UNKNOWN)$")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding version 1 of NAME (a softmax checkpoint, alias "champion"), and
    N PNG files of the model's size beside it."""
    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    ckpt, _, _ = make_checkpoint(tmp / "ckpt", "softmax")
    saved_path = list(sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=ensure_experiment(MlflowClient(uri), "t")) as run:
            info = log_ood_model(ckpt, registered_model_name=NAME)
        MlflowClient(uri).set_registered_model_alias(NAME, "champion", "1")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        sys.path[:] = saved_path
    assert info.registered_model_version == 1
    x = images(N, seed=3)
    files = []
    for i, a in enumerate(x):
        files.append(tmp / f"img{i}.png")
        files[-1].write_bytes(png(a))
    return SimpleNamespace(
        uri=uri,
        model=f"models:/{NAME}/1",
        run_id=run.info.run_id,
        ckpt=ckpt,
        x=x,
        files=files,
        tmp=tmp,
    )


@pytest.fixture(autouse=True)
def _quiet_downloads(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def assert_rows_match(rows: list[dict], expected: list[dict], tol: float = 1e-6) -> None:
    """Row by row; scores to float32 rounding (batches of other sizes or layouts may sum in another order)."""
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert got["class_name"] == want["class_name"]
        assert got["predicted_class"] == want["predicted_class"]
        assert got["unknown"] == want["unknown"] and got["label"] == want["label"]
        assert got["score_name"] == want["score_name"]
        assert got["score"] == pytest.approx(want["score"], abs=tol)
        assert got["threshold_value"] == pytest.approx(want["threshold_value"], abs=tol)
        assert got["delta"] == want["delta"]


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------


def test_api_on_png_files_matches_predictor(store, monkeypatch):
    ref = OODPredictor.from_dir(store.ckpt).predict(store.x)
    rows = predict(store.model, [str(f) for f in store.files], tracking_uri=store.uri)
    assert [r["image"] for r in rows] == [str(f) for f in store.files]
    assert all(list(r) == ["image", *COLUMNS] for r in rows)
    json.dumps(rows)  # plain Python values
    assert [r["class_name"] for r in rows] == list(ref["class_name"])
    assert [r["score"] for r in rows] == pytest.approx(list(ref["score"]), rel=1e-6)  # PNG is lossless: the same pixels (batches of other sizes may round differently)
    assert [r["unknown"] for r in rows] == list(ref["unknown"])
    assert [r["threshold_value"] for r in rows] == list(ref["threshold_value"])
    assert all(r["score_name"] == "msp" and r["delta"] == 0.15 for r in rows)
    assert [r["unknown"] for r in rows] == [r["threshold_value"] < 0.15 for r in rows]

    # other input kinds of the same pixels, other URIs of the same model, the default tracking URI
    rgb = store.tmp / "rgb.png"
    Image.fromarray(store.x[0], mode="L").convert("RGB").save(rgb)
    mixed = [rgb, Image.fromarray(store.x[1], mode="L"), store.x[2], png(store.x[3])]
    assert_rows_match(predict(store.ckpt, mixed), rows[:4])
    predictor = load_predictor(f"models:/{NAME}@champion", store.uri)
    assert_rows_match(predict(predictor, store.files), rows)
    assert_rows_match(predict(predictor, store.x), rows)  # an N x H x W array
    assert_rows_match(predict(f"runs:/{store.run_id}/model", store.files[:2], store.uri), rows[:2])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert_rows_match(predict(f"models:/{NAME}/latest", store.files[:2]), rows[:2])
    assert predict(predictor, []) == []


def test_api_delta_override_flips_unknown(store):
    predictor = load_predictor(store.model, store.uri)
    base = predict(predictor, store.files)
    known = predict(predictor, store.files, delta=0.0)
    assert not any(r["unknown"] for r in known) and all(r["delta"] == 0.0 for r in known)
    assert [r["label"] for r in known] == [r["class_name"] for r in known]
    above = min(1.0, max(r["threshold_value"] for r in base) + 1e-3)
    unknown = predict(store.model, store.files, tracking_uri=store.uri, delta=above)
    assert all(r["unknown"] and r["label"] == "unknown" for r in unknown)
    assert [r["score"] for r in unknown] == [r["score"] for r in base]
    assert predictor.delta == 0.15  # an override is a copy: the loaded predictor keeps its δ
    with pytest.raises(ValueError, match="delta"):
        load_predictor(store.ckpt, delta=1.5)


def test_api_errors_name_the_file_or_uri(store, tmp_path):
    good = str(store.files[0])
    with pytest.raises(FileNotFoundError, match="missing.png: image file not found"):
        predict(store.ckpt, [good, str(tmp_path / "missing.png")])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png: not a readable image"):
        predict(store.ckpt, [tmp_path / "text.png"])
    Image.new("L", (9, 8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match=r"wide\.png: image size mismatch.*expects 8x8.*got 8x9"):
        predict(store.ckpt, [tmp_path / "wide.png"])
    with pytest.raises(TypeError, match="list"):
        predict(store.ckpt, good)

    with pytest.raises(ModelLoadError, match=rf"models:/{NAME}/99.*version=99\) not found"):
        load_predictor(f"models:/{NAME}/99", store.uri)
    with pytest.raises(ModelLoadError, match="models:/no-such-model/1.*not found"):
        load_predictor("models:/no-such-model/1", store.uri)
    with pytest.raises(ModelLoadError, match="alias nope not found"):
        load_predictor(f"models:/{NAME}@nope", store.uri)
    absent = tmp_path / "absent.db"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_predictor(store.model, f"sqlite:///{absent}")
    assert not absent.exists()  # no empty store created on the way
    t = time.monotonic()
    with pytest.raises(ModelLoadError, match=rf"{store.model}.*unreachable"):
        load_predictor(store.model, f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - t < 10  # no minutes of MLflow client retries
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_predictor(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="neither an MLflow model"):
        load_predictor(tmp_path)


# ---------------------------------------------------------------------------
# ood-ray predict
# ---------------------------------------------------------------------------


def test_cli_prints_one_line_per_image(store, capsys):
    files = [str(f) for f in store.files]
    expected = predict(store.model, files, tracking_uri=store.uri)
    assert main(["predict", "--model", store.model, "--tracking-uri", store.uri, *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N
    for line, want in zip(lines, expected, strict=True):
        m = LINE.match(line)
        assert m, line
        assert m[1] == want["image"] and m[2] == want["class_name"]
        assert m[3] == f"{want['score']:.4f}" and m[4] == "0.1500"
        assert m[5] == ("UNKNOWN" if want["unknown"] else "known")

    argv = ["predict", "--model", store.model, "--tracking-uri", store.uri, "--json"]
    assert main([*argv, "--delta", "0", *files]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_rows_match(rows, predict(store.model, files, tracking_uri=store.uri, delta=0.0))
    assert not any(r["unknown"] for r in rows)
    assert main([*argv, "--delta", "1", *files]) == 0
    assert all(json.loads(line)["unknown"] for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize(
    "model, image, message",
    [
        (f"models:/{NAME}/1", "missing.png", "missing.png: image file not found"),
        (f"models:/{NAME}/7", "img0.png", rf"models:/{NAME}/7 .*version=7\) not found"),
        ("models:/other/1", "img0.png", "models:/other/1 .*other not found"),
    ],
    ids=["missing-image", "unknown-version", "unknown-model"],
)
def test_cli_errors_exit_2_with_a_message(store, capsys, model, image, message):
    argv = ["predict", "--model", model, "--tracking-uri", store.uri, str(store.tmp / image)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("ood-ray: error: ") and re.search(message, err), err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_console_script_predict(store):
    """The installed ``ood-ray`` entry point, in a fresh process, with the store from the env."""
    script = Path(sys.executable).with_name("ood-ray")  # the venv's bin/, else the PATH
    script = str(script) if script.is_file() else shutil.which("ood-ray")
    assert script, "the ood-ray console script is not installed"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    files = [str(f) for f in store.files[:3]]
    proc = subprocess.run(
        [script, "predict", "--model", f"models:/{NAME}@champion", *files],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    expected = predict(store.model, files, tracking_uri=store.uri)
    assert [LINE.match(line).group(1, 2) for line in lines] == [
        (r["image"], r["class_name"]) for r in expected
    ]


# ---------------------------------------------------------------------------
# mlflow models serve
# ---------------------------------------------------------------------------


def post(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]
    except urllib.error.HTTPError as e:
        raise AssertionError(f"HTTP {e.code}: {e.read()[:2000]!r}") from None


@pytest.fixture(scope="module")
def served(store):
    """``mlflow models serve`` of the registered model, as a real HTTP server; yields its URL."""
    port = free_port()
    log = store.tmp / f"serve-{port}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", store.model]
    cmd += ["--env-manager", "local", "--port", str(port), "--host", "127.0.0.1"]
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=store.tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "no /ping"
                print(log.read_text(errors="replace"))
                pytest.fail(f"mlflow models serve: {state}; log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(url=base, log=log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mlflow_models_serve_matches_python_api(store, served):
    expected = predict(store.model, store.files, tracking_uri=store.uri)
    b64 = [base64.b64encode(f.read_bytes()).decode() for f in store.files]
    split = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}}
    try:
        assert_rows_match(post(served.url + "/invocations", split), expected, tol=1e-5)
        assert_rows_match(
            post(served.url + "/invocations", {"inputs": store.x.tolist()}), expected, tol=1e-5
        )
    except AssertionError:
        print(served.log.read_text(errors="replace"))
        raise


def test_mlflow_models_serve_never_opens_a_path_sent_by_the_client(store, served):
    """A string is base64 of an image, never a path on the server: an image file the server has,
    a missing file, a text file and a folder all get the same 400 answer, which names none of them."""
    (store.tmp / "secret.txt").write_text("not an image")
    paths = [store.files[0], store.tmp / "missing.png", store.tmp / "secret.txt", store.tmp]
    answers = []
    for path in paths:
        body = {"dataframe_split": {"columns": ["image"], "data": [[str(path)]]}}
        req = urllib.request.Request(
            served.url + "/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400, str(path)
        answers.append(e.value.read().decode())
    assert all(a == answers[0] for a in answers), answers
    assert "not a base64-encoded image" in answers[0]
    assert not any(name in answers[0] for name in ("img0.png", "missing.png", "secret.txt"))
    b64 = base64.b64encode(store.files[0].read_bytes()).decode()
    ok = post(served.url + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [[b64]]}})
    assert ok[0]["class_name"] == predict(store.model, store.files[:1], tracking_uri=store.uri)[0]["class_name"]
