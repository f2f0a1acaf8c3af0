"""Hostile and careless files for ``data build-openood``'s readers: each is written by the test,
and each must end as a one-line ``DataError`` naming the file, before memory is spent on it."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib

import numpy as np
import pytest
import scipy.io
import test_openood
from PIL import Image
from test_openood import add_cifar10_lists, idx_bytes, read_set

from ood_ray.data import openood as O
from ood_ray.data import openood_formats as F
from ood_ray.data.manifest import Benchmark, DataError
from ood_ray.data.safe_pickle import load_data_pickle

native_root = test_openood.native_root  # the fixture: CIFAR, MNIST, SVHN, DTD, ... in their publishers' formats


class Reduce:
    def __init__(self, *value):
        self.value = value

    def __reduce__(self):
        return self.value


def test_published_layouts_still_load(tmp_path):
    p = tmp_path / "b"
    d = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "ids": np.array([5, 6]), "n": np.int64(7), b"k": b"v"}
    p.write_bytes(pickle.dumps(d, protocol=2))
    got = load_data_pickle(p)
    assert got["data"].dtype == np.uint8 and got["data"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert got["ids"].tolist() == [5, 6] and got["n"] == 7 and got[b"k"] == b"v"


@pytest.mark.parametrize("payload, message", [
    (Reduce(np.ndarray, ((1,), np.dtype("O"), b"A" * 8)), r"refusing numpy dtype 'O8'"),
    (Reduce(np.ndarray, ((8,), np.dtype("u1"), b"A" * 8)), r"refusing to call numpy.ndarray\(...\) directly"),
    (np.zeros(2, dtype=[("a", "<i8")]), r"refusing numpy dtype 'V8'"),
    (Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("<i8"), 1 << 20)}, 8, 1, 16)), r"refusing numpy dtype 'V8'"),
    (np.array([1.5]), r"refusing numpy dtype 'f8'"),
    (np.array(["x"], dtype=object), r"refusing numpy dtype 'O8'"),
])  # fmt: skip
def test_memory_unsafe_numpy_objects_are_refused(native_root, tmp_path, payload, message):
    root, _ = native_root
    for name in ("data_batch_1", "batches.meta"):
        bad = root / "cifar-10-batches-py" / name
        good = bad.read_bytes()
        d = pickle.loads(good, encoding="latin1")
        d["junk"] = [payload]
        bad.write_bytes(pickle.dumps(d, protocol=2))
        with pytest.raises(DataError, match=rf"^{bad}: {message}"):
            O.build_openood("cifar10", root, tmp_path / "out")
        bad.write_bytes(good)


@pytest.mark.parametrize("data, message", [
    (b"\x80\x02}r" + struct.pack("<I", 1 << 26) + b".", r"no 'label_names'"),  # memo index 2**26: one dict entry
    (b"\x80\x02X" + struct.pack("<I", 0xFFFFFFF0) + b"abc", r"not a readable .* only 3 remain"),  # length bomb
    (b"\x80\x02(" + b"K\x01" * 1_000_001 + b"l.", r"more than 1,000,000 pickle opcodes"),
    (b"\x80\x02X\xd0\x07\x00\x00" + b"a" * 2000 + b"q\x00(" + b"c_codecs\nencode\nh\x00X\x06\x00\x00\x00latin1\x86R" * 9 + b"l.", r"builds more data than it holds"),  # 2 KB encoded 9 times
    (b"\x80\x02" + b"]" * 40 + b"a" * 39 + b".", r"nested deeper than 16 levels"),
    (b"\x80\x02}(K\x01K\x02X\x01\x00\x00\x00aK\x03u.", r"key 1 is a int"),
])  # fmt: skip
def test_pickle_bombs_and_odd_keys_are_named(native_root, tmp_path, data, message):
    root, _ = native_root
    bad = root / "cifar-10-batches-py/batches.meta"
    bad.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{bad}: .*{message}"):
        O.build_openood("cifar10", root, tmp_path / "out")


def _mnist(root, raw: bytes, gz: bool):
    for p in (root / "mnist").glob("t10k-images*"):
        p.unlink()
    p = root / ("mnist/t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    p.write_bytes(raw)
    return p


def test_idx_headers_are_checked_before_reading(native_root, tmp_path):
    root, _ = native_root
    n = (1 << 31) // 784  # 2 GiB of zeros in 2 MB of gzip
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = co.compress(struct.pack(">IIII", 2051, n, 28, 28)) + b"".join(co.compress(bytes(1 << 24)) for _ in range(128)) + co.flush()
    good = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    cases = [
        (bomb, True, r"the header says \[2739137, 28, 28\] \(2,147,483,408 bytes\), more than this reader takes"),
        (struct.pack(">IIII", 2051, 5, 0, 28), False, r"the header says \[5, 0, 28\]: a dimension of 0 holds no images"),
        (struct.pack(">IIII", 2051, *[0xFFFFFFFF] * 3) + bytes(16), False, r"the header says \[4294967295, 4294967295, 4294967295\] .* more than this reader takes"),
        (good[:10] + b"\x07" + good[11:], True, r"cannot read \(error: .*invalid block type"),  # a reserved deflate block type
        (good[:-12], True, r"cannot read \(EOFError"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1], False, r"1,567 data bytes, the header says \[2, 28, 28\]"),
    ]
    for raw, gz, message in cases:
        p = _mnist(root, raw, gz)
        with pytest.raises(DataError, match=rf"^{p}: {message}"):
            F.read_idx(p)


def test_svhn_mat_that_inflates_past_its_bound_is_refused_before_loadmat(native_root, tmp_path, monkeypatch):
    root, _ = native_root
    p = root / "svhn/test_32x32.mat"
    monkeypatch.setattr(F, "MAX_SVHN_BYTES", 32 * 32 * 3 * 100)  # the bound, scaled down with the file
    scipy.io.savemat(p, {"X": np.zeros((32, 32, 3, 101), np.uint8), "y": np.ones((101, 1), np.uint8)}, do_compression=True)
    assert p.stat().st_size < 2000
    with pytest.raises(DataError, match=rf"^{p}: its variables take more than 307,200 bytes once inflated"):
        F.read_svhn_mat(p)
    scipy.io.savemat(p, {"X": np.zeros((32, 32, 3, 99), np.uint8), "y": np.ones((99, 1), np.uint8)}, do_compression=True)
    assert F.read_svhn_mat(p)[0].shape == (99, 32, 32, 3)
    raw = p.read_bytes()
    p.write_bytes(raw[:140] + b"\xff" * 20 + raw[160:])  # inside X's zlib stream
    with pytest.raises(DataError, match=rf"^{p}: (a compressed variable is damaged|not a readable)"):
        F.read_svhn_mat(p)
    p.write_bytes(b"MATLAB 4.0" + raw[10:])
    with pytest.raises(DataError, match=rf"^{p}: not a MATLAB 5.0 MAT-file"):
        F.read_svhn_mat(p)


def test_long_thin_and_16_bit_images(native_root, tmp_path):
    root, _ = native_root
    thin = root / "dtd/images/dotted/thin.png"
    Image.new("L", (3_000_000, 1), 128).save(thin)  # 3 KB on disk
    with pytest.raises(DataError, match=rf"dtd/images/dotted/thin.png: image {thin} is 1x3000000 \(HxW\), an aspect ratio above 50:1"):
        O.build_openood("cifar10", root, tmp_path / "out")
    thin.unlink()
    a = np.full((40, 40), 40000, np.uint16)
    Image.fromarray(a).save(root / "dtd/images/dotted/deep.png")
    assert Image.open(root / "dtd/images/dotted/deep.png").mode == "I;16"
    built = O.build_openood("cifar10", root, tmp_path / "out")
    m = next(b.manifest for b in built.sets if b.spec.subdir == "ood-test-texture")
    deep = [img for _, img, _ in read_set(m) if img.std() == 0 and 100 < img.mean() < 200]
    assert len(deep) == 1 and int(deep[0][0, 0, 0]) == 40000 * 255 // 65535  # scaled, not clipped at 255


def test_image_list_label_far_beyond_the_classes(native_root, tmp_path):
    root, _ = native_root
    add_cifar10_lists(root)
    lst = root / "benchmark_imglist/cifar10/train_cifar10.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join([*lines, lines[0].rsplit(" ", 1)[0] + " 1000000000000"]) + "\n")
    (root / "cifar-10-batches-py/batches.meta").unlink()  # class names then come from the list
    with pytest.raises(DataError, match=r"ID labels must be 0..K-1 .* the largest is 1000000000000"):
        O.build_openood("cifar10", root, tmp_path / "out")


def test_build_is_staged_locked_and_refuses_symlinked_sub_folders(native_root, tmp_path):
    root, _ = native_root
    out = tmp_path / "out"
    O.build_openood("cifar10", root, out)
    before = (out / "benchmark.json").read_text()
    (root / "svhn/test_32x32.mat").write_bytes(b"MATLAB 5.0" + bytes(200))  # fails at set 8 of 10
    with pytest.raises(DataError, match="svhn"):
        O.build_openood("cifar10", root, out)
    assert (out / "benchmark.json").read_text() == before
    Benchmark.load(out / "benchmark.json", verify=True)  # the previous build, whole
    assert not [p for p in out.iterdir() if p.name.startswith(O.STAGING)]
    (out / "ood-test-mnist").rename(tmp_path / "elsewhere")
    (out / "ood-test-mnist").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=r"ood-test-mnist is a symbolic link"):
        O.build_openood("cifar10", root, out)
    assert (tmp_path / "elsewhere/manifest.json").exists()
    assert (out.parent / ".out.lock").exists()
