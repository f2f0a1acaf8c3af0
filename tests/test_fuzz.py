"""Property tests (hypothesis): damaged shards and random configs fail with the project's own errors.

(a) A real shard set is written once by the writer; every example copies it and damages one shard
    (random bytes, flipped bytes, truncation, appended junk, or a tar of random members) and reads
    it through ``eval_batches`` / ``train_batches`` / ``read_shard`` + ``decode_sample``. Allowed: a
    normal result, or a ``DataError`` naming the damaged shard's URL (and the sample key when one
    sample is at fault). Anything else (another exception type, a message without the URL, a
    hang) fails.
(b) Random TrainConfig dicts and random method parameters: ``TrainConfig.from_dict`` returns a
    config that validates again to the same values, or raises ``ConfigError`` naming a given key.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import write_toy
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ood_ray.config import ConfigError, TrainConfig
from ood_ray.data import streams
from ood_ray.data.manifest import DataError, Manifest
from ood_ray.data.streams import ShardTask, decode_sample, eval_batches, read_shard, train_batches
from ood_ray.data.writer import write_array_shards
from ood_ray.methods import METHODS

# OOD_RAY_FUZZ_EXAMPLES=2000 explores with fresh random examples; by default a fixed, quick set runs
EXPLORE = int(os.environ.get("OOD_RAY_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXPLORE or 60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not EXPLORE, database=None)
TIMEOUT_S = 30.0  # one example reads at most a few kB; anything near this is a hang


# --- (a) damaged shards -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two tiny sets (png and raw encoding), 12 samples in 3 shards each: manifest dict and shard bytes."""
    root = tmp_path_factory.mktemp("pristine")
    sets = {}
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    write_toy(root / "png", n=12, classes=3, maxcount=4, seed=1)
    write_array_shards(images, rng.integers(0, 3, size=12), root / "raw", name="toy", role="train", class_names=["c0", "c1", "c2"], maxcount=4, encoding="raw", progress=False)
    for enc in ("png", "raw"):
        d = json.loads((root / enc / "manifest.json").read_text())
        sets[enc] = (d, {s["url"]: (root / enc / s["url"]).read_bytes() for s in d["shards"]})
    return sets


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def png_bytes(h: int, w: int, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), 7).save(buf, format="PNG")
    return buf.getvalue()


MAGIC = st.sampled_from([b"", b"\x1f\x8b\x08\x00", b"BZh9", b"\xfd7zXZ\x00", b"ustar\x00", b"\x89PNG\r\n\x1a\n"])
KEYS = st.sampled_from(["k1", "k2", "0000000", "0000001", "a/b", "k.x", "__key__", "", "ü", "."])
EXTS = st.sampled_from(["png", "cls", "raw", "jpg", "txt", "PNG", "cls.txt", ""])
CONTENT = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"0", b"1", b"2", b"-1", b"3", b" 1\n", b"1e3", b"\xff", b"9" * 5000]),
    st.builds(png_bytes, st.sampled_from([8, 1, 9]), st.sampled_from([8, 7]), st.sampled_from(["L", "RGB", "1", "I;16"])),
    st.just(bytes(64)),
)
MEMBER = st.tuples(st.builds(lambda k, e: f"{k}.{e}" if e else k, KEYS, EXTS), CONTENT)


@st.composite
def damage(draw, original: bytes) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "append", "members", "splice"]))
    if kind == "random":
        return kind, draw(MAGIC) + draw(st.binary(max_size=3000))
    if kind == "flip":
        data = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return kind, bytes(data)
    if kind == "truncate":
        return kind, original[: draw(st.integers(0, len(original) - 1))]
    if kind == "append":
        return kind, original + draw(st.one_of(st.binary(min_size=1, max_size=1500), st.builds(tar_bytes, st.lists(MEMBER, min_size=1, max_size=3))))
    if kind == "members":
        return kind, tar_bytes(draw(st.lists(MEMBER, max_size=8)))
    # splice: a valid tar of the original members with some replaced by random members
    with tarfile.open(fileobj=io.BytesIO(original)) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(members) - 1))
        members[i] = draw(st.one_of(MEMBER, st.tuples(st.just(members[i][0]), CONTENT)))
    return kind, tar_bytes(members)


def run_with_timeout(fn):
    """fn() in a daemon thread: (result, exception); fails the test on a hang."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    assert not t.is_alive(), f"reading hung for more than {TIMEOUT_S}s"
    return box.get("result"), box.get("error")


def read_direct(m: Manifest, damaged_url: str) -> int:
    """read_shard + decode_sample on every shard; a sample's DataError must name its key."""
    n = 0
    for url, info in zip(m.urls(), m.shards, strict=True):
        for sample in read_shard(ShardTask(url, info.count)):
            try:
                decode_sample(sample, m)
            except DataError as e:
                assert f"sample {sample.get('__key__', '?')!r}" in str(e), str(e)
                raise
            n += 1
    return n


READERS = {
    "eval": lambda m, url: sum(len(y) for _, y, _ in eval_batches(m, 0, 1, 5)),
    "eval_rank1": lambda m, url: sum(len(y) for _, y, _ in eval_batches(m, 1, 2, 3)),
    "train": lambda m, url: sum(len(y) for _, y, _ in train_batches(m, 0, 1, 4, epoch=0, shuffle_buffer=6, augment_pad=1)),
    "train_rank1": lambda m, url: sum(len(y) for _, y, _ in train_batches(m, 1, 2, 2, epoch=1)),
    "direct": read_direct,
}


@FUZZ
@given(data=st.data(), enc=st.sampled_from(["png", "raw"]), which=st.integers(0, 2), reader=st.sampled_from(sorted(READERS)), skip=st.booleans())
def test_damaged_shard_gives_data_error_naming_it(pristine, data, enc, which, reader, skip):
    manifest_dict, shards = pristine[enc]
    name = manifest_dict["shards"][which]["url"]
    kind, payload = data.draw(damage(shards[name]), label="damage")
    if reader == "direct":
        skip = False  # read_shard/decode_sample always raise; skipping lives in the streams above them
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for url, content in shards.items():
            (tmp / url).write_bytes(payload if url == name else content)
        (tmp / "manifest.json").write_text(json.dumps(manifest_dict))
        m = Manifest.load(tmp)  # not verified: the reader must notice the damage by itself
        url = str((tmp / name).resolve())
        streams.set_skip_bad_samples(skip)
        try:
            result, error = run_with_timeout(lambda: READERS[reader](m, url))
        finally:
            streams.set_skip_bad_samples(False)
            streams.take_skipped()
    event(f"{kind}: {'ok' if error is None else type(error).__name__}")
    if error is None:
        assert isinstance(result, int) and result >= 0
        return
    if not isinstance(error, DataError):
        raise AssertionError(f"{reader} on a {kind}-damaged shard raised {type(error).__name__}, not DataError: {error}") from error
    msg = str(error)
    if skip:  # with skipping on, only a stream with nothing left may fail; it names the set
        assert url in msg or str(tmp) in msg or m.name in msg, msg
    else:
        assert url in msg, f"{reader} on a {kind}-damaged shard: message does not name {url}: {msg}"


def test_pristine_copy_reads(pristine):
    """The fuzz baseline: the undamaged copies read completely with every reader."""
    for enc, (manifest_dict, shards) in pristine.items():
        with tempfile.TemporaryDirectory() as tmp:
            for url, content in shards.items():
                Path(tmp, url).write_bytes(content)
            Path(tmp, "manifest.json").write_text(json.dumps(manifest_dict))
            m = Manifest.load(tmp, verify=True)
            got = {r: READERS[r](m, "") for r in READERS}
        assert got["eval"] == got["direct"] == 12, (enc, got)
        assert got["train"] == 12 and got["eval_rank1"] == 6 and got["train_rank1"] == 6, (enc, got)


@pytest.mark.parametrize(
    "payload,at_fault",
    [
        (b"\x00garbage" * 300, None),  # an unreadable shard
        (tar_bytes([("k1.png", b"\x89PNG broken"), ("k1.cls", b"0")]), "k1"),  # one undecodable sample
    ],
)
def test_loader_worker_errors_keep_the_plain_message(pristine, tmp_path, payload, at_fault):
    """With ``loader_workers > 0`` the error is raised in a DataLoader worker process; it must reach the
    caller as the same one-line DataError (URL, key), not wrapped in the worker's traceback."""
    manifest_dict, shards = pristine["png"]
    name = manifest_dict["shards"][1]["url"]
    for url, content in shards.items():
        (tmp_path / url).write_bytes(payload if url == name else content)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict))
    m = Manifest.load(tmp_path)
    with pytest.raises(DataError) as e:
        list(eval_batches(m, 0, 1, 4, loader_workers=2))
    msg = str(e.value)
    assert str(tmp_path / name) in msg and (at_fault is None or f"sample {at_fault!r}" in msg), msg
    assert "Traceback" not in msg and "DataLoader worker" not in msg and "\n" not in msg, msg


# --- (b) random configs -------------------------------------------------------------------------

FIELDS = sorted(f for f in TrainConfig.__dataclass_fields__)
SCALARS = st.one_of(
    st.integers(-5, 5),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 0.95, 1e-3, -0.0, 1.0, 1e300]),
    st.text(max_size=12),
    st.sampled_from(["softmax", "dismax", "outlier_exposure", "confidence", "small_cnn", "auroc", "fpr95", "adamw", "step", "bf16", "sqlite:///x.db", "s3://b/p", "file:./mlruns", "ece", "nll"]),
    st.none(),
    st.booleans(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


def check_from_dict(d: dict, named: list[str]):
    try:
        cfg = TrainConfig.from_dict(dict(d))
    except ConfigError as e:
        msg = str(e)
        assert any(k in msg for k in named), f"ConfigError names none of {named}: {msg}"
        return None
    # a config that passed is typed and validates again to the same values
    again = TrainConfig.from_dict(cfg.to_dict()).to_dict()
    assert json.dumps(again, sort_keys=True) == json.dumps(cfg.to_dict(), sort_keys=True)
    for name in ("epochs", "batch_size", "num_workers", "eval_batch_size", "seed", "data_seed"):
        assert type(getattr(cfg, name)) is int, name
    for name in ("lr", "momentum", "weight_decay", "step_gamma", "cpus_per_worker", "min_val_acc"):
        assert math.isfinite(getattr(cfg, name)), name
    assert cfg.method in METHODS and isinstance(cfg.method_params, dict)
    return cfg


@FUZZ
@example(d={"epochs": 1.5})
@example(d={"lr": "abc"})
@example(d={"method": ["softmax"]})
@example(d={"step_milestones": 3})
@example(d={"data": "a\x00b"})
@example(d={"num_workers": 3})
@example(d={"weight_decay": float("nan")})
@given(d=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_random_train_config(d, monkeypatch_env):
    check_from_dict(d, list(d))


PARAM_KEYS = st.one_of(st.sampled_from(sorted({k for m in METHODS.values() for k in m.defaults})), st.text(min_size=1, max_size=8))


@FUZZ
@example(method="outlier_exposure", params={"lam": "abc"})
@example(method="outlier_exposure", params={"lam": None})
@example(method="confidence", params={"budget": float("inf")})
@example(method="dismax", params={"calibration_bounds": "ab"})
@example(method="dismax", params={"calibration_bins": 2.5})
@given(method=st.sampled_from(sorted(METHODS)), params=st.dictionaries(PARAM_KEYS, VALUES, max_size=4))
def test_random_method_params(method, params, monkeypatch_env):
    cfg = check_from_dict({"method": method, "method_params": params}, [str(k) for k in params])
    if cfg is not None:
        assert set(cfg.method_params) <= set(METHODS[method].defaults)
        METHODS[method](cfg.method_params)  # the method object builds from what validated


@pytest.fixture(scope="module")
def monkeypatch_env(tmp_path_factory):
    """Default paths resolve into a temporary results folder (nothing is written there)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("results")
    mp.setenv("OOD_RAY_RESULTS", str(root))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.chdir(root)
    yield root
    mp.undo()
    shutil.rmtree(root, ignore_errors=True)
