"""``ood-ray data build --spec``: benchmarks from image folders, globs, lists and archives; JPEG
kept as JPEG; one-line errors naming the spec field."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ood_ray.cli import main
from ood_ray.data.build import build_benchmark
from ood_ray.data.images import resize_to, to_mode
from ood_ray.data.manifest import Benchmark, DataError
from ood_ray.data.mixing import class_sorted_shards
from ood_ray.data.spec import load_spec
from ood_ray.data.streams import eval_batches
from ood_ray.data.writer import write_folder_shards

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]


def save(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, quality=90)
    return path


def photo(rng, size=(12, 12), channels=3) -> np.ndarray:
    return rng.integers(0, 256, (*size, channels) if channels > 1 else size, dtype=np.uint8)


@pytest.fixture()
def root(tmp_path) -> Path:
    """A root like ../shared/data/real-images: ID train/test as a .tar.gz of class folders (JPEG),
    OOD sets as plain folders (PNG, other sizes and modes), a glob and an image list."""
    rng = np.random.default_rng(0)
    r = tmp_path / "root"
    src = tmp_path / "src" / "ident"
    for split, n in (("train", 12), ("test", 8)):
        for c in CLASSES:
            for i in range(n):
                save(src / split / c / f"{i:03d}.jpg", photo(rng), "JPEG")
    r.mkdir()
    with tarfile.open(r / "ident.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="ident")
    for i in range(10):
        save(r / "aux" / "a" / f"{i}.png", photo(rng, (20, 16)))
        save(r / "oodval" / f"{i}.png", photo(rng, (24, 24), 1))
        save(r / "near" / "x" / f"{i}.png", photo(rng, (12, 12)))
        save(r / "far" / f"scan{i}.png", photo(rng, (30, 12)))
    (r / "lists").mkdir()
    (r / "lists" / "far.txt").write_text("".join(f"far/scan{i}.png -1\n" for i in range(5)))
    return r


def write_spec(path: Path, sets: dict, **top) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"name": "tiny", "image_size": 12, "mode": "RGB", "maxcount": 10, **top, "sets": sets}))
    return path


def good_sets() -> dict:
    return {
        "train": {"archive": "ident.tar.gz", "folder": "ident/train"},
        "test": {"archive": "ident.tar.gz", "folder": "ident/test"},
        "val": {"split": "test", "per_class": 3},
        "outlier": {"folder": "aux"},
        "ood_val": {"gray": {"folder": "oodval", "group": "near"}},
        "ood_test": {"near": {"glob": "near/*/*.png", "group": "near"}, "far": {"list": "lists/far.txt", "base": ".", "group": "far"}},
    }


def test_build_writes_every_role_from_archives_folders_globs_and_lists(tmp_path, root, capsys):
    spec = write_spec(tmp_path / "spec.yaml", good_sets())
    assert main(["data", "build", "--spec", str(spec), "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "digest" in printed and "ood-test-far" in printed
    b = Benchmark.load(tmp_path / "out", verify=True)
    assert b.class_names == CLASSES and b.train.image_size == (12, 12) and b.train.mode == "RGB"
    sizes = {m.name: m.num_samples for m in b.all_manifests()}
    assert sizes == {"train": 36, "val": 9, "test": 15, "outlier": 10, "ood-val-gray": 10, "ood-test-near": 10, "ood-test-far": 5}
    assert {k: m.group for k, m in b.ood_test.items()} == {"near": "near", "far": "far"} and b.ood_val["gray"].group == "near"
    # JPEG sources of the right size are kept as JPEG, resized/converted sets are PNG
    assert (b.train.encoding, b.val.encoding, b.test.encoding, b.outlier.encoding) == ("jpg", "jpg", "jpg", "png")
    assert b.train.shuffle_seed == 0 and all(s.classes is not None for s in b.train.shards) and class_sorted_shards(b.train) == []
    keys = {m.name: [k for _, _, ks in eval_batches(m, 0, 1, 64) for k in ks] for m in (b.val, b.test)}
    assert not set(keys["val"]) & set(keys["test"])  # val is held out of test
    labels = np.concatenate([y.numpy() for _, y, _ in eval_batches(b.val, 0, 1, 64)])
    assert np.bincount(labels).tolist() == [3, 3, 3]
    assert not list((tmp_path / "out").glob(".build-*"))  # the extracted archive is removed
    # the same spec and files give the same shards
    build_benchmark(spec, root, tmp_path / "again")
    assert Benchmark.load(tmp_path / "again").digest() == b.digest()


def test_jpeg_bytes_are_stored_unchanged_and_decode_to_the_source_pixels(tmp_path, root):
    src = tmp_path / "src" / "ident" / "train"
    m = write_folder_shards(src, tmp_path / "out", name="train", role="train", progress=False)
    assert m.encoding == "jpg"
    from ood_ray.data.tar import local_tar_samples

    stored = {s["__key__"]: s["jpg"] for u in m.urls() for s in local_tar_samples(u)}
    files = sorted(src.rglob("*.jpg"))
    assert sorted(stored.values()) == sorted(f.read_bytes() for f in files)  # byte for byte
    x = {k: img for X, _, K in eval_batches(m, 0, 1, 50) for img, k in zip(X, K, strict=True)}
    first = f"{0:08d}"  # key 0 = the first file in folder order
    expected = np.asarray(Image.open(files[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(x[first].numpy(), expected)
    # resizing asked: PNG; a jpg set whose file needs converting is re-encoded as JPEG
    assert write_folder_shards(src, tmp_path / "r", name="r", role="train", image_size=(8, 8), resize=True, progress=False).encoding == "png"
    gray = write_folder_shards(src, tmp_path / "g", name="g", role="train", mode="L", encoding="jpg", progress=False)
    assert gray.encoding == "jpg" and sum(len(y) for _, y, _ in eval_batches(gray, 0, 1, 50)) == 36


def test_a_jpg_field_holding_png_bytes_is_refused_naming_the_sample(tmp_path):
    from conftest import hand_manifest, png

    m = hand_manifest(tmp_path, {"a.jpg": png(), "a.cls": b"0"})
    m.encoding = "jpg"
    with pytest.raises(DataError, match=r"sample 'a': 'jpg' field holds PNG data"):
        list(eval_batches(m, 0, 1, 1))


def test_sixteen_bit_scans_are_scaled_not_clipped(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    out = np.asarray(to_mode(Image.fromarray(a), "RGB"))
    assert out.shape == (8, 8, 3) and out.max() == 63000 * 255 // 65535 and (out[..., 0] < 255).mean() > 0.9
    (tmp_path / "scans" / "x").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "scans" / "x" / "a.png")
    m = write_folder_shards(tmp_path / "scans", tmp_path / "out", name="s", role="ood-test", mode="L", progress=False)
    x = next(iter(eval_batches(m, 0, 1, 1)))[0][0, 0].numpy()
    assert np.array_equal(x, out[..., 0])  # data shard scales 16-bit images too (PIL alone clips at 255)


def test_fit_resizes_the_shorter_side_and_crops_the_centre():
    im = Image.fromarray(np.zeros((30, 60, 3), np.uint8))
    assert resize_to(im, (12, 12), "fit", "x").size == (12, 12)
    with pytest.raises(DataError, match="aspect ratio"):
        resize_to(Image.fromarray(np.zeros((1, 3000), np.uint8)), (12, 12), "fit", "x.png")
    with pytest.raises(DataError, match="resize: none"):
        resize_to(im, (12, 12), "none", "x.png")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(extra={"folder": "aux"}), r"sets\.extra: unknown role"),
        (lambda s: s.pop("train"), r"sets\.train: missing"),
        (lambda s: s["outlier"].update(folder="nowhere"), r"sets\.outlier\.folder: 'nowhere' is not a folder"),
        (lambda s: s["ood_test"]["near"].update(glob="zzz/*.png"), r"sets\.ood_test\.near\.glob: 'zzz/\*\.png' matches no images"),
        (lambda s: s["ood_val"]["gray"].update(folder="near"), r"sets\.ood_test\.near and sets\.ood_val\.gray share 10 image"),
        (lambda s: s["ood_test"]["far"].update(group="middle"), r"sets\.ood_test\.far\.group: 'middle' must be near or far"),
        (lambda s: s["outlier"].update(folder="../x"), r"sets\.outlier\.folder: '\.\./x' must be relative to the root"),
        (lambda s: s["train"].update(archive="missing.tar.gz"), r"sets\.train\.archive: archive .*missing\.tar\.gz does not exist"),
        (lambda s: s["outlier"].update(colour="red"), r"sets\.outlier\.colour: unknown key"),
        (lambda s: s.update(val={"split": "test", "per_class": 8}), r"sets\.test: class 0 has 8 images, too few"),
        (lambda s: s["test"].update(folder="ident/train/cat"), r"sets\.test\.folder: .*has no class sub-folders"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_field(tmp_path, root, change, message):
    sets = good_sets()
    change(sets)
    spec = write_spec(tmp_path / "spec.yaml", sets)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=message):
        build_benchmark(spec, root, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing left behind


def test_an_empty_class_and_bad_top_level_values_are_named(tmp_path, root):
    (root / "empty" / "a").mkdir(parents=True)
    (root / "empty" / "b").mkdir()
    save(root / "empty" / "a" / "0.png", np.zeros((12, 12, 3), np.uint8))
    sets = {**good_sets(), "train": {"folder": "empty"}}
    with pytest.raises(DataError, match=r"sets\.train\.folder: class 'b' .* holds no images"):
        build_benchmark(write_spec(tmp_path / "s.yaml", sets), root, tmp_path / "o")
    for top, message in (({"image_size": 3}, "image_size"), ({"resize": "zoom"}, "resize"), ({"encoding": "gif"}, "encoding"), ({"colour": 1}, "colour: unknown key")):
        with pytest.raises(DataError, match=message):
            load_spec(write_spec(tmp_path / "t.yaml", good_sets(), **top))


def test_archive_members_that_escape_are_refused(tmp_path, root):
    bad = root / "evil.tar"
    with tarfile.open(bad, "w") as tf:
        data = io.BytesIO()
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(data, format="PNG")
        info = tarfile.TarInfo("../../outside.png")
        info.size = len(data.getvalue())
        tf.addfile(info, io.BytesIO(data.getvalue()))
    sets = {**good_sets(), "outlier": {"archive": "evil.tar", "folder": "."}}
    with pytest.raises(DataError, match=r"sets\.outlier\.archive: cannot extract .*evil\.tar"):
        build_benchmark(write_spec(tmp_path / "s.yaml", sets), root, tmp_path / "o")
    assert not (tmp_path / "outside.png").exists() and not (root.parent / "outside.png").exists()


def test_the_cifar10_real_spec_in_the_repo_is_valid():
    spec = load_spec(REPO / "benchmarks" / "cifar10-real.yaml")
    assert spec.name == "cifar10-real" and spec.image_size == (32, 32) and spec.mode == "RGB"
    assert spec.sets["val"] == {"split": "test", "per_class": 100}
    assert set(spec.sets["ood_test"]) == {"tin", "mnist", "textures"}
    assert {k: v["group"] for k, v in spec.sets["ood_test"].items()} == {"tin": "near", "mnist": "far", "textures": "far"}
