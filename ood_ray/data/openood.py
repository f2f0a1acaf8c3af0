"""The OpenOOD v1.5 benchmarks (CIFAR-10, CIFAR-100, ImageNet-200, ImageNet-1K), built from files on disk.

``build_openood(id, root, out)`` writes one shard set per OpenOOD set into ``out/<set>/`` and a
``benchmark.json`` naming them; nothing is downloaded. Every set comes from one of two sources:

1. OpenOOD's image list ``<root>/benchmark_imglist/<folder>/<split>.txt`` (``<folder>`` is the id,
   ``imagenet`` for ``imagenet1k``), as OpenOOD's downloader lays it out, with the images under
   ``<root>/images_classic/`` or ``<root>/images_largescale/``. When the list is there it defines
   exactly which images are in the set: this is how v1.5 defines its ID val/test splits, its OOD
   validation set and its near/far OOD test sets.
2. Otherwise the publisher's own format under ``<root>`` (CIFAR python pickles, MNIST idx, SVHN
   .mat, image folders, ImageNet's class folders), with deterministic rules (``docs/openood.md``,
   "Without the lists"). These reproduce the structure and roughly the sizes of the v1.5 sets, not
   OpenOOD's exact image choice.

Sets (sub-folder, role, group) for ``cifar10`` (``cifar100`` swaps CIFAR-10 and CIFAR-100):
``id-train`` / ``id-val`` / ``id-test``; ``ood-val-tin`` (Tiny ImageNet, 20 classes);
``ood-test-cifar100`` and ``ood-test-tin`` (near); ``ood-test-mnist``, ``-svhn``, ``-texture``,
``-places365`` (far). For ``imagenet200``: the ID splits (lists only: ImageNet-200 is defined by
them); ``ood-val-openimage_o``; ``ood-test-ssb_hard`` and ``-ninco`` (near); ``ood-test-inaturalist``,
``-textures``, ``-openimage_o`` (far). ``imagenet1k`` has the same sets from the lists in
``benchmark_imglist/imagenet/``, its ID splits also from ImageNet's own class folders (train, and
val split into id-val / id-test). OpenOOD v1.5 trains without auxiliary outliers; ``outlier``
(an image list such as OpenOOD's ``train_tin597.txt``, or an image folder) adds an ``outlier`` set
for Outlier Exposure, else benchmark.json has ``"outlier": null``.

Every image is converted to RGB and fit to ``image_size``² the way OpenOOD's test preprocessing
does (shorter side resized, bilinear, then a centre crop): 32 for the CIFAR benchmarks, 64 by
default for ImageNet-200 and ImageNet-1K (OpenOOD itself uses 224 crops). ID labels are kept, OOD
labels are -1; sample keys are ``<set>-<index>`` in list (or file) order. See ``docs/openood.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import ID_ROLES, OOD_LABEL, DataError, Manifest
from .openood_formats import (
    Missing,
    Source,
    fit_square,
    folder_source,
    image_files,
    imagenet_source,
    iter_arrays,
    list_source,
    mnist_source,
    need,
    open_image,
    read_cifar_batch,
    read_cifar_meta,
    read_image_list,
    svhn_source,
    tin_source,
)
from .writer import file_lock, remove_stale, write_shards

BENCHMARKS = ("cifar10", "cifar100", "imagenet200", "imagenet1k")
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet200": 64, "imagenet1k": 64}
CLASSIC, LARGESCALE = "images_classic", "images_largescale"
SPEC_FILE = "benchmark.json"
STAGING = ".build-openood-"  # + pid: the folder inside --out where a build writes before it swaps in
LISTS_HINT = "OpenOOD's image lists: benchmark_imglist.zip extracted into --root"

CIFAR = {
    "cifar10": {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": "test_batch",
                "meta": "batches.meta", "names": "label_names", "labels": "labels", "classes": 10, "val_per_class": 100,
                "hint": "the CIFAR-10 python version, cifar-10-python.tar.gz extracted into --root"},
    "cifar100": {"dir": "cifar-100-python", "train": ["train"], "test": "test", "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels", "classes": 100, "val_per_class": 10,
                 "hint": "the CIFAR-100 python version, cifar-100-python.tar.gz extracted into --root"},
}  # fmt: skip
IMAGENET = {  # --id: OpenOOD's list folder, the ID lists' stem, the native source of the ID sets (None: lists only)
    "imagenet200": ("imagenet200", "imagenet200", None),
    "imagenet1k": ("imagenet", "imagenet", "imagenet"),
}


@dataclass(frozen=True)
class SetSpec:
    subdir: str  # output sub-folder, shard prefix and key prefix
    role: str
    key: str  # the name in benchmark.json (OpenOOD's dataset name for OOD sets)
    group: str | None
    imglist: str  # OpenOOD's list, relative to --root
    data_dir: str  # what the list's paths are relative to, relative to --root
    native: str | None  # native source when the list is absent; None: the list is required


@dataclass
class BuiltSet:
    spec: SetSpec
    manifest: Manifest
    origin: str


@dataclass
class Built:
    path: Path  # benchmark.json
    sets: list[BuiltSet] = field(default_factory=list)


def benchmark_sets(bench: str) -> list[SetSpec]:
    d = f"benchmark_imglist/{bench}/"
    if bench in IMAGENET:
        folder, stem, native = IMAGENET[bench]
        d, ls = f"benchmark_imglist/{folder}/", LARGESCALE
        return [
            *(SetSpec(f"id-{r}", r, r, None, d + f"{r}_{stem}.txt", ls, native and f"{native}:{r}") for r in ("train", "val", "test")),
            SetSpec("ood-val-openimage_o", "ood-val", "openimage_o", "far", d + "val_openimage_o.txt", ls, "openimage_o:val"),
            SetSpec("ood-test-ssb_hard", "ood-test", "ssb_hard", "near", d + "test_ssb_hard.txt", ls, "ssb_hard"),
            SetSpec("ood-test-ninco", "ood-test", "ninco", "near", d + "test_ninco.txt", ls, "ninco"),
            SetSpec("ood-test-inaturalist", "ood-test", "inaturalist", "far", d + "test_inaturalist.txt", ls, "inaturalist"),
            SetSpec("ood-test-textures", "ood-test", "textures", "far", d + "test_textures.txt", CLASSIC, "dtd"),
            SetSpec("ood-test-openimage_o", "ood-test", "openimage_o", "far", d + "test_openimage_o.txt", ls, "openimage_o:test"),
        ]  # fmt: skip
    if bench not in CIFAR:
        raise DataError(f"--id {bench!r}: choose one of {', '.join(BENCHMARKS)}")
    other = "cifar100" if bench == "cifar10" else "cifar10"
    c = CLASSIC
    return [
        SetSpec("id-train", "train", "train", None, d + f"train_{bench}.txt", c, f"{bench}:train"),
        SetSpec("id-val", "val", "val", None, d + f"val_{bench}.txt", c, f"{bench}:val"),
        SetSpec("id-test", "test", "test", None, d + f"test_{bench}.txt", c, f"{bench}:test"),
        SetSpec("ood-val-tin", "ood-val", "tin", "near", d + "val_tin.txt", c, "tin:val"),
        SetSpec(f"ood-test-{other}", "ood-test", other, "near", d + f"test_{other}.txt", c, f"{other}:test"),
        SetSpec("ood-test-tin", "ood-test", "tin", "near", d + "test_tin.txt", c, "tin:test"),
        SetSpec("ood-test-mnist", "ood-test", "mnist", "far", d + "test_mnist.txt", c, "mnist"),
        SetSpec("ood-test-svhn", "ood-test", "svhn", "far", d + "test_svhn.txt", c, "svhn"),
        SetSpec("ood-test-texture", "ood-test", "texture", "far", d + "test_texture.txt", c, "dtd"),
        SetSpec("ood-test-places365", "ood-test", "places365", "far", d + "test_places365.txt", c, "places365"),
    ]  # fmt: skip


def builder_entries(bench: str) -> list[str]:
    """Names this builder owns inside an output folder (and replaces when rebuilding)."""
    return [SPEC_FILE, *(s.subdir for s in benchmark_sets(bench)), "outlier"]


# ---------------------------------------------------------------------------------------------
# Sources


def _cifar_source(root: Path, which: str, part: str, cache: dict) -> Source:
    c = CIFAR[which]
    folder = root / c["dir"]
    files = c["train"] if part == "train" else [c["test"]]
    paths = [need(root, [f"{c['dir']}/{f}"], c["hint"]) for f in files]
    k = c["val_per_class"]

    def load() -> Iterator[tuple[object, int, str]]:
        for p in paths:
            if part == "train":
                yield from iter_arrays(*read_cifar_batch(p, c["labels"], c["classes"]), str(p))
                continue
            if p not in cache:  # the test batch serves two sets (val and test): read it once
                cache[p] = read_cifar_batch(p, c["labels"], c["classes"])
            images, labels = cache[p]
            is_val = np.zeros(len(labels), bool)
            for y in range(c["classes"]):
                is_val[np.flatnonzero(labels == y)[:k]] = True
            keep = np.flatnonzero(is_val if part == "val" else ~is_val)
            if part != "train" and not len(keep):
                raise DataError(f"{p}: {len(labels)} images leave none for the {part} set once the first {k} per class go to val; is it the full test batch?")
            yield from ((images[i], int(labels[i]), f"{p}[{i}]") for i in keep)

    what = {"train": "all images", "val": f"first {k} per class", "test": f"all but the first {k} per class"}[part]
    origin = f"{folder.name}/{files[0]}{'..' + files[-1][-1] if len(files) > 1 else ''} ({what})"
    return Source(origin, None, load)


def native_source(native: str, root: Path, cache: dict) -> Source:
    name, _, part = native.partition(":")
    if name in CIFAR:
        return _cifar_source(root, name, part, cache)
    if name == "tin":
        return tin_source(root, part)
    if name == "mnist":
        return mnist_source(root)
    if name == "svhn":
        return svhn_source(root)
    if name == "imagenet":
        return imagenet_source(root, part, cache)
    return folder_source(root, name, part or None)


#: Sets whose lists must be given together: a list for one and native files for another could put
#: an image in both (e.g. ID val from a list, ID test from the native test batch).
TOGETHER = {"cifar": (("id-train", "id-val", "id-test"), ("ood-val-tin", "ood-test-tin")),
            "imagenet200": (("ood-val-openimage_o", "ood-test-openimage_o"),),
            "imagenet1k": (("id-train", "id-val", "id-test"), ("ood-val-openimage_o", "ood-test-openimage_o"))}  # fmt: skip


def plan(bench: str, root: Path, outlier: str | Path | None = None, cache: dict | None = None) -> list[tuple[SetSpec, Source]]:
    """Resolve every set's source, checking that its files exist; nothing is written."""
    specs = benchmark_sets(bench)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder")
    cache = {} if cache is None else cache
    by_name = {s.subdir: s for s in specs}
    for together in TOGETHER.get(bench, TOGETHER["cifar"]):
        have = [n for n in together if (root / by_name[n].imglist).is_file()]
        if have and len(have) != len(together):
            lacking = [str(root / by_name[n].imglist) for n in together if n not in have]
            raise DataError(f"{bench}: found {root / by_name[have[0]].imglist} but not {', '.join(lacking)}: give these lists together or none of them (mixing a list with native files could put one image in two sets)")
    out = []
    for spec in specs:
        lst = root / spec.imglist
        if lst.is_file():
            src = list_source(read_image_list(lst, root / spec.data_dir), f"image list {spec.imglist}")
        elif spec.native is None:
            raise DataError(f"{bench}: missing {lst} ({LISTS_HINT}; the {spec.role} split of {bench} is defined only by it, its images go in {root / spec.data_dir})")
        else:
            try:
                src = native_source(spec.native, root, cache)
            except Missing as e:
                raise DataError(f"{bench}: {spec.role} set {spec.key!r}: missing {e.path} ({e.hint}), or OpenOOD's image list {lst}") from None
        out.append((spec, src))
    if outlier is not None:
        out.append((SetSpec("outlier", "outlier", "outlier", None, "", "", None), _outlier_source(bench, root, Path(outlier))))
    return out


def _outlier_source(bench: str, root: Path, path: Path) -> Source:
    if not path.exists() and not path.is_absolute() and (root / path).exists():
        path = root / path  # e.g. benchmark_imglist/cifar10/train_tin597.txt
    if path.is_dir():
        files = image_files(path)
        return Source(f"image folder {path}", len(files), lambda: ((f, OOD_LABEL, str(f)) for f in files))
    if path.is_file():
        base = root / (LARGESCALE if bench in IMAGENET else CLASSIC)
        return list_source(read_image_list(path, base), f"image list {path}")
    raise DataError(f"--outlier {path}: no such file or folder (an image list like OpenOOD's benchmark_imglist/cifar10/train_tin597.txt, or an image folder)")


def class_names(bench: str, root: Path, train: Source) -> list[str]:
    """The ID class names: the dataset's meta file when it is there (CIFAR), else the folder names of
    the training list's images per label (``cifar10/train/<class>/..``, ``imagenet_1k/train/<wnid>/..``)."""
    if bench in CIFAR:
        c = CIFAR[bench]
        meta = root / c["dir"] / c["meta"]
        if meta.is_file() or train.list_items is None:
            names = read_cifar_meta(need(root, [f"{c['dir']}/{c['meta']}"], c["hint"]), c["names"])
            if len(names) != c["classes"]:
                raise DataError(f"{meta}: {len(names)} class names, expected {c['classes']}")
            return names
    found: dict[int, str] = {}
    for it in train.list_items or []:
        name = it.path.parent.name
        if it.label < 0:
            raise DataError(f"{it.where}: ID label {it.label} (training labels are 0, 1, ...)")
        if found.setdefault(it.label, name) != name:
            raise DataError(f"{it.where}: label {it.label} is in folder {name!r}, but earlier lines put it in {found[it.label]!r}; cannot name the classes")
    if sorted(found) != list(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - set(found))[:5] if max(found) < 10 * len(found) else None
        detail = f"labels {gaps} have no image" if gaps else f"the largest is {max(found)}"
        raise DataError(f"{train.origin}: ID labels must be 0..K-1 with every label in the training list; {len(found)} labels are used and {detail}")
    return [found[i] for i in range(len(found))]


# ---------------------------------------------------------------------------------------------
# The builder


def _samples(subdir: str, src: Source, size: int, n_classes: int | None) -> Iterator[tuple[str, object, int]]:
    for i, (obj, label, where) in enumerate(src.items()):
        image = open_image(obj, where) if isinstance(obj, Path) else obj
        if n_classes is not None and not 0 <= label < n_classes:
            raise DataError(f"{where}: label {label} outside [0, {n_classes})")
        yield f"{subdir}-{i:07d}", fit_square(image, size, where), (label if n_classes is not None else OOD_LABEL)


def build_openood(
    bench: str,
    root: str | Path,
    out: str | Path,
    *,
    image_size: int | None = None,
    maxcount: int = 10000,
    outlier: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Built:
    """Build OpenOOD v1.5 benchmark ``bench`` from ``root`` into ``out``; see the module docstring.

    Every source is checked before anything in ``out`` changes. The sets are written into a staging
    folder inside ``out`` while holding a lock next to ``out`` (``.<out>.lock``: two builds into one
    folder never interleave). Only when all are written is ``benchmark.json`` removed, this
    builder's own sub-folders replaced by the new ones, and ``benchmark.json`` written last
    (atomically), so a failed or killed build leaves the previous benchmark as it was; other files
    in ``out`` are left alone.
    """
    size = DEFAULT_IMAGE_SIZE.get(bench, 32) if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise DataError(f"--image-size {size!r}: choose an int in [8, 4096]")
    cache: dict = {}  # native files read once, shared by the sets that use them
    sets = plan(bench, Path(root), outlier, cache)
    try:
        names = class_names(bench, Path(root), sets[0][1])
    except Missing as e:
        raise DataError(f"{bench}: class names: {e}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    for entry in builder_entries(bench):
        if (out / entry).is_symlink():
            raise DataError(f"--out {out}: {entry} is a symbolic link; this builder replaces {entry} and will not follow or remove a link (remove it, or choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        remove_stale(out, STAGING)  # left by a build that was killed
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=out))
        try:
            spec, built = _write_sets(bench, sets, names, size, staging, maxcount, progress, log)
            _swap_in(bench, staging, out, spec, built)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return built


def _write_sets(bench, sets, names, size, staging: Path, maxcount, progress, log) -> tuple[dict, Built]:
    spec: dict = {"name": f"openood-v1.5-{bench}", "openood_id": bench, "image_size": [size, size],
                  "train": None, "val": None, "test": None, "outlier": None, "ood_val": {}, "ood_test": {}, "sources": {}}  # fmt: skip
    built = Built(staging / SPEC_FILE)
    for i, (s, src) in enumerate(sets, 1):
        if log:
            log(f"[{i}/{len(sets)}] {s.subdir}: {src.origin}")
        is_id = s.role in ID_ROLES
        group = f", {s.group} OOD" if s.group else ""
        m = write_shards(
            _samples(s.subdir, src, size, len(names) if is_id else None), staging / s.subdir, name=s.subdir, role=s.role,
            image_size=(size, size), mode="RGB", class_names=names if is_id else (), group=s.group,
            description=f"OpenOOD v1.5 {bench}, {s.role}{group}: {s.key} from {src.origin}; RGB {size}x{size} "
            f"(shorter side resized to {size}, bilinear, centre crop).",
            maxcount=maxcount, total=src.count, progress=progress,
        )  # fmt: skip
        rel = f"{s.subdir}/manifest.json"
        if is_id or s.role == "outlier":
            spec[s.role] = rel
        else:
            spec["ood_val" if s.role == "ood-val" else "ood_test"][s.key] = rel
        spec["sources"][s.subdir] = src.origin
        built.sets.append(BuiltSet(s, m, src.origin))
    return spec, built


def _swap_in(bench: str, staging: Path, out: Path, spec: dict, built: Built) -> None:
    """Move the finished sets from ``staging`` into ``out``: ``benchmark.json`` is removed first and
    written last (atomically), so a half-swapped folder is never taken for a complete one."""
    spec_path = out / SPEC_FILE
    spec_path.unlink(missing_ok=True)
    for entry in builder_entries(bench)[1:]:
        if (out / entry).is_dir():
            shutil.rmtree(out / entry)
        if (staging / entry).is_dir():
            os.replace(staging / entry, out / entry)
    for b in built.sets:
        b.manifest.path = str((out / b.spec.subdir / "manifest.json").resolve())
    tmp = out / f".{SPEC_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, spec_path)
    built.path = spec_path
