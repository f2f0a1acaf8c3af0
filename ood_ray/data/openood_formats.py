"""Readers for the files that the OpenOOD v1.5 benchmarks are made of, in their publishers' formats.

Nothing here downloads anything; every reader takes a path on disk and raises ``DataError`` naming
the file (and the line, for text files) when it is missing or malformed. A :class:`Source` is what a
set's images are (an image list, or a publisher's files with the rule that picks the set's part),
ready to be read by ``ood_ray.data.openood``.

* CIFAR-10 / CIFAR-100 "python version" (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
  ``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``): pickled dicts whose ``data`` is
  a uint8 array N×3072 (1024 red, 1024 green, 1024 blue values, rows top to bottom) and whose
  labels are ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100); class names are ``label_names`` /
  ``fine_label_names`` in the meta file. The files were written by Python 2; they are read with
  ``encoding="latin1"`` by ``safe_pickle``, which builds only dicts, lists, strings, numbers and
  plain integer numpy arrays, within bounds on size, opcodes and depth (any other class, callable,
  object or structured dtype in the file is refused rather than built).
* MNIST idx files (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``, gzipped or not): a
  big-endian header (magic 2051 for images, 2049 for labels, then the dimensions as uint32) followed
  by uint8 data.
* SVHN cropped digits (``test_32x32.mat``, a MATLAB v5 file read with ``scipy.io.loadmat``): ``X``
  is 32×32×3×N uint8, ``y`` is N×1 in 1..10 where 10 stands for the digit 0.
* Image lists (OpenOOD's ``benchmark_imglist/<id>/<split>.txt``): one image per line,
  ``<path relative to images_classic/ or images_largescale/> <label>``, the label an int (``-1`` for
  OOD images) or a Python dict literal with a ``label`` key, as OpenOOD's ``ImglistDataset`` reads it.
* Image folders (DTD, Places365, Tiny ImageNet, NINCO, ...): every image file below a folder, in
  sorted path order.
* ImageNet (ILSVRC2012) in class folders (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, as
  torchvision's ``ImageNet`` or the usual ``valprep.sh`` arranges them): the label of an image is the
  index of its folder's wnid among the sorted training folders.
"""

from __future__ import annotations

import ast
import gzip
import math
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, MAX_ASPECT, resize_to, to_mode
from .manifest import OOD_LABEL, DataError
from .safe_pickle import UnsafePickle, load_data_pickle

IDX_IMAGES, IDX_LABELS = 2051, 2049
MAX_IDX_BYTES = 1 << 28  # 256 MiB; MNIST's train images are 47 MB
MAT_COMPRESSED = 15  # miCOMPRESSED, a zlib-compressed variable in a MATLAB v5 file
MAX_SVHN_IMAGES = 200_000
MAX_PIXELS = 64_000_000  # per image file; ImageNet's largest val image has 7 Mpx
MAX_SVHN_BYTES = MAX_SVHN_IMAGES * 32 * 32 * 3 + (1 << 20)  # 615 MB; the test file inflates to 80 MB
TIN_VAL_CLASS_STEP = 10  # native Tiny ImageNet: every 10th wnid (sorted) -> 20 ood-val classes
OPENIMAGE_O_VAL_STEP = 10  # native OpenImage-O: every 10th file (sorted) -> ood-val
IMAGENET_VAL_PER_CLASS = 5  # native ImageNet val: the first 5 files (sorted) of each class -> id-val


class Missing(DataError):
    """A file or folder of a source is not on disk; ``path`` is where it was expected."""

    def __init__(self, path: Path, hint: str):
        super().__init__(f"missing {path} ({hint})")
        self.path, self.hint = path, hint


def need(root: Path, alternatives: Sequence[str], hint: str, folder: bool = False) -> Path:
    """The first of ``alternatives`` (paths relative to ``root``) that exists; else ``Missing``
    naming the first alternative and ``hint`` (what the file is and where it comes from)."""
    for rel in alternatives:
        p = root / rel
        if (p.is_dir() if folder else p.is_file()):
            return p
    raise Missing(root / alternatives[0], hint)


# ---------------------------------------------------------------------------------------------
# CIFAR pickles

def read_pickle_dict(path: Path) -> dict:
    """A CIFAR python-version file as a dict with ``str`` keys, through ``safe_pickle`` (bounded,
    data only: any class, callable or object array in the file is refused rather than built)."""
    try:
        d = load_data_pickle(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnsafePickle as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - pickle raises many kinds on damaged input
        raise DataError(f"{path}: not a readable CIFAR python-version pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict (CIFAR python version), got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str | bytes):
            raise DataError(f"{path}: key {k!r} is a {type(k).__name__}; a CIFAR file's keys are strings")
        out[k.decode("latin1") if isinstance(k, bytes) else k] = v
    return out


def _names(value, path: Path, key: str) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise DataError(f"{path}: {key!r} must be a non-empty list of class names")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in value]


def read_cifar_meta(path: Path, key: str) -> list[str]:
    """Class names: ``label_names`` of ``batches.meta`` (CIFAR-10) or ``fine_label_names`` of ``meta`` (CIFAR-100)."""
    d = read_pickle_dict(path)
    if key not in d:
        raise DataError(f"{path}: no {key!r} (found: {', '.join(sorted(d))})")
    return _names(d[key], path, key)


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images N×32×32×3 uint8 and labels of one CIFAR python-version batch file."""
    d = read_pickle_dict(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: no {key!r} (found: {', '.join(sorted(d))})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N×3072")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must hold one integer per image ({len(data)}), got {labels.dtype} {labels.shape}")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(f"{path}: {label_key!r} outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# MNIST idx, SVHN .mat


def read_idx(path: Path, magic: int = IDX_IMAGES) -> np.ndarray:
    """An idx file (gzipped when its name ends in .gz) as a uint8 array (N×28×28 for MNIST images).

    The header's dimensions are checked before the data is read: none may be 0, and their product
    may not pass ``MAX_IDX_BYTES``; a gzipped file is inflated only that far."""
    what = "an idx3 image file, e.g. t10k-images-idx3-ubyte" if magic == IDX_IMAGES else "an idx1 label file"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: {len(head)} bytes, too short for an idx header ({what})")
            got = int.from_bytes(head, "big")
            if got != magic:
                raise DataError(f"{path}: magic number {got}, expected {magic} ({what})")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: the header is cut short ({what})")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            if 0 in dims:
                raise DataError(f"{path}: the header says {dims}: a dimension of 0 holds no images ({what})")
            n = math.prod(dims)
            if n > MAX_IDX_BYTES:
                raise DataError(f"{path}: the header says {dims} ({n:,} bytes), more than this reader takes "
                                f"({MAX_IDX_BYTES:,}; MNIST's largest file holds 47,040,000)")  # fmt: skip
            raw = f.read(n + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(raw) != n:
        more = "more" if len(raw) > n else f"{len(raw):,}"
        raise DataError(f"{path}: {more} data bytes, the header says {dims} ({n:,}); the file is truncated or damaged")
    return np.frombuffer(raw, np.uint8).reshape(dims)


def check_mat_size(path: Path, limit: int) -> None:
    """Refuse a MATLAB v5 file whose variables would take more than ``limit`` bytes once inflated,
    before ``scipy.io.loadmat`` allocates them: each compressed variable is inflated in chunks and
    counted (nothing is kept), and an uncompressed one may not claim more bytes than the file has."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
            if len(head) < 128 or head[126:128] not in (b"IM", b"MI") or not head.startswith(b"MATLAB 5.0"):
                raise DataError(f"{path}: not a MATLAB 5.0 MAT-file (SVHN's *_32x32.mat files are)")
            order = "<" if head[126:128] == b"IM" else ">"
            total = 0
            while tag := f.read(8):
                if len(tag) < 8:
                    raise DataError(f"{path}: a variable's header is cut short; the file is truncated or damaged")
                kind, nbytes = struct.unpack(order + "II", tag)
                if kind != MAT_COMPRESSED:
                    f.seek(nbytes + (-nbytes % 8), 1)
                    total += nbytes
                    if f.tell() > path.stat().st_size:
                        raise DataError(f"{path}: a variable claims {nbytes:,} bytes past the end of the file")
                else:
                    total += _inflated_size(f, nbytes, limit - total, path)
                if total > limit:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if total > limit:
        raise DataError(f"{path}: its variables take more than {limit:,} bytes once inflated; this reader takes at most "
                        f"{MAX_SVHN_IMAGES:,} 32x32 RGB images (SVHN's test set holds 26,032)")  # fmt: skip


def _inflated_size(f, nbytes: int, room: int, path: Path) -> int:
    """The inflated size of the next ``nbytes`` compressed bytes of ``f``, counted up to ``room`` + 1."""
    z, done, left = zlib.decompressobj(), 0, nbytes
    try:
        while left and done <= room:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise DataError(f"{path}: a compressed variable is cut short; the file is truncated or damaged")
            left -= len(chunk)
            while chunk and done <= room:
                done += len(z.decompress(chunk, 1 << 22))
                chunk = z.unconsumed_tail
    except zlib.error as e:
        raise DataError(f"{path}: a compressed variable is damaged (zlib: {e})") from None
    f.seek(left, 1)
    return done


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``*_32x32.mat``: images N×32×32×3 uint8 and digit labels 0..9 (the file's 10 is 0)."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{path}: reading SVHN .mat files needs scipy (pip install scipy)") from None
    check_mat_size(path, MAX_SVHN_BYTES)
    try:
        d = scipy.io.loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - loadmat raises ValueError, TypeError, OSError...
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    for key in ("X", "y"):
        if key not in d:
            raise DataError(f"{path}: no variable {key!r} (an SVHN *_32x32.mat file holds X and y)")
    x, y = np.asarray(d["X"]), np.asarray(d["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X is {x.dtype} {x.shape} with {len(y)} labels, expected uint8 32×32×3×N")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), (y.astype(np.int64) % 10)


# ---------------------------------------------------------------------------------------------
# Image lists and folders


@dataclass(frozen=True)
class ListItem:
    path: Path  # the image file
    label: int
    where: str  # "<list file>:<line>", for error messages


def read_image_list(list_path: Path, base: Path, check: bool = True) -> list[ListItem]:
    """The lines of an OpenOOD image list; image paths are relative to ``base``. With ``check``,
    every image must exist (the error names the list file, the line and the missing image)."""
    try:
        text = list_path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{list_path}: not a text file (an image list has lines '<image path> <label>')") from None
    except OSError as e:
        raise DataError(f"{list_path}: cannot read ({e.strerror or e})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        where = f"{list_path}:{n}"
        name, *extra = line.split(None, 1)
        if not extra:
            raise DataError(f"{where}: expected '<image path> <label>', got {line[:200]!r}")
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts:
            raise DataError(f"{where}: image path {name!r} must be relative to {base} and stay inside it")
        label = _label(extra[0].strip(), where)
        p = base / name
        if check and not p.is_file():
            raise DataError(f"{where}: image {p} does not exist")
        items.append(ListItem(p, label, where))
    if not items:
        raise DataError(f"{list_path}: no images listed")
    return items


def _label(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        extra = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        extra = None
    if isinstance(extra, dict) and isinstance(extra.get("label"), int) and not isinstance(extra["label"], bool):
        return int(extra["label"])
    raise DataError(f"{where}: label {text[:100]!r} is not an int nor a dict with an int 'label'")


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (any depth), sorted by path; hidden entries are skipped."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )  # fmt: skip
    if not files:
        raise DataError(f"{folder}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return files


def open_image(path: Path, where: str) -> Image.Image:
    """An image file decoded to RGB; errors name ``where`` (the list line) and the file."""
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: checked before anything is decoded
            if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
                raise DataError(f"{where}: image {path} is {h}x{w} (HxW), an aspect ratio above {MAX_ASPECT}:1; refusing to resize it")
            if w * h > MAX_PIXELS:
                raise DataError(f"{where}: image {path} is {h}x{w} (HxW), more than {MAX_PIXELS:,} pixels; refusing to decode it")
            im.load()
            return to_mode(im, "RGB")
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot read image {path} ({e})") from None


def fit_square(image, size: int, where: str = "image") -> Image.Image:
    """RGB ``size``×``size``: shorter side resized to ``size`` (bilinear), then the centre cropped,
    as OpenOOD's test preprocessing (``Resize(size)`` + ``CenterCrop(size)``); the ``fit`` rule of
    ``writer.resize_to``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return resize_to(to_mode(image, "RGB"), (size, size), "fit", where)


def iter_arrays(images: np.ndarray, labels: Sequence[int], where: str) -> Iterator[tuple[np.ndarray, int, str]]:
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        yield img, int(y), f"{where}[{i}]"


# ---------------------------------------------------------------------------------------------
# Sources: what a set's images are, ready to be read


@dataclass
class Source:
    origin: str  # where the images come from, for people (printed, stored in the manifest)
    count: int | None
    items: Callable[[], Iterator[tuple[object, int, str]]]  # (Path | array, label, where)
    list_items: list[ListItem] | None = None


def list_source(items: list[ListItem], origin: str) -> Source:
    return Source(origin, len(items), lambda: ((it.path, it.label, it.where) for it in items), items)


def tin_source(root: Path, part: str) -> Source:
    hint = "Tiny ImageNet, tiny-imagenet-200.zip extracted into --root"
    ann = need(root, ["tiny-imagenet-200/val/val_annotations.txt"], hint)
    rows = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        f = line.split("\t")
        if len(f) < 2:
            if line.strip():
                raise DataError(f"{ann}:{n}: expected '<file>\\t<wnid>\\t...', got {line[:200]!r}")
            continue
        rows.append((ann.parent / "images" / f[0], f[1], f"{ann}:{n}"))
    wnids = sorted({w for _, w, _ in rows})
    val_classes = set(wnids[::TIN_VAL_CLASS_STEP])
    rows = [r for r in rows if (r[1] in val_classes) == (part == "val")]
    for p, _, where in rows:
        if not p.is_file():
            raise DataError(f"{where}: image {p} does not exist")
    n, k = len(wnids), len(val_classes)
    what = f"{k} of {n} classes" if part == "val" else f"the other {n - k} of {n} classes"
    return Source(f"tiny-imagenet-200/val ({what})", len(rows), lambda: ((p, OOD_LABEL, w) for p, _, w in rows))


def mnist_source(root: Path) -> Source:
    hint = "MNIST's idx files train-images-idx3-ubyte and t10k-images-idx3-ubyte, gzipped or not, in --root/mnist"
    paths = []
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        paths.append(need(root, [f"mnist/{stem}.gz", f"mnist/{stem}", f"MNIST/raw/{stem}.gz", f"MNIST/raw/{stem}"], hint))

    def load():
        for p in paths:
            images = read_idx(p)
            yield from iter_arrays(images, np.full(len(images), OOD_LABEL), str(p))

    return Source(f"{paths[0].parent.name}/{{train,t10k}}-images-idx3-ubyte", None, load)


def svhn_source(root: Path) -> Source:
    p = need(root, ["svhn/test_32x32.mat", "test_32x32.mat"], "SVHN's cropped-digit test set test_32x32.mat in --root/svhn")

    def load():
        images, _ = read_svhn_mat(p)
        yield from iter_arrays(images, np.full(len(images), OOD_LABEL), str(p))

    return Source(str(p.relative_to(root)), None, load)


FOLDERS = {  # native image folders: alternatives under --root, hint
    "dtd": (["dtd/images"], "the DTD images, dtd-r1.0.1.tar.gz extracted into --root"),
    "places365": (["places365/val_256", "val_256"], "the Places365 validation images, val_256.tar extracted into --root/places365"),
    "ssb_hard": (["ssb_hard"], "the SSB-hard images in --root/ssb_hard"),
    "ninco": (["NINCO/NINCO_OOD_classes", "ninco"], "NINCO, NINCO_all.tar.gz extracted into --root"),
    "inaturalist": (["iNaturalist/images", "inaturalist"], "the iNaturalist OOD subset, iNaturalist.tar.gz extracted into --root"),
    "openimage_o": (["openimage_o"], "the OpenImage-O images in --root/openimage_o"),
}


def folder_source(root: Path, name: str, part: str | None = None) -> Source:
    alternatives, hint = FOLDERS[name]
    folder = need(root, alternatives, hint, folder=True)
    files = image_files(folder)
    if part is not None:  # OpenImage-O: every OPENIMAGE_O_VAL_STEP-th file is ood-val
        files = [f for i, f in enumerate(files) if (i % OPENIMAGE_O_VAL_STEP == 0) == (part == "val")]
    what = "" if part is None else f" ({'every' if part == 'val' else 'all but every'} {OPENIMAGE_O_VAL_STEP}th image)"
    rel = folder.relative_to(root)
    return Source(f"{rel}{what}", len(files), lambda: ((f, OOD_LABEL, f"{rel}/{f.relative_to(folder)}") for f in files))


IMAGENET_DIRS = ["imagenet", "ILSVRC/Data/CLS-LOC"]  # under --root, each holding train/<wnid>/ and val/<wnid>/
IMAGENET_HINT = ("ImageNet (ILSVRC2012) in class folders, train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, "
                 "in --root/imagenet/ or --root/ILSVRC/Data/CLS-LOC/")  # fmt: skip


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagenet_source(root: Path, part: str, cache: dict) -> Source:
    """ImageNet from its class folders: ``train`` is every training image; ``val`` / ``test`` split
    the validation images, the first ``IMAGENET_VAL_PER_CLASS`` of each class (sorted) / the others."""
    train = need(root, [f"{d}/train" for d in IMAGENET_DIRS], IMAGENET_HINT, folder=True)
    if ("imagenet-wnids", train) not in cache:
        cache[("imagenet-wnids", train)] = [p.name for p in _class_folders(train)]
    wnids = cache[("imagenet-wnids", train)]
    if not wnids:
        raise DataError(f"{train}: no class folders; expected one folder per class (<wnid>/*.JPEG)")
    folder = train if part == "train" else need(train.parent, ["val"], IMAGENET_HINT, folder=True)
    if part != "train" and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
        raise DataError(f"{folder}: images lie directly in the folder; this reader needs one sub-folder per class "
                        "(val/<wnid>/ILSVRC2012_val_*.JPEG, as the widely used valprep.sh arranges them), or OpenOOD's "
                        "lists val_imagenet.txt + test_imagenet.txt")  # fmt: skip
    index = {w: i for i, w in enumerate(wnids)}
    rel, k, items = folder.relative_to(root), IMAGENET_VAL_PER_CLASS, []
    for d in _class_folders(folder):
        if d.name not in index:
            raise DataError(f"{d}: class folder {d.name!r} is not one of the {len(wnids)} training classes in {train}")
        files = image_files(d)
        files = files if part == "train" else files[:k] if part == "val" else files[k:]
        items += [ListItem(f, index[d.name], f"{rel}/{d.name}/{f.relative_to(d)}") for f in files]
    if not items and part == "test":
        raise DataError(f"{folder}: no images left for the test set once the first {k} per class go to val; is it the full validation set?")
    if not items:
        raise DataError(f"{folder}: no class folders; expected one folder per class (<wnid>/*.JPEG)")
    what = {"train": "all images", "val": f"first {k} per class", "test": f"all but the first {k} per class"}[part]
    return list_source(items, f"{rel}/<wnid>/ ({what})")
