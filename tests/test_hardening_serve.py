"""Hostile checkpoints and images on the serving path: every file is written here by the project's
own code and then damaged (NaN weights, misshapen or non-finite detector statistics, a boolean δ,
a 100,000-deep model.json, two million class names, 16-bit images). Real torch, no Ray."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, SIZE, images, make_checkpoint, png
from PIL import Image

from ood_ray.checkpoint import META_FILE, STATE_FILE, load_model_dir, model_meta
from ood_ray.cli import main
from ood_ray.config import TrainConfig
from ood_ray.detectors import make_detector
from ood_ray.methods.with_detector import WithDetector
from ood_ray.serving import OODPredictor, predict
from ood_ray.serving.demo import answer


def with_detector(directory: Path, method_name: str, name: str, **params) -> Path:
    """A checkpoint folder of ``method_name`` whose ``name`` detector is fitted on random features,
    saved as training saves it (statistics in state.pt, the detector in model.json)."""
    directory, model, method = make_checkpoint(directory, method_name)
    torch.manual_seed(0)
    z = torch.randn(40, model.num_features)
    det = make_detector(name, **params).fit(z, torch.arange(40) % len(CLASSES), method.class_head(model.head))
    state = torch.load(directory / STATE_FILE, weights_only=True)
    torch.save({**state, "detector": det.state()}, directory / STATE_FILE)
    cfg = TrainConfig(method=method_name, method_params=json.loads((directory / "config.json").read_text())["method_params"])
    meta = model_meta(cfg, CLASSES, SIZE, "L", scoring=WithDetector(method, det, -1.0))
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def edit_state(directory: Path, edit) -> None:
    state = torch.load(directory / STATE_FILE, weights_only=True)
    edit(state)
    torch.save(state, directory / STATE_FILE)


def edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    (directory / META_FILE).write_text(json.dumps({**meta, **changes}))


def cli_error(directory: Path, tmp_path: Path, capsys) -> str:
    """``ood-ray predict`` on one good image: exit 2 with one line; returns that line."""
    image = tmp_path / "x.png"
    image.write_bytes(png(images(1)[0]))
    assert main(["predict", "--model", str(directory), str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("ood-ray: error: ") and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------
# NaN and inf: never "known"
# ---------------------------------------------------------------------------


def test_nan_or_infinite_scores_are_unknown(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    model, meta, cfg = load_model_dir(directory)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))  # a model that broke after loading
    x = images(3)
    for delta in (0.15, 0.0, None):
        df = OODPredictor(model, meta, cfg, delta=delta).predict(x)
        assert df["score"].isna().all() and df["unknown"].all() and (df["label"] == "unknown").all(), delta
    assert all(a.unknown for a in answer(OODPredictor(model, meta, cfg), [("a", x[0]), ("b", x[1])], 0.0))  # the demo page

    ok = OODPredictor.from_dir(directory)
    out = ok.outputs(x)
    out["msp"] = np.array([np.inf, -np.inf, 0.5], np.float32)
    assert ok.frame(out)["unknown"].tolist() == [True, True, False]
    assert ok.with_delta(None).frame(out)["unknown"].tolist() == [True, True, False]


@pytest.mark.parametrize("key, value", [("head.weight", math.nan), ("backbone.features.1.running_var", math.inf)])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, capsys, key, value):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    edit_state(directory, lambda s: s["model"][key].view(-1)[0].fill_(value))
    with pytest.raises(ValueError, match=rf"state\.pt: tensor {re.escape(key)} holds 1 NaN or infinite value"):
        load_model_dir(directory)
    assert key in cli_error(directory, tmp_path, capsys)


@pytest.mark.parametrize(
    "method_name, detector, params, key, damage, message",
    [
        ("softmax", "knn", {"k": 5}, "bank", lambda t: t.fill_(math.nan), "state bank holds 5120 NaN or infinite"),
        ("softmax", "knn", {"k": 5}, "bank", lambda t: t[:, :7].clone(), r"state bank has shape \(40, 7\), expected \(N, 128\)"),
        ("softmax", "mahalanobis", {}, "means", lambda t: t[:, :7].clone(), r"state means has shape \(10, 7\), expected \(10, 128\)"),
        ("softmax", "mahalanobis", {}, "precision", lambda t: t.to(torch.int64), "state precision must be a floating-point tensor"),
        ("softmax", "mahalanobis", {}, "precision", lambda t: t.tolist(), "state precision must be a floating-point tensor, got list"),
        ("softmax", "vim", {}, "residual", lambda t: t[:, :5].clone(), "state residual has 5 columns, expected D - dim = 64"),
        ("softmax", "react", {}, "threshold", lambda t: torch.tensor(math.inf), "state threshold holds 1 NaN or infinite"),
        ("softmax", "react", {}, "feature_dim", lambda t: torch.tensor([1.0, 2.0]), "state feature_dim must be a finite number"),
        ("dismax", "knn", {"k": 5}, "feature_dim", lambda t: torch.tensor(7), "state feature_dim=7 but the model has D=128"),
    ],
    ids=["knn-nan", "knn-shape", "mds-shape", "mds-int", "mds-list", "vim-residual", "react-inf", "react-dim", "dismax-knn-dim"],
)
def test_misshapen_or_non_finite_detector_state_is_refused_at_load(tmp_path, capsys, method_name, detector, params, key, damage, message):
    directory = with_detector(tmp_path / "ckpt", method_name, detector, **params)
    OODPredictor.from_dir(directory).predict(images(2))  # the undamaged checkpoint serves

    def hurt(state):
        state["detector"][key] = damage(state["detector"][key])

    edit_state(directory, hurt)
    with pytest.raises(ValueError, match=rf"state\.pt: cannot restore the detector '{detector}' .*{message}"):
        load_model_dir(directory)
    assert f"'{detector}'" in cli_error(directory, tmp_path, capsys)


# ---------------------------------------------------------------------------
# model.json: δ, depth, class names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["delta", "detector.delta"])
@pytest.mark.parametrize("value", [True, "0.5", math.nan, math.inf, [0.5]], ids=["true", "string", "nan", "inf", "list"])
def test_delta_in_model_json_must_be_a_finite_number(tmp_path, capsys, field, value):
    directory = with_detector(tmp_path / "ckpt", "softmax", "energy")
    meta = json.loads((directory / META_FILE).read_text())
    if field == "delta":
        meta["delta"] = value
    else:
        meta["detector"]["delta"] = value
    (directory / META_FILE).write_text(json.dumps(meta))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ValueError, match=rf"model\.json: {re.escape(field)}=.*expected a finite number or null"):
        load_model_dir(directory)
    assert field in cli_error(directory, tmp_path, capsys)


def test_delta_given_to_the_predictor_must_be_a_finite_number(tmp_path):
    directory = with_detector(tmp_path / "ckpt", "softmax", "energy")  # δ on a score of range (-inf, inf)
    predictor = OODPredictor.from_dir(directory)
    for bad in (True, math.inf, -math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="must be a finite number or None"):
            predictor.with_delta(bad)
        with pytest.raises(ValueError, match="must be a finite number or None"):
            predict(predictor, images(1), delta=bad)
    assert predictor.with_delta(np.float32(2.0)).delta == 2.0


@pytest.mark.parametrize("name", ["model.json", "config.json"])
def test_deeply_nested_json_is_a_one_line_error_naming_the_file(tmp_path, capsys, name):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    (directory / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: not valid JSON \(nested deeper"):
        load_model_dir(directory)
    assert name in cli_error(directory, tmp_path, capsys)


def peak_rss_mib() -> int:
    """This process's peak resident memory since the last ``reset_peak_rss`` (Linux /proc)."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) // 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def test_class_names_beyond_the_head_are_refused_before_the_head_is_built(tmp_path, capsys):
    """Two million class names against a 10-class head: refused from the shapes, while the peak
    memory grows by far less than the 1 GB such a head takes (by about the JSON's size)."""
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    edit_meta(directory, class_names=[str(i) for i in range(2_000_000)])
    (tmp_path / "x.png").write_bytes(png(images(1)[0]))
    reset_peak_rss()
    before = peak_rss_mib()
    rc = main(["predict", "--model", str(directory), str(tmp_path / "x.png")])
    grown = peak_rss_mib() - before
    assert grown < 500, f"peak memory grew by {grown} MiB"
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith(
        "state.pt: weights do not fit the model described in model.json (2000000 class names): head.weight has shape [10, 128], the model needs [2000000, 128]"
    ), err


# ---------------------------------------------------------------------------
# 16-bit images
# ---------------------------------------------------------------------------


def test_16_bit_images_are_scaled_like_the_data_writers_not_clipped(tmp_path):
    directory, _, _ = make_checkpoint(tmp_path / "ckpt", "softmax")
    predictor = OODPredictor.from_dir(directory)
    x = images(4)
    files = []
    for i, a in enumerate(x):
        files.append(tmp_path / f"x16-{i}.png")
        Image.fromarray(a.astype(np.uint16) * 257).save(files[-1])  # the same picture on 16 bits
    with Image.open(files[0]) as im:
        assert im.mode == "I;16"
    buf = io.BytesIO()
    Image.fromarray(x[1].astype(np.uint16) * 257).save(buf, format="PNG")
    path = files[0]
    np.testing.assert_array_equal(predictor.image_array(path), x[0][None])  # ood-ray predict FILE
    np.testing.assert_array_equal(predictor.image_array(buf.getvalue()), x[1][None])  # bytes
    served = predictor.to_batch(pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}), paths=False)
    np.testing.assert_array_equal(served, x[1][None, None])  # mlflow models serve
    rows = predict(predictor, files)
    assert [r["class_name"] for r in rows] == list(predictor.predict(x)["class_name"])

