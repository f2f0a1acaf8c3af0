"""The "Don't know" demo: its logic, the page under Streamlit's AppTest, and the real page in
headless Chromium (Debian's ``chromium`` package driven by Playwright; ``.ci/run`` installs it).

The model is a real one: Outlier Exposure trained for a few epochs in this process on digits-ood,
registered twice in a sqlite MLflow store. What the page must answer for an image is what
``OODPredictor.predict`` answers for it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import PARAMS, free_port, make_checkpoint
from PIL import Image

from ood_ray.config import TrainConfig
from ood_ray.serving import demo, load_predictor, log_ood_model

APP = str(Path(demo.__file__).with_name("demo_app.py"))
ARTIFACTS = Path(os.environ.get("OOD_RAY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAME = "ood-ray-outlier_exposure"


@pytest.fixture(scope="module")
def trained(digits_ood, tmp_path_factory):
    """(checkpoint folder, tracking URI with NAME versions 1 and 2)."""
    from ood_ray.engine import train_local

    root = tmp_path_factory.mktemp("demo")
    cfg = TrainConfig(method="outlier_exposure", data=str(digits_ood), epochs=3, num_workers=1, delta_tpr=0.95, evaluate_test=False)
    checkpoint = train_local(cfg, root / "run")[-1]["checkpoint_path"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for _ in range(2):
            with mlflow.start_run():
                log_ood_model(checkpoint, name="model", registered_model_name=NAME)
    finally:
        mlflow.set_tracking_uri(before)
    return checkpoint, uri


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)).save(buf, format="PNG")
    return buf.getvalue()


def known_and_unknown(predictor) -> tuple[tuple[str, np.ndarray, str], tuple[str, np.ndarray]]:
    """An ID test image the model accepts (with its class) and an OOD test image it rejects."""
    sets = demo.samples(predictor, per_set=16)
    ids = sets.pop("ID (test)")
    rows = predictor.predict(np.stack([a for _, a in ids])).to_dict("records")
    known = next((n, a, r["class_name"]) for (n, a), r in zip(ids, rows, strict=True) if not r["unknown"])
    ood = [item for items in sets.values() for item in items]
    rows = predictor.predict(np.stack([a for _, a in ood])).to_dict("records")
    unknown = next((n, a) for (n, a), r in zip(ood, rows, strict=True) if r["unknown"])
    return known, unknown


def test_answers_match_the_predictor_and_bad_images_get_messages(trained):
    checkpoint, _ = trained
    predictor = load_predictor(checkpoint)
    (kname, karr, kcls), (uname, uarr) = known_and_unknown(predictor)
    answers = demo.answer(predictor, [(kname, karr), (uname, png_bytes(uarr)), ("junk.png", b"not an image"), ("big.png", png_bytes(np.zeros((1, 40, 40), np.uint8)))], predictor.delta)
    assert [a.unknown for a in answers[:2]] == [False, True] and answers[0].class_name == kcls
    assert sum(answers[0].probabilities.values()) == pytest.approx(1.0) and set(answers[0].probabilities) == set(predictor.class_names)
    assert answers[1].threshold_value < predictor.delta <= answers[0].threshold_value
    assert "junk.png" in answers[2].error and "cannot decode" in answers[2].error and "8x8" in answers[2].error
    assert "big.png" in answers[3].error and "expects 8x8" in answers[3].error and "got 40x40" in answers[3].error
    # δ = 0 accepts everything, δ = 1 rejects everything
    assert not any(a.unknown for a in demo.answer(predictor, [(kname, karr), (uname, uarr)], 0.0))
    assert all(a.unknown for a in demo.answer(predictor, [(kname, karr), (uname, uarr)], 1.0))


def test_page_picks_the_newest_model_answers_samples_and_moves_with_delta(trained, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _, uri = trained
    monkeypatch.setenv(demo.ENV["tracking_uri"], uri)
    monkeypatch.setenv(demo.ENV["ui"], "http://127.0.0.1:5000")
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="model_name").value == NAME
    version = at.selectbox(key="version")
    assert version.options == ["2", "1"] and str(version.value) == "2"
    sidebar_text = " ".join(m.value for m in at.sidebar.markdown)
    assert "outlier_exposure" in sidebar_text and "Open the run in the MLflow UI](http://127.0.0.1:5000/#/experiments/" in sidebar_text
    assert "?workflowType=machine_learning)" in sidebar_text

    predictor = load_predictor(f"models:/{NAME}/2", uri)
    picked = ["ID (test)", "OOD: gaussian"]
    at.multiselect(key="samples").set_value(picked).run()
    assert not at.exception
    items = [item for label in picked for item in demo.samples(predictor)[label]]
    expected = predictor.predict(np.stack([a for _, a in items])).to_dict("records")
    shown = {m.value.split("**")[1]: m.value.split("**")[3] for m in at.markdown if " → " in m.value}
    assert shown == {n: ("Don't know" if r["unknown"] else r["class_name"]) for (n, _), r in zip(items, expected, strict=True)}
    assert at.subheader[0].value.startswith(f"{sum(r['unknown'] for r in expected)} of {len(items)} images rejected")

    at.slider(key="delta").set_value(1.0).run()
    assert at.subheader[0].value.startswith(f"{len(items)} of {len(items)} images rejected")
    at.slider(key="delta").set_value(0.0).run()
    assert at.subheader[0].value.startswith(f"0 of {len(items)} images rejected")

    at.selectbox(key="version").set_value("1").run()
    assert not at.exception and f"models:/{NAME}/1" in " ".join(m.value for m in at.sidebar.markdown)


def test_page_upload_of_a_wrong_image_is_a_message(trained, monkeypatch):
    from streamlit.testing.v1 import AppTest

    checkpoint, _ = trained
    monkeypatch.setenv(demo.ENV["model"], checkpoint)
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.file_uploader(key="uploads").upload("wide.png", png_bytes(np.zeros((1, 8, 16), np.uint8)), "image/png").run()
    assert not at.exception
    assert any("wide.png" in e.value and "expects 8x8" in e.value for e in at.error)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_page_answers_for_every_method(method, digits_ood, tmp_path, monkeypatch):
    """Every method's model (confidence with input preprocessing among them) gets its answers."""
    import json

    from streamlit.testing.v1 import AppTest

    directory, _, m = make_checkpoint(tmp_path / method, method)
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "data": str(digits_ood)}))
    monkeypatch.setenv(demo.ENV["model"], str(directory))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.multiselect(key="samples").set_value(["ID (test)", "OOD: letters"]).run()
    assert not at.exception and not at.error
    answers = [x.value for x in at.markdown if " → " in x.value]
    assert len(answers) == 8
    captions = " ".join(c.value for c in at.caption)
    assert f"{m.default_score} = " in captions and f"{m.threshold_score} = " in captions
    assert at.slider(key="delta").value == pytest.approx(m.params["delta"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "No ood-ray model is registered in"),
        ({"model": "models:/ood-ray-dismax/7"}, "cannot load the model"),
        ({"model": "/nonexistent/model"}, "model folder not found: /nonexistent/model"),
    ],
)
def test_page_without_a_model_says_why(tmp_path, monkeypatch, env, message):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(demo.ENV["tracking_uri"], f"sqlite:///{tmp_path / 'empty.db'}")
    for key, value in env.items():
        monkeypatch.setenv(demo.ENV[key], value)
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


def process_tree(proc: subprocess.Popen) -> list:
    import psutil

    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stopped(proc: subprocess.Popen, tree: list, port: int, timeout: float = 10.0) -> tuple[bool, list[int]]:
    """After a signal to ``proc``: (whether it exited within ``timeout``, the pids of its process
    tree still running or its port still open); whatever is left is killed."""
    import psutil

    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (port_open(port) or any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)):
        time.sleep(0.1)
    left = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(timeout=10)
    return proc.returncode is not None and not left and not port_open(port), left


def test_sigterm_stops_the_server_even_after_its_output_reader_is_gone(tmp_path):
    """``ood-ray demo`` serves the page in its own process: SIGTERM (a process manager, docker stop)
    ends the server and frees the port, also when the reader of its output pipe is gone (Streamlit
    prints "Stopping..." before it stops)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ood_ray.cli", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for(f"http://127.0.0.1:{port}/_stcore/health", proc)
    tree = process_tree(proc)
    proc.stdout.close()  # the reader goes away: a closed terminal, an ended `| tee`
    proc.terminate()
    assert stopped(proc, tree, port) == (True, []), f"port {port} or processes {[p.pid for p in tree]} left after SIGTERM"
    assert proc.returncode == 0


@pytest.fixture()
def browser():
    """Headless Debian Chromium under Playwright: no browser download, no network."""
    if not Path(CHROMIUM).exists():
        pytest.fail("browser tests need Debian's chromium (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.mark.browser
def test_real_browser_uploads_answer_class_and_dont_know(trained, browser, tmp_path):
    checkpoint, uri = trained
    predictor = load_predictor(checkpoint)
    (kname, karr, kcls), (_, uarr) = known_and_unknown(predictor)
    files = [tmp_path / "digit.png", tmp_path / "outlier.png"]
    files[0].write_bytes(png_bytes(karr))
    files[1].write_bytes(png_bytes(uarr))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ood_ray.cli", "demo", "--model", checkpoint, "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/_stcore/health", proc)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        page.get_by_text("Upload images or pick samples").wait_for(timeout=90_000)
        page.locator("input[type=file]").set_input_files([str(f) for f in files])
        page.get_by_text("outlier.png → Don't know").wait_for(timeout=60_000)
        page.get_by_text(f"digit.png → {kcls}", exact=True).wait_for(timeout=60_000)
        page.get_by_text("1 of 2 images rejected").wait_for(timeout=10_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    finally:
        tree = process_tree(proc)
        proc.terminate()
        gone = stopped(proc, tree, port)
    assert gone == (True, []), f"after SIGTERM (exited, processes left serving port {port}): {gone}"
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


@pytest.mark.browser
def test_mlflow_ui_link_opens_the_runs_table_of_a_sweep(browser, tmp_path):
    """The experiments ood-ray creates are tagged as model training, and the page ood-ray prints
    (``tracking.ui_url``) opens the runs table listing a sweep's parent and trial runs. (MLflow
    3.17 opens a bare experiment address on its GenAI overview in a new browser, tag or not.)"""
    from mlflow.tracking import MlflowClient

    from ood_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = tracking.ensure_experiment(client, "ood-ray")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("older")  # made by an earlier version: tagged when next used
    tracking.ensure_experiment(client, "older")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.create_run(exp_id, run_name="dismax-sweep-demo", tags={"ood_ray.kind": "sweep"})
    for i in range(2):
        client.create_run(exp_id, run_name=f"dismax-sweep-demo-trial{i}", tags={"mlflow.parentRunId": parent.info.run_id})
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        link = tracking.ui_url(exp_id, ui=f"http://127.0.0.1:{port}")
        assert tracking.browse_hint(uri, "ood-ray").endswith(tracking.ui_url(exp_id))
        page.goto(link, wait_until="domcontentloaded")
        page.get_by_text("dismax-sweep-demo", exact=True).first.wait_for(timeout=90_000)
        assert "Token Usage" not in page.inner_text("body")  # not the GenAI overview
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "mlflow_experiment.png"), full_page=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
