"""``ood-ray data build-openood``: the OpenOOD v1.5 benchmarks from files on disk (ood_ray.data.openood).

Every fixture is written here in the publisher's real layout, a few images per file: CIFAR python
pickles, MNIST idx (gzipped and plain), SVHN .mat, image folders, and OpenOOD's image lists with
their ``images_classic`` / ``images_largescale`` folders. No Ray, no network.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ood_ray.cli import main
from ood_ray.data import openood as O
from ood_ray.data.manifest import Benchmark, DataError, Manifest
from ood_ray.data.tar import local_tar_samples

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C100_NAMES = [f"fine{i:02d}" for i in range(100)]
RNG = np.random.default_rng(0)


# --- fixture writers, one per publisher format ---------------------------------------------------


def cifar_dict(labels, label_key: str, bytes_keys: bool) -> dict:
    data = RNG.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    d = {"batch_label": "fixture", label_key: list(labels), "data": data, "filenames": [f"f{i}.png" for i in range(len(labels))]}
    return {k.encode(): v for k, v in d.items()} if bytes_keys else d


def dump(path: Path, obj) -> None:
    """A pickle as Python 3 writes it at protocol 2 (bytes through ``_codecs.encode``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR files: str and bytes as BINSTRING, numpy
    arrays through ``numpy.core.multiarray._reconstruct`` (numpy 1.x's module name)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256 else pickle.BINSTRING + struct.pack("<i", len(data))
        self.write(head + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def dump_py2(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def write_cifar10(root: Path) -> dict[str, dict]:
    d = root / "cifar-10-batches-py"
    batches = {}
    for i in range(1, 6):  # 3 images per training batch
        batches[f"data_batch_{i}"] = cifar_dict([(3 * i + j) % 10 for j in range(3)], "labels", bytes_keys=False)
        dump_py2(d / f"data_batch_{i}", batches[f"data_batch_{i}"])
    batches["test_batch"] = cifar_dict([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], "labels", bytes_keys=False)
    dump_py2(d / "test_batch", batches["test_batch"])
    dump_py2(d / "batches.meta", {"label_names": C10_NAMES, "num_vis": 3072, "num_cases_per_batch": 10000})
    return batches


def write_cifar100(root: Path) -> None:
    d = root / "cifar-100-python"
    dump(d / "train", cifar_dict([0, 7, 99, 42], "fine_labels", bytes_keys=True))
    dump(d / "test", cifar_dict([0, 0, 5, 5, 99, 99], "fine_labels", bytes_keys=True))
    dump(d / "meta", {b"fine_label_names": [n.encode() for n in C100_NAMES], b"coarse_label_names": [b"c%d" % i for i in range(20)]})


def write_image(path: Path, size=(40, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def idx_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
    return header + images.tobytes()


def write_mnist(root: Path) -> None:
    (root / "mnist").mkdir(parents=True)
    (root / "mnist/train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8))))
    (root / "mnist/t10k-images-idx3-ubyte").write_bytes(idx_bytes(RNG.integers(0, 256, (2, 28, 28), dtype=np.uint8)))


def write_native_root(root: Path) -> dict[str, dict]:
    """Every CIFAR-10/CIFAR-100 benchmark set in its publisher's format."""
    batches = write_cifar10(root)
    write_cifar100(root)
    tin = root / "tiny-imagenet-200/val"
    rows = []
    for i, wnid in enumerate(["n01443537", "n01629819", "n01641577"] * 2):
        write_image(tin / f"images/val_{i}.JPEG", (64, 64))
        rows.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (tin / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    write_mnist(root)
    (root / "svhn").mkdir()
    y = np.array([[10], [1], [2], [3]], dtype=np.uint8)
    scipy.io.savemat(root / "svhn/test_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": y})
    for cls, n in (("banded", 2), ("dotted", 1)):
        for j in range(n):
            write_image(root / f"dtd/images/{cls}/{cls}_{j + 1:04d}.jpg", (50, 40))
    for j in range(2):
        write_image(root / f"places365/val_256/Places365_val_{j + 1:08d}.jpg", (48, 32))
    return batches


@pytest.fixture
def native_root(tmp_path, monkeypatch) -> tuple[Path, dict]:
    # the fixtures' test batches are tiny: one image per class goes to val instead of 100 (10)
    monkeypatch.setitem(O.CIFAR["cifar10"], "val_per_class", 1)
    monkeypatch.setitem(O.CIFAR["cifar100"], "val_per_class", 1)
    root = tmp_path / "root"
    return root, write_native_root(root)


def read_set(m: Manifest) -> list[tuple[str, np.ndarray, int]]:
    out = []
    for url in m.urls():
        for s in local_tar_samples(url):
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "RGB" and img.size == (m.image_size[1], m.image_size[0])
            out.append((s["__key__"], np.asarray(img), int(s["cls"])))
    return out


def write_list(root: Path, rel: str, lines: list[str]) -> Path:
    p = root / "benchmark_imglist" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


# --- CIFAR-10 from the publishers' formats ------------------------------------------------------


def test_cifar10_from_native_files(native_root, tmp_path):
    root, batches = native_root
    out = tmp_path / "out"
    built = O.build_openood("cifar10", root, out, maxcount=4)
    b = Benchmark.load(out / "benchmark.json", verify=True)
    got = {s.spec.subdir: (s.manifest.role, s.spec.group, s.manifest.num_samples) for s in built.sets}
    assert got == {
        "id-train": ("train", None, 15), "id-val": ("val", None, 5), "id-test": ("test", None, 5),
        "ood-val-tin": ("ood-val", "near", 2), "ood-test-cifar100": ("ood-test", "near", 3),
        "ood-test-tin": ("ood-test", "near", 4), "ood-test-mnist": ("ood-test", "far", 5),
        "ood-test-svhn": ("ood-test", "far", 4), "ood-test-texture": ("ood-test", "far", 3),
        "ood-test-places365": ("ood-test", "far", 2),
    }  # fmt: skip
    assert b.class_names == C10_NAMES and b.outlier is None
    assert set(b.ood_val) == {"tin"} and set(b.ood_test) == {"cifar100", "tin", "mnist", "svhn", "texture", "places365"}
    assert all(m.image_size == (32, 32) and m.mode == "RGB" for m in b.all_manifests())
    assert len(b.train.shards) == 4  # 15 samples, 4 per shard
    spec = json.loads((out / "benchmark.json").read_text())
    assert spec["outlier"] is None and spec["name"] == "openood-v1.5-cifar10"

    # ID images are the pickles' pixels (32x32: no resampling) with their labels, in file order
    def pixels(batch, i):
        return batch["data"][i].reshape(3, 32, 32).transpose(1, 2, 0)

    train = read_set(b.train)
    assert [k for k, _, _ in train] == [f"id-train-{i:07d}" for i in range(15)]
    expect = [(pixels(batches[f"data_batch_{f}"], j), batches[f"data_batch_{f}"]["labels"][j]) for f in range(1, 6) for j in range(3)]
    for (_, img, y), (want, wy) in zip(train, expect, strict=True):
        assert y == wy and np.array_equal(img, want)
    test_batch = batches["test_batch"]
    val, test = read_set(b.val), read_set(b.test)
    assert [y for _, _, y in val] == [0, 1, 2, 3, 4] and [y for _, _, y in test] == [0, 1, 2, 3, 4]
    assert np.array_equal(val[1][1], pixels(test_batch, 2)) and np.array_equal(test[0][1], pixels(test_batch, 1))
    for m in b.ood_test.values():
        assert {y for _, _, y in read_set(m)} == {-1}
    mnist = read_set(b.ood_test["mnist"])
    assert all(np.array_equal(img[..., 0], img[..., 2]) for _, img, _ in mnist)  # grayscale made RGB


def test_rebuild_is_identical_and_other_files_survive(native_root, tmp_path):
    root, _ = native_root
    out = tmp_path / "out"
    O.build_openood("cifar10", root, out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (out / "ood-test-texture").iterdir()}
    O.build_openood("cifar10", root, out)
    assert {p.name: p.read_bytes() for p in (out / "ood-test-texture").iterdir()} == before
    assert (out / "notes.txt").read_text() == "mine"


# --- image lists take precedence; the CLI -------------------------------------------------------


def add_cifar10_lists(root: Path) -> None:
    """OpenOOD's layout for the ID splits and the TIN sets; the CIFAR-10 batches are removed (not the meta file)."""
    classic = root / "images_classic"
    train, test = [], []
    for y, name in enumerate(C10_NAMES[:3]):
        for j in range(2):
            write_image(classic / f"cifar10/train/{name}/{j + 1:04d}.png", (32, 32))
            write_image(classic / f"cifar10/test/{name}/{j + 1:04d}.png", (32, 32))
            train.append(f"cifar10/train/{name}/{j + 1:04d}.png {y}")
            test.append(f"cifar10/test/{name}/{j + 1:04d}.png {y}")
    write_list(root, "cifar10/train_cifar10.txt", train)
    write_list(root, "cifar10/val_cifar10.txt", test[::2])
    write_list(root, "cifar10/test_cifar10.txt", test[1::2])
    for j in range(5):
        write_image(classic / f"tin/val/images/val_{j}.JPEG", (64, 64))
    write_list(root, "cifar10/val_tin.txt", ["tin/val/images/val_0.JPEG -1"])
    write_list(root, "cifar10/test_tin.txt", [f"tin/val/images/val_{j}.JPEG {{'label': -1}}" for j in (1, 2, 4)])
    for f in (root / "cifar-10-batches-py").iterdir():
        if f.name != "batches.meta":
            f.unlink()


def test_cli_lists_define_the_sets(native_root, tmp_path, capsys):
    root, _ = native_root
    add_cifar10_lists(root)
    write_image(tmp_path / "aux/a/1.png", (20, 20))
    write_image(tmp_path / "aux/b/2.jpg", (70, 30))
    out = tmp_path / "out"
    assert main(["data", "build-openood", "--id", "cifar10", "--root", str(root), "--out", str(out), "--outlier", str(tmp_path / "aux"), "--maxcount", "2"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    lines = {ln.split()[1]: ln.split() for ln in printed.splitlines() if ln.startswith("  ")}
    assert lines["id-train"][:4] == ["train", "id-train", "-", "6"] and "benchmark_imglist/cifar10/train_cifar10.txt" in printed
    assert lines["ood-val-tin"][:4] == ["ood-val", "ood-val-tin", "near", "1"]
    assert lines["ood-test-tin"][:4] == ["ood-test", "ood-test-tin", "near", "3"]
    assert lines["ood-test-cifar100"][3] == "3"  # no list: still the native CIFAR-100 test batch
    assert lines["outlier"][:4] == ["outlier", "outlier", "-", "2"]
    assert f"benchmark: {out / 'benchmark.json'}" in printed
    b = Benchmark.load(out / "benchmark.json", verify=True)
    assert b.class_names == C10_NAMES  # from batches.meta, still on disk
    assert [y for _, _, y in read_set(b.train)] == [0, 0, 1, 1, 2, 2]
    assert b.outlier is not None and b.outlier.role == "outlier"
    assert main(["data", "verify", str(out)]) == 0

    # without the meta file, the class names are the folder names of the training list
    (root / "cifar-10-batches-py/batches.meta").unlink()
    built = O.build_openood("cifar10", root, tmp_path / "out2")
    assert built.sets[0].manifest.class_names == C10_NAMES[:3]


def test_outlier_list_relative_to_root(native_root, tmp_path):
    root, _ = native_root
    write_image(root / "images_classic/tin597/test/n03793489/images/n03793489_1.JPEG", (64, 64))
    write_list(root, "cifar10/train_tin597.txt", ["tin597/test/n03793489/images/n03793489_1.JPEG -1"])
    b = O.build_openood("cifar10", root, tmp_path / "out", outlier="benchmark_imglist/cifar10/train_tin597.txt")
    assert b.sets[-1].manifest.num_samples == 1 and b.sets[-1].origin.startswith("image list")


def test_cifar100_from_native_files(native_root, tmp_path):
    root, _ = native_root
    built = O.build_openood("cifar100", root, tmp_path / "out")
    b = Benchmark.load(tmp_path / "out/benchmark.json", verify=True)
    assert b.class_names == C100_NAMES and b.num_classes == 100
    assert [y for _, _, y in read_set(b.train)] == [0, 7, 99, 42]
    assert [y for _, _, y in read_set(b.val)] == [0, 5, 99] and b.test.num_samples == 3
    assert b.ood_test["cifar10"].group == "near" and b.ood_test["cifar10"].num_samples == 5
    assert [s.spec.subdir for s in built.sets][4] == "ood-test-cifar10"


# --- ImageNet-200: everything from OpenOOD's lists -----------------------------------------------


def test_imagenet200_from_lists(tmp_path):
    root = tmp_path / "root"
    ls, cl = root / "images_largescale", root / "images_classic"
    wnids = ["n01443537", "n01484850", "n01494475"]
    train = []
    for y, w in enumerate(wnids):
        for j in range(2):
            write_image(ls / f"imagenet_1k/train/{w}/{w}_{j}.JPEG", (90, 60))
            train.append(f"imagenet_1k/train/{w}/{w}_{j}.JPEG {y}")
    val = []
    for j, y in enumerate([2, 0, 1, 1]):
        write_image(ls / f"imagenet_1k/val/ILSVRC2012_val_{j + 1:08d}.JPEG", (60, 80))
        val.append(f"imagenet_1k/val/ILSVRC2012_val_{j + 1:08d}.JPEG {y}")
    d = "imagenet200/"
    write_list(root, d + "train_imagenet200.txt", train)
    write_list(root, d + "val_imagenet200.txt", val[:2])
    write_list(root, d + "test_imagenet200.txt", val[2:])
    ood = {"val_openimage_o": "openimage_o/a.jpg", "test_ssb_hard": "ssb_hard/n1/x.JPEG", "test_ninco": "ninco/c/y.jpg",
           "test_inaturalist": "inaturalist/Images/z.jpg", "test_openimage_o": "openimage_o/b.jpg"}  # fmt: skip
    for name, rel in ood.items():
        write_image(ls / rel, (100, 50))
        write_list(root, d + f"{name}.txt", [f"{rel} -1"] * (2 if name == "test_ssb_hard" else 1))
    write_image(cl / "texture/banded/banded_0001.jpg", (30, 30), mode="L")
    write_list(root, d + "test_textures.txt", ["texture/banded/banded_0001.jpg -1"])
    out = tmp_path / "out"
    built = O.build_openood("imagenet200", root, out)
    b = Benchmark.load(out / "benchmark.json", verify=True)
    assert b.class_names == wnids and b.train.image_size == (64, 64)
    assert [y for _, _, y in read_set(b.train)] == [0, 0, 1, 1, 2, 2]
    assert [y for _, _, y in read_set(b.val)] == [2, 0] and [y for _, _, y in read_set(b.test)] == [1, 1]
    assert {k: m.group for k, m in b.ood_test.items()} == {"ssb_hard": "near", "ninco": "near", "inaturalist": "far", "textures": "far", "openimage_o": "far"}
    assert b.ood_test["ssb_hard"].num_samples == 2 and list(b.ood_val) == ["openimage_o"]
    keys = [k for k, _, _ in read_set(b.ood_test["ssb_hard"])]
    assert keys == ["ood-test-ssb_hard-0000000", "ood-test-ssb_hard-0000001"]
    assert all(s.origin.startswith("image list benchmark_imglist/imagenet200/") for s in built.sets)
    O.build_openood("imagenet200", root, tmp_path / "small", image_size=16)
    assert Manifest.load(tmp_path / "small/id-train").image_size == (16, 16)


# --- bad input: the error names the file (and line) ---------------------------------------------


def test_missing_files_are_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError) as e:
        O.build_openood("cifar10", root, tmp_path / "out")
    msg = str(e.value)
    assert f"missing {root / 'cifar-10-batches-py/data_batch_1'}" in msg and "cifar-10-python.tar.gz extracted into --root" in msg
    assert "benchmark_imglist/cifar10/train_cifar10.txt" in msg
    with pytest.raises(DataError, match=r"missing .*benchmark_imglist/imagenet200/train_imagenet200\.txt"):
        O.build_openood("imagenet200", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before every source is found
    assert main(["data", "build-openood", "--id", "cifar100", "--root", str(root), "--out", str(tmp_path / "o")]) == 2


def test_missing_native_dataset_is_named_after_a_good_build(native_root, tmp_path):
    root, _ = native_root
    out = tmp_path / "out"
    O.build_openood("cifar10", root, out)
    (root / "svhn/test_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"ood-test set 'svhn': missing .*svhn/test_32x32\.mat \(SVHN"):
        O.build_openood("cifar10", root, out)
    Benchmark.load(out / "benchmark.json", verify=True)  # the previous build is untouched


def test_corrupt_and_hostile_pickles(native_root, tmp_path):
    root, _ = native_root
    bad = root / "cifar-10-batches-py/data_batch_3"
    bad.write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00dat")  # truncated
    with pytest.raises(DataError, match=rf"{bad}: not a readable CIFAR python-version pickle"):
        O.build_openood("cifar10", root, tmp_path / "out")
    assert not (tmp_path / "out/benchmark.json").exists()

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad.write_bytes(pickle.dumps({"data": Boom()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load"):
        O.build_openood("cifar10", root, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()
    dump(bad, {b"labels": [1]})
    with pytest.raises(DataError, match=rf"{bad}: no 'data'"):
        O.build_openood("cifar10", root, tmp_path / "out")


def test_wrong_mnist_magic(native_root, tmp_path):
    root, _ = native_root
    p = root / "mnist/t10k-images-idx3-ubyte"
    p.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=2049))
    with pytest.raises(DataError, match=rf"{p}: magic number 2049, expected 2051"):
        O.build_openood("cifar10", root, tmp_path / "out")
    p.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5])
    with pytest.raises(DataError, match=rf"{p}: .*truncated"):
        O.build_openood("cifar10", root, tmp_path / "out")


def test_bad_image_lists(native_root, tmp_path):
    root, _ = native_root
    add_cifar10_lists(root)
    lst = write_list(root, "cifar10/test_tin.txt", ["tin/val/images/val_1.JPEG -1", "tin/val/images/val_99.JPEG -1"])
    with pytest.raises(DataError, match=rf"{lst}:2: image .*val_99\.JPEG does not exist"):
        O.build_openood("cifar10", root, tmp_path / "out")
    write_list(root, "cifar10/test_tin.txt", ["tin/val/images/val_1.JPEG minus-one"])
    with pytest.raises(DataError, match=rf"{lst}:1: label 'minus-one'"):
        O.build_openood("cifar10", root, tmp_path / "out")
    write_list(root, "cifar10/test_tin.txt", ["../../etc/passwd -1"])
    with pytest.raises(DataError, match=rf"{lst}:1: image path .* stay inside"):
        O.build_openood("cifar10", root, tmp_path / "out")
    (root / "images_classic/tin/val/images/val_1.JPEG").write_bytes(b"not a jpeg")
    write_list(root, "cifar10/test_tin.txt", ["tin/val/images/val_1.JPEG -1"])
    with pytest.raises(DataError, match=rf"{lst}:1: cannot read image"):
        O.build_openood("cifar10", root, tmp_path / "out")
    write_list(root, "cifar10/test_tin.txt", ["tin/val/images/val_2.JPEG -1"])
    val = write_list(root, "cifar10/val_cifar10.txt", ["cifar10/test/airplane/0001.png 12"])
    with pytest.raises(DataError, match=rf"{val}:1: label 12 outside \[0, 10\)"):
        O.build_openood("cifar10", root, tmp_path / "out")
    (root / "benchmark_imglist/cifar10/test_cifar10.txt").unlink()
    with pytest.raises(DataError, match=r"give these lists together"):
        O.build_openood("cifar10", root, tmp_path / "out")


def test_bad_arguments(native_root, tmp_path):
    root, _ = native_root
    with pytest.raises(DataError, match="--id 'svhn'"):
        O.build_openood("svhn", root, tmp_path / "out")
    with pytest.raises(DataError, match="--image-size"):
        O.build_openood("cifar10", root, tmp_path / "out", image_size=2)
    with pytest.raises(DataError, match="--outlier"):
        O.build_openood("cifar10", root, tmp_path / "out", outlier=tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        O.build_openood("cifar10", root, tmp_path / "file")


def test_a_test_batch_too_small_for_the_val_rule_is_named(tmp_path):
    root = tmp_path / "root"
    write_native_root(root)  # 100 per class go to val, and the tiny test batch has fewer
    with pytest.raises(DataError, match=r"test_batch: \d+ images leave none for the test set"):
        O.build_openood("cifar10", root, tmp_path / "out")
