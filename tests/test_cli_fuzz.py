"""Property test over the command line: whatever a user passes, ``ood-ray`` exits 0 or 2 with one
line, never a traceback or an internal error, and writes nothing outside the folders it was given.

Random manifests (``data verify``), random ``data shard`` arguments and npz contents, random
``train`` flags and ``--param`` values. ``train`` is pointed at an MLflow server that does not exist,
so a valid configuration stops at the store check, before Ray starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ood_ray.cli import main

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12), st.lists(st.integers(-3, 10**6), max_size=3))
MANIFEST_KEYS = ("name", "role", "image_size", "mode", "shards", "class_names", "group", "encoding", "num_samples", "format_version")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def check(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("ood-ray: error: "), err


def files_under(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@SETTINGS
@given(d=st.dictionaries(st.sampled_from(MANIFEST_KEYS), JUNK, max_size=8), shards=st.lists(st.dictionaries(st.sampled_from(("url", "count", "sha256")), JUNK, max_size=3), max_size=3))
def test_random_manifests(d, shards, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        d = {**d, "shards": shards} if shards else d
        (Path(tmp) / "set").mkdir()
        Path(tmp, "set", "manifest.json").write_text(json.dumps(d, default=str))
        before = files_under(Path(tmp))
        check(*run(["data", "verify", str(Path(tmp, "set"))], capsys))
        assert files_under(Path(tmp)) == before


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    dtype=st.sampled_from(["uint8", "int64", "float32", "bool"]),
    n_labels=st.integers(0, 6),
    name=st.one_of(st.sampled_from(["ok", "a.b", "../up", "*", "x/y", "-x"]), st.text(max_size=6)),
    role=st.sampled_from(["train", "val", "outlier", "ood-test"]),
    size=st.one_of(st.none(), st.lists(st.integers(-2, 70000), min_size=2, max_size=2)),
    maxcount=st.integers(-1, 5),
)
def test_random_shard_commands(shape, dtype, n_labels, name, role, size, maxcount, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.savez(root / "a.npz", images=np.zeros(shape, dtype=dtype), labels=np.zeros(n_labels, dtype=int))
        argv = ["data", "shard", "--npz", str(root / "a.npz"), "--out", str(root / "out"), f"--name={name}", "--role", role, "--maxcount", str(maxcount)]
        if size is not None:
            argv += ["--image-size", *map(str, size)]
        check(*run(argv, capsys))
        outside = {p for p in files_under(root) if not p.startswith(str(root / "out")) and p != str(root / "a.npz")}
        assert outside == set(), outside


FLAGS = st.sampled_from(["--epochs", "--batch-size", "--lr", "--num-workers", "--seed", "--data-seed", "--augment-pad", "--momentum", "--backbone", "--optimizer", "--objective", "--delta-tpr", "--cpus-per-worker"])
VALUES = st.one_of(st.integers(-(2**66), 2**66).map(str), st.floats(allow_nan=True).map(str), st.sampled_from(["1e9", "nan", "inf", "", "x", "[1]", "{a: 1}", "!!python/name:os.system", "null"]))


@SETTINGS
@given(flags=st.lists(st.tuples(FLAGS, VALUES), max_size=4), params=st.lists(st.tuples(st.sampled_from(["lam", "tau", "budget", "delta", "outlier_ratio", "x"]), VALUES), max_size=3), method=st.sampled_from(["softmax", "outlier_exposure", "confidence", "dismax", "logitnorm", "nope"]))
def test_random_train_flags(flags, params, method, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--method", method, "--storage-path", os.path.join(tmp, "ray"), "--mlflow-uri", "http://127.0.0.1:9"]
        for flag, value in flags:
            argv += [flag, value]
        for key, value in params:
            argv += ["--param", f"{key}={value}"]
        try:
            code, err = run(argv, capsys)
        except SystemExit as e:  # argparse refuses a value of the wrong type: its usage line, exit 2
            assert e.code == 2
            return
        assert code == 2  # at the latest, the MLflow store check stops it (no Ray)
        check(code, err)
        assert not os.path.exists(os.path.join(tmp, "ray"))
