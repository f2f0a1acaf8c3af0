"""The embedded default benchmark ``digits-ood`` (ood_ray.data.default)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFont

from ood_ray.data import default as D
from ood_ray.data import sources as S
from ood_ray.data.manifest import OOD_LABEL, Benchmark, DataError, Manifest

OOD_KEYS = ["photos", "faces", "gaussian", "uniform", "blobs", "letters"]
GROUPS = {"photos": "far", "faces": "far", "gaussian": "far", "uniform": "far", "blobs": "far", "letters": "near"}
ALLOWED_PIXELS = set(np.minimum(np.arange(17) * 16, 255).tolist())


def file_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def read_samples(m: Manifest) -> list[dict]:
    return list(wds.WebDataset(m.urls(), shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def built(digits_ood) -> Path:
    """The session's seed-0 build (conftest ``digits_ood``, shared with other test modules)."""
    assert digits_ood.name == "benchmark.json"
    return digits_ood.parent


# --- no build needed --------------------------------------------------------------------------


def test_source_assignment_is_pairwise_disjoint():
    roles = D.SOURCE_ASSIGNMENT
    assert set(roles) == {"outlier", "ood-val", "ood-test"}
    for a, b in combinations(roles, 2):
        assert not roles[a] & roles[b], (a, b, roles[a] & roles[b])
    photos = [D.AUX_PHOTOS, D.OOD_VAL_PHOTOS, D.OOD_TEST_PHOTOS]
    for a, b in combinations(photos, 2):
        assert not set(a) & set(b)
    assert sum(map(len, photos)) == len(set().union(*photos))  # no photo twice within a role
    assert not set(D.OOD_VAL_FACES) & set(D.OOD_TEST_FACES)
    assert set(D.OOD_VAL_FACES) | set(D.OOD_TEST_FACES) <= set(range(100))  # faces only
    assert not set(D.OOD_VAL_LETTERS) & set(D.OOD_TEST_LETTERS)
    assert not set(D.OOD_VAL_LETTERS + D.OOD_TEST_LETTERS) & set(D.EXCLUDED_LETTERS)
    assert set(D.OOD_VAL_LETTERS + D.OOD_TEST_LETTERS) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_pixel_helpers():
    assert S.levels_to_uint8(np.array([0, 1, 15, 16])).tolist() == [0, 16, 240, 255]
    bitmaps = np.zeros((1, 32, 32), bool)
    bitmaps[0, :4, :4] = True
    bitmaps[0, 4:6, 4:8] = True
    levels = S.block_count(bitmaps)
    assert levels.shape == (1, 8, 8) and levels[0, 0, 0] == 16 and levels[0, 1, 1] == 8 and levels.sum() == 24
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, size=(24, 24))
    assert np.array_equal(S.area_downsample(w), w.reshape(8, 3, 8, 3).sum(axis=(1, 3)) * 64)
    for s in (16, 25, 37, 64):  # exact means, including non-multiples of 8
        assert np.array_equal(S.area_downsample(np.full((s, s), 7)), np.full((8, 8), 7 * s * s))
        assert S._area_weights(s).sum(axis=1).tolist() == [s] * 8
    lv = S.to_levels(np.arange(64).reshape(8, 8))
    assert lv.min() == 0 and lv.max() == 16
    assert not S.to_levels(np.full((8, 8), 5)).any()
    assert S.gray_u8(np.ones((4, 4, 3), np.uint8) * 200).tolist() == [[200] * 4] * 4
    assert S.gray_u8(np.ones((2, 2), bool)).max() == 255


def test_generators_shapes_and_levels():
    rng = np.random.default_rng(0)
    photo = (np.arange(100 * 120) % 251).reshape(100, 120).astype(np.uint8)
    sets = [
        D.random_crops([photo], 20, rng),
        D.gaussian_noise(20, rng),
        D.uniform_noise(20, rng),
        D.binary_blobs(20, rng),
        D.letters(20, rng, "AK"),
    ]
    for x in sets:
        assert x.shape == (20, 8, 8) and x.dtype == np.uint8
        assert set(np.unique(x).tolist()) <= ALLOWED_PIXELS
        assert x.std() > 0
    a = D.letters(5, np.random.default_rng(3), "M")
    b = D.letters(5, np.random.default_rng(3), "M")
    assert np.array_equal(a, b)


def test_letters_also_render_with_the_bitmap_font():
    glyph = S.render_glyph("K", ImageFont.load_default_imagefont())
    assert glyph.height >= 32 and glyph.getbbox() is not None


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("OOD_RAY_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert D.default_data_dir(3) == tmp_path / "cache" / "ood_ray" / "digits-ood-v2-seed3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    d = D.default_data_dir()
    assert d.is_absolute() and d.name == "digits-ood-v2-seed0" and d.parent.name == "ood_ray"
    monkeypatch.setenv("OOD_RAY_DATA_DIR", str(tmp_path / "mine"))
    assert D.default_data_dir(5) == tmp_path / "mine"


def test_relative_data_dir_env_raises(monkeypatch):
    monkeypatch.setenv("OOD_RAY_DATA_DIR", "relative/data")
    with pytest.raises(ValueError, match="OOD_RAY_DATA_DIR.*relative/data"):
        D.default_data_dir()
    with pytest.raises(ValueError, match="OOD_RAY_DATA_DIR"):
        D.ensure_default()


def test_bad_seed_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        D.build_default(tmp_path, seed=-1)
    assert not any(tmp_path.iterdir())


# --- one real build, shared -------------------------------------------------------------------


def test_benchmark_loads_and_verifies(built):
    spec = json.loads((built / "benchmark.json").read_text())
    assert (spec["name"], spec["version"], spec["seed"]) == (D.DEFAULT_NAME, D.DEFAULT_VERSION, 0)
    b = Benchmark.load(built, verify=True)
    assert b.name == "digits-ood"
    assert b.class_names == [str(i) for i in range(10)]
    assert (b.train.num_samples, b.val.num_samples, b.test.num_samples) == (1077, 360, 360)
    assert b.train.num_samples + b.val.num_samples + b.test.num_samples == 1797
    assert len(b.train.shards) >= 8
    assert b.outlier is not None and b.outlier.role == "outlier" and b.outlier.num_samples == D.N_OUTLIER
    assert list(b.ood_val) == OOD_KEYS and list(b.ood_test) == OOD_KEYS
    for key in OOD_KEYS:
        for role, m in (("ood-val", b.ood_val[key]), ("ood-test", b.ood_test[key])):
            assert m.role == role and m.group == GROUPS[key] and m.num_samples == D.N_OOD
            assert m.name == f"{role}-{key}" and Path(m.path).parent.name == m.name
    for m in b.all_manifests():
        assert (m.image_size, m.mode, m.encoding) == ((8, 8), "L", "png")
        assert len(m.shards) >= 2 and all(s.sha256 for s in m.shards)
        assert m.description
    assert "astronaut" in b.outlier.description and "camera" in b.ood_val["photos"].description


def test_shard_contents(built):
    b = Benchmark.load(built)
    keys: set[str] = set()
    for m in b.all_manifests():
        samples = read_samples(m)
        assert len(samples) == m.num_samples
        labels = np.array([int(s["cls"]) for s in samples])
        if m.is_ood:
            assert (labels == OOD_LABEL).all(), m.name
        else:
            assert labels.min() >= 0 and labels.max() <= 9
            counts = np.bincount(labels, minlength=10)
            assert counts.min() >= 0.9 * counts.mean(), (m.name, counts)  # stratified
        pixels = set()
        for s in samples:
            im = Image.open(io.BytesIO(s["png"]))
            assert im.mode == "L" and im.size == (8, 8)
            pixels |= set(np.unique(np.asarray(im)).tolist())
        assert pixels <= ALLOWED_PIXELS, m.name
        names = {s["__key__"] for s in samples}
        assert len(names) == len(samples) and not names & keys
        keys |= names


def test_id_splits_partition_sklearn_digits(built):
    from sklearn.datasets import load_digits

    d = load_digits()
    want = sorted(
        (np.minimum(img * 16, 255).astype(np.uint8).tobytes(), int(y)) for img, y in zip(d.images, d.target, strict=True)
    )
    b = Benchmark.load(built)
    got = sorted(
        (np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes(), int(s["cls"]))
        for m in (b.train, b.val, b.test)
        for s in read_samples(m)
    )
    assert got == want


def test_rebuild_is_byte_identical_and_spares_foreign_files(built, tmp_path):
    out = tmp_path / "again"
    (out / "id-train").mkdir(parents=True)
    (out / "id-train" / "id-train-000099.tar").write_bytes(b"stale")
    (out / "benchmark.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    (out / "mine").mkdir()
    (out / "mine" / "x.bin").write_bytes(b"x")
    D.build_default(out, seed=0)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "mine" / "x.bin").exists()
    ours = {k: v for k, v in file_hashes(out).items() if k not in ("notes.txt", "mine/x.bin")}
    assert ours == file_hashes(built)
    assert len(ours) > 40
    assert not list(out.glob(".benchmark.json.tmp*"))


def test_other_seed_gives_other_shards(built, tmp_path):
    out = tmp_path / "seed1"
    D.build_default(out, seed=1)
    assert json.loads((out / "benchmark.json").read_text())["seed"] == 1
    a, b = Benchmark.load(built), Benchmark.load(out, verify=True)
    for ma, mb in zip(a.all_manifests(), b.all_manifests(), strict=True):
        assert ma.name == mb.name and ma.num_samples == mb.num_samples
        assert [s.sha256 for s in ma.shards] != [s.sha256 for s in mb.shards], ma.name


# --- ensure_default ---------------------------------------------------------------------------


def test_ensure_default_builds_once_then_reuses(monkeypatch, tmp_path):
    data = tmp_path / "data" / "digits"
    monkeypatch.setenv("OOD_RAY_DATA_DIR", str(data))
    calls = []
    real_build = D.build_default

    def counting_build(out_dir, seed=0, progress=False):
        calls.append(Path(out_dir))
        return real_build(out_dir, seed=seed, progress=progress)

    monkeypatch.setattr(D, "build_default", counting_build)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(D.ensure_default())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data / "benchmark.json"] * 2
    assert len(calls) == 1 and calls[0] != data  # built once, in a temporary sibling
    Benchmark.load(results[0], verify=True)
    mtimes = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    assert D.ensure_default() == data / "benchmark.json"
    assert len(calls) == 1
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == mtimes
    leftovers = [p.name for p in data.parent.iterdir() if p.name != "digits"]
    assert leftovers == [".digits.lock"]


def fake_build(out_dir, seed=0, progress=False):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"name": D.DEFAULT_NAME, "version": D.DEFAULT_VERSION, "seed": seed}))
    return out / "benchmark.json"


def test_ensure_default_losing_the_rename_race_uses_the_winner(monkeypatch, tmp_path):
    target = tmp_path / "bench"

    def racing_build(out_dir, seed=0, progress=False):
        fake_build(target, seed)  # another process finishes first
        (target / "winner").write_text("1")
        return fake_build(out_dir, seed)

    monkeypatch.setattr(D, "build_default", racing_build)
    assert D.ensure_default(seed=2, data_dir=target) == target / "benchmark.json"
    assert (target / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bench.lock", "bench"]


def test_ensure_default_in_existing_dir_and_seed_mismatch(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "build_default", fake_build)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert D.ensure_default(seed=4, data_dir=empty) == empty / "benchmark.json"  # replaces empty dir
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("x")
    assert D.ensure_default(seed=4, data_dir=busy) == busy / "benchmark.json"  # built in place
    assert (busy / "other.txt").exists()
    monkeypatch.setenv("OOD_RAY_DATA_DIR", str(busy))
    with pytest.raises(DataError, match="seed"):
        D.ensure_default(seed=5)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporary build dirs left
