"""``ood-ray data build-openood --id imagenet1k``: OpenOOD v1.5's ImageNet-1K track from files on disk.

The fixtures are written here in OpenOOD's layout (``benchmark_imglist/imagenet/*.txt`` with the
images under ``images_largescale/`` and ``images_classic/``) and in ImageNet's own class-folder
layout, a few tiny images per set. No Ray, no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_openood import read_set, write_image, write_list

from ood_ray.cli import main
from ood_ray.data import openood as O
from ood_ray.data import openood_formats as F
from ood_ray.data.manifest import Benchmark, DataError

WNIDS = ["n01440764", "n01443537", "n01484850"]
LISTS = "imagenet/"  # OpenOOD keeps the ImageNet-1K lists in benchmark_imglist/imagenet/
OOD = {  # list stem: (image paths under images_largescale/, or images_classic/ for textures)
    "val_openimage_o": ["openimage_o/images/v1.jpg", "openimage_o/images/v2.jpg"],
    "test_ssb_hard": ["ssb_hard/n00005787/a.JPEG", "ssb_hard/n00005787/b.JPEG", "ssb_hard/n00006484/c.JPEG"],
    "test_ninco": ["ninco/amphiuma_means/x.jpg"],
    "test_inaturalist": ["inaturalist/images/i1.jpg", "inaturalist/images/i2.jpg"],
    "test_textures": ["texture/banded/banded_0002.jpg"],
    "test_openimage_o": ["openimage_o/images/t1.jpg", "openimage_o/images/t2.jpg", "openimage_o/images/t3.jpg"],
}
VAL_LABELS = [2, 0, 1, 1, 0]  # of ILSVRC2012_val_00000001..5: the first two go to val, the rest to test


def write_ood_lists(root: Path) -> None:
    for stem, rels in OOD.items():
        base = root / ("images_classic" if stem == "test_textures" else "images_largescale")
        for rel in rels:
            write_image(base / rel, (70, 50))
        write_list(root, LISTS + f"{stem}.txt", [f"{rel} -1" for rel in rels])


def write_openood_root(root: Path) -> None:
    """OpenOOD's layout: every set from its list."""
    ls = root / "images_largescale"
    train = []
    for y, w in enumerate(WNIDS):
        for j in range(2):
            write_image(ls / f"imagenet_1k/train/{w}/{w}_{j + 1}.JPEG", (90, 60))
            train.append(f"imagenet_1k/train/{w}/{w}_{j + 1}.JPEG {y}")
    val = []
    for j, y in enumerate(VAL_LABELS):
        write_image(ls / f"imagenet_1k/val/ILSVRC2012_val_{j + 1:08d}.JPEG", (60, 80))
        val.append(f"imagenet_1k/val/ILSVRC2012_val_{j + 1:08d}.JPEG {y}")
    val[1] = val[1].replace(" 0", " {'label': 0}")  # OpenOOD's dict form of a label
    write_list(root, LISTS + "train_imagenet.txt", train)
    write_list(root, LISTS + "val_imagenet.txt", val[:2])
    write_list(root, LISTS + "test_imagenet.txt", val[2:])
    write_ood_lists(root)


def write_imagenet_folders(root: Path, base: str = "imagenet") -> None:
    """ImageNet's own class folders: 2 training and 2 validation images per class."""
    for w in WNIDS:
        for j in range(2):
            write_image(root / f"{base}/train/{w}/{w}_{j + 1}.JPEG", (80, 64))
            write_image(root / f"{base}/val/{w}/ILSVRC2012_val_{WNIDS.index(w) * 2 + j + 1:08d}.JPEG", (64, 80))


GROUPS = {"ssb_hard": "near", "ninco": "near", "inaturalist": "far", "textures": "far", "openimage_o": "far"}


def test_cli_builds_imagenet1k_from_openood_lists(tmp_path, capsys):
    root, out = tmp_path / "root", tmp_path / "out"
    write_openood_root(root)
    assert main(["data", "build-openood", "--id", "imagenet1k", "--root", str(root), "--out", str(out), "--maxcount", "2"]) == 0
    printed = capsys.readouterr().out
    lines = {ln.split()[1]: ln.split()[:4] for ln in printed.splitlines() if ln.startswith("  ")}
    assert printed.startswith("wrote OpenOOD v1.5 imagenet1k (9 sets):")
    assert lines == {
        "id-train": ["train", "id-train", "-", "6"], "id-val": ["val", "id-val", "-", "2"],
        "id-test": ["test", "id-test", "-", "3"], "ood-val-openimage_o": ["ood-val", "ood-val-openimage_o", "far", "2"],
        "ood-test-ssb_hard": ["ood-test", "ood-test-ssb_hard", "near", "3"],
        "ood-test-ninco": ["ood-test", "ood-test-ninco", "near", "1"],
        "ood-test-inaturalist": ["ood-test", "ood-test-inaturalist", "far", "2"],
        "ood-test-textures": ["ood-test", "ood-test-textures", "far", "1"],
        "ood-test-openimage_o": ["ood-test", "ood-test-openimage_o", "far", "3"],
    }  # fmt: skip
    assert printed.count("image list benchmark_imglist/imagenet/") == 9

    b = Benchmark.load(out / "benchmark.json", verify=True)
    assert b.class_names == WNIDS and b.num_classes == 3 and b.outlier is None
    assert all(m.image_size == (64, 64) and m.mode == "RGB" for m in b.all_manifests())  # the default size
    assert (b.train.role, b.val.role, b.test.role) == ("train", "val", "test")
    assert [y for _, _, y in read_set(b.train)] == [0, 0, 1, 1, 2, 2]
    assert [y for _, _, y in read_set(b.val)] == [2, 0] and [y for _, _, y in read_set(b.test)] == [1, 1, 0]
    assert list(b.ood_val) == ["openimage_o"] and b.ood_val["openimage_o"].role == "ood-val"
    assert {k: m.group for k, m in b.ood_test.items()} == GROUPS
    assert {k: m.num_samples for k, m in b.ood_test.items()} == {k: len(OOD[f"test_{k}"]) for k in GROUPS}
    assert all(m.role == "ood-test" for m in b.ood_test.values())
    for m in [*b.ood_test.values(), *b.ood_val.values()]:
        assert {y for _, _, y in read_set(m)} == {-1}
    keys = [k for k, _, _ in read_set(b.ood_test["ssb_hard"])]
    assert keys == [f"ood-test-ssb_hard-{i:07d}" for i in range(3)]
    spec = json.loads((out / "benchmark.json").read_text())
    assert spec["name"] == "openood-v1.5-imagenet1k" and spec["openood_id"] == "imagenet1k" and spec["image_size"] == [64, 64]
    assert len(b.train.shards) == 3  # 6 samples, 2 per shard

    built = O.build_openood("imagenet1k", root, tmp_path / "big", image_size=24)
    assert {m.image_size for m in Benchmark.load(built.path).all_manifests()} == {(24, 24)}


def test_imagenet1k_from_imagenet_class_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "IMAGENET_VAL_PER_CLASS", 1)  # the fixture has 2 val images per class, not 50
    root = tmp_path / "root"
    write_imagenet_folders(root)
    write_ood_lists(root)
    built = O.build_openood("imagenet1k", root, tmp_path / "out")
    b = Benchmark.load(built.path, verify=True)
    assert b.class_names == WNIDS  # the training folders' wnids, sorted
    origin = {s.spec.subdir: s.origin for s in built.sets}
    assert origin["id-train"] == "imagenet/train/<wnid>/ (all images)"
    assert origin["id-val"] == "imagenet/val/<wnid>/ (first 1 per class)"
    assert origin["id-test"] == "imagenet/val/<wnid>/ (all but the first 1 per class)"
    assert origin["ood-test-ninco"] == "image list benchmark_imglist/imagenet/test_ninco.txt"
    assert [y for _, _, y in read_set(b.train)] == [0, 0, 1, 1, 2, 2]
    assert [y for _, _, y in read_set(b.val)] == [0, 1, 2] and [y for _, _, y in read_set(b.test)] == [0, 1, 2]
    assert b.ood_test["ssb_hard"].group == "near" and b.ood_test["textures"].num_samples == 1

    # the Kaggle / ILSVRC layout: the same class folders under ILSVRC/Data/CLS-LOC/
    (root / "ILSVRC/Data").mkdir(parents=True)
    (root / "imagenet").rename(root / "ILSVRC/Data/CLS-LOC")
    built = O.build_openood("imagenet1k", root, tmp_path / "out2")
    assert built.sets[1].origin.startswith("ILSVRC/Data/CLS-LOC/val/<wnid>/") and built.sets[1].manifest.num_samples == 3

    # a validation class that training does not have cannot be labelled
    write_image(root / "ILSVRC/Data/CLS-LOC/val/n09999999/ILSVRC2012_val_00000099.JPEG")
    with pytest.raises(DataError, match=r"val/n09999999: class folder 'n09999999' is not one of the 3 training classes"):
        O.build_openood("imagenet1k", root, tmp_path / "out3")


def test_missing_imagenet1k_files_are_named(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    with pytest.raises(DataError) as e:
        O.build_openood("imagenet1k", root, out)
    msg = str(e.value)
    assert f"missing {root / 'imagenet/train'}" in msg and f"{root / 'benchmark_imglist/imagenet/train_imagenet.txt'}" in msg

    write_openood_root(root)
    missing = root / "benchmark_imglist/imagenet/test_ninco.txt"
    missing.unlink()  # and no NINCO folder to fall back on
    with pytest.raises(DataError) as e:
        O.build_openood("imagenet1k", root, out)
    assert f"ood-test set 'ninco': missing {root / 'NINCO/NINCO_OOD_classes'}" in str(e.value) and str(missing) in str(e.value)
    write_list(root, LISTS + "test_ninco.txt", ["ninco/amphiuma_means/x.jpg -1", "ninco/amphiuma_means/gone.jpg -1"])
    with pytest.raises(DataError, match=rf"{missing}:2: image .*ninco/amphiuma_means/gone\.jpg does not exist"):
        O.build_openood("imagenet1k", root, out)
    write_list(root, LISTS + "test_ninco.txt", ["ninco/amphiuma_means/x.jpg -1"])

    (root / "benchmark_imglist/imagenet/test_imagenet.txt").unlink()
    with pytest.raises(DataError, match=r"found .*train_imagenet\.txt but not .*test_imagenet\.txt: give these lists together"):
        O.build_openood("imagenet1k", root, out)
    assert not out.exists()  # nothing written before every source is found
    assert main(["data", "build-openood", "--id", "imagenet1k", "--root", str(root), "--out", str(out)]) == 2


def test_flat_imagenet_val_folder_is_refused(tmp_path):
    root = tmp_path / "root"
    write_imagenet_folders(root)
    write_ood_lists(root)
    write_image(root / "imagenet/val/ILSVRC2012_val_00000042.JPEG")  # the val tar as shipped: no class folders
    with pytest.raises(DataError, match=rf"{root / 'imagenet/val'}: images lie directly in the folder"):
        O.build_openood("imagenet1k", root, tmp_path / "out")
    with pytest.raises(DataError, match=r"imagenet1k"):
        O.benchmark_sets("imagenet")  # the list folder's name is not an id
