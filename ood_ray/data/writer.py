"""Write image sets as WebDataset ``.tar`` shards plus a ``manifest.json``.

Every sample holds ``__key__``, the image bytes (``png``; ``jpg``; or ``raw``: uint8 H×W×C bytes)
and ``cls`` (the class index, or -1 for outlier/OOD images). Bytes are deterministic for the same
input: tar headers carry a fixed mtime and owner, PNGs are written without timestamps.

With ``jpg`` a JPEG source file that already has the set's size and mode is stored byte for byte
(no second lossy step); any other image is encoded as JPEG at quality 95 (4:4:4), and the count of
those is logged (``images`` prepares and encodes each image). The file writers (folder, arrays, torchvision) write their samples in a seeded
shuffled order by default (``shuffle_seed``, recorded in the manifest), so that no shard holds one
class only; ID manifests record each shard's class histogram.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .images import ENCODINGS, IMAGE_EXTENSIONS, JPEG_QUALITY, auto_encoding, encode_sample
from .manifest import (
    DEFAULT_READ_CMD,
    FORMAT_VERSION,
    MODES,
    OOD_LABEL,
    OOD_ROLES,
    ROLES,
    DataError,
    Manifest,
    ShardInfo,
    check_read_template,
    is_remote,
    sha256_file,
)

DEFAULT_SHUFFLE_SEED = 0
log = logging.getLogger("ood_ray.data")


class Upload:
    """Send each finished shard to remote storage with a shell command, and read it back with one.

    ``dest`` is a URL prefix (``s3://bucket/prefix``, or any location the commands understand).
    ``put`` is run with ``{src}`` (the local shard) and ``{dst}`` (``dest/<file>``); the manifest's
    URL of a shard is ``pipe:`` + ``get`` with ``{url}`` = ``dest/<file>``, which WebDataset runs
    when it streams the shard. The defaults use the AWS CLI. The local copy of a shard is deleted
    once uploaded, so a data set larger than the local disk can be written.
    """

    def __init__(self, dest: str, put: str = "aws s3 cp --only-show-errors {src} {dst}", get: str = DEFAULT_READ_CMD):
        for cmd, keys in ((put, ("{src}", "{dst}")), (get, ("{url}",))):
            missing = [k for k in keys if k not in cmd]
            if missing:
                raise DataError(f"upload command {cmd!r} lacks {', '.join(missing)}")
        check_read_template(get)  # it goes into the manifest, where only plain commands may run
        for cmd, fields in ((put, {"src": "", "dst": ""}), (get, {"url": ""})):
            try:
                cmd.format(**fields)
            except (KeyError, IndexError, ValueError):
                raise DataError(f"upload command {cmd!r}: only {', '.join('{' + k + '}' for k in fields)} may stand in braces") from None
        self.dest, self.put, self.get = dest.rstrip("/"), put, get

    def send(self, local: str | Path) -> str:
        """Upload one file; returns its remote URL."""
        import shlex
        import subprocess

        dst = f"{self.dest}/{os.path.basename(local)}"
        cmd = self.put.format(src=shlex.quote(str(local)), dst=shlex.quote(dst))
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"uploading {local} to {dst} failed (exit {done.returncode}): {cmd}\n{done.stderr.strip()[-2000:]}")
        return dst

    def read_url(self, remote: str) -> str:
        import shlex

        return "pipe:" + self.get.format(url=shlex.quote(remote))


def write_shards(
    samples: Iterable[tuple[str, object, int]],
    out_dir: str | Path,
    *,
    name: str,
    role: str,
    image_size: tuple[int, int],
    mode: str = "RGB",
    class_names: Sequence[str] = (),
    group: str | None = None,
    description: str = "",
    encoding: str = "png",
    maxcount: int = 10000,
    maxsize: float = 1e9,
    total: int | None = None,
    resize: bool = False,
    progress: bool = True,
    upload: Upload | None = None,
    shuffle_seed: int | None = None,
) -> Manifest:
    """Write ``(key, image, label)`` samples to ``out_dir/{name}-NNNNNN.tar`` and ``manifest.json``.

    Nothing in ``out_dir`` changes until every sample is written: the set is written to a temporary
    folder beside it and moved in at the end, so a failed or interrupted run leaves the previous
    set as it was. Then only the shard files the previous ``manifest.json`` listed (and the new
    set does not reuse) are removed; other files are never touched.

    With ``upload``, each shard is sent to remote storage as soon as it is complete and deleted
    locally; the manifest (kept in ``out_dir`` and uploaded beside the shards) points to the
    remote copies.

    Samples are written in the order they come; ``shuffle_seed`` only records in the manifest that
    the caller shuffled them with that seed (the file writers below do). Images are PIL images,
    uint8 arrays or image file paths and must already have ``image_size`` (H, W) unless
    ``resize`` is set. Labels must lie in ``[0, len(class_names))`` for ID roles and be -1 for
    outlier/OOD roles.
    """
    if role not in ROLES:
        raise DataError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if mode not in MODES:
        raise DataError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if encoding not in ENCODINGS:
        raise DataError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    if maxcount < 1:
        raise DataError(f"maxcount must be >= 1, got {maxcount}")
    is_ood = role in OOD_ROLES
    if not is_ood and not class_names:
        raise DataError(f"role {role!r} needs class names")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise DataError(f"name={name!r}: use letters, digits, '.', '_' and '-' (it names the shard files inside --out)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, f".{name}.writing-")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.writing-{os.getpid()}-", dir=out_dir))
    try:
        manifest = _write_staged(samples, staging, name=name, role=role, image_size=image_size, mode=mode, class_names=class_names, group=group, description=description, encoding=encoding, maxcount=maxcount, maxsize=maxsize, total=total, resize=resize, progress=progress, upload=upload, shuffle_seed=shuffle_seed)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.path = str((out_dir / "manifest.json").resolve())
    if upload is not None:
        upload.send(out_dir / "manifest.json")
    return manifest


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock); a no-op where one cannot be taken."""
    try:
        import fcntl

        f = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove ``prefix<pid>-*`` staging folders whose process is gone (a killed earlier run)."""
    for p in folder.glob(prefix + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Move a finished set from ``staging`` into ``out_dir``, the manifest last; then remove the
    shard files only the previous manifest listed."""
    old: set[str] = set()
    try:
        previous = Manifest.load(out_dir)
        old = {s.url for s in previous.shards if not is_remote(s.url) and not os.path.isabs(s.url) and "/" not in s.url}
    except DataError:
        pass  # no readable previous manifest: nothing to clean up
    new = sorted(p.name for p in staging.iterdir() if p.name != "manifest.json")
    for fname in new:
        os.replace(staging / fname, out_dir / fname)
    os.replace(staging / "manifest.json", out_dir / "manifest.json")
    for fname in sorted(old - set(new)):
        (out_dir / fname).unlink(missing_ok=True)


def _write_staged(samples, out_dir: Path, *, name, role, image_size, mode, class_names, group, description, encoding, maxcount, maxsize, total, resize, progress, upload, shuffle_seed) -> Manifest:
    is_ood = role in OOD_ROLES
    hist = np.zeros(len(class_names), dtype=np.int64)  # classes of the shard being written
    hists: list[list[int]] = []
    reencoded = kept_bytes = 0
    size = (int(image_size[0]), int(image_size[1]))
    finished: list[str] = []
    counts: list[int] = []

    hashes: list[str] = []
    urls: list[str] = []

    aborted = []  # set when writing fails: the shard closed on the way out is partial

    def shard_done(fname: str) -> None:  # called by ShardWriter as each shard closes
        if aborted:  # never upload (and so overwrite a good remote copy with) a partial shard
            return
        finished.append(fname)
        counts.append(sink.total - sum(counts))
        hists.append(hist.tolist())
        hist[:] = 0
        hashes.append(sha256_file(fname))
        if upload is None:
            urls.append(os.path.basename(fname))
        else:
            urls.append(upload.read_url(upload.send(fname)))
            os.unlink(fname)

    seen: set[str] = set()
    pattern = str(out_dir / f"{name}-%06d.tar")
    bar = tqdm(total=total, desc=f"writing {name}", unit="img", disable=not progress, leave=False)
    try:
        # mtime is an int: a float (even 0.0) makes tarfile's PAX format add a pax header to every member
        with wds.ShardWriter(
            pattern, maxcount=maxcount, maxsize=maxsize, post=shard_done, verbose=0, mtime=0, user="ood_ray", group="ood_ray"
        ) as sink:
            try:
                for key, image, label in samples:
                    where = f"sample {key!r}"
                    if "." in key or "/" in key:
                        raise DataError(f"{where}: keys may not contain '.' or '/'")
                    if key in seen:
                        raise DataError(f"{where}: duplicate key")
                    seen.add(key)
                    label = int(label)
                    if is_ood and label != OOD_LABEL:
                        raise DataError(f"{where}: label {label} for role {role!r}; outlier/OOD samples carry -1")
                    if not is_ood and not 0 <= label < len(class_names):
                        raise DataError(f"{where}: label {label} outside [0, {len(class_names)}) for {name!r}")
                    data, kept = encode_sample(image, encoding, mode, size, where, resize)
                    kept_bytes += kept
                    reencoded += isinstance(image, str | Path) and not kept
                    sink.write({"__key__": key, encoding: data, "cls": str(label).encode()})
                    if not is_ood:
                        hist[label] += 1
                    bar.update(1)
            except BaseException:  # the shard closed on the way out is partial
                aborted.append(True)
                raise
    finally:
        bar.close()  # clears its line, so an error message starts on a clean one
    if not seen:
        for f in finished:
            if os.path.exists(f):
                os.unlink(f)
        raise DataError(f"no samples to write for {name!r}")
    if encoding == "jpg" and reencoded:
        log.warning("%s: %d of %d image files were re-encoded as JPEG (quality %d): their size or mode differs from %s %dx%d; %d kept as they were", name, reencoded, len(seen), JPEG_QUALITY, mode, size[0], size[1], kept_bytes)
    shards = [
        ShardInfo(url=u, count=c, sha256=h, classes=None if is_ood else k)
        for u, c, h, k in zip(urls, counts, hashes, hists, strict=True)
    ]
    manifest = Manifest(
        name=name,
        role=role,
        image_size=size,
        mode=mode,
        shards=shards,
        class_names=list(class_names),
        group=group,
        encoding=encoding,
        description=description,
        format_version=FORMAT_VERSION,
        shuffle_seed=shuffle_seed,
    )
    manifest.save(out_dir / "manifest.json")
    return manifest


def shuffled_order(n: int, seed: int | None) -> np.ndarray:
    """The order samples are written in: ``0..n-1`` permuted with ``seed`` (None: as they are)."""
    return np.arange(n) if seed is None else np.random.default_rng([int(seed), 29]).permutation(n)


def write_array_shards(images: np.ndarray, labels, out_dir: str | Path, *, key_prefix: str = "", shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED, **kw) -> Manifest:
    """Write a uint8 array N×H×W (grayscale) or N×H×W×C with one label per image.

    Keys number the images in array order; they are written in ``shuffle_seed``'s order."""
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise DataError(f"images array has shape {images.shape}; expected N×H×W or N×H×W×C")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    kw.setdefault("image_size", images.shape[1:3])
    kw.setdefault("mode", "L" if images.ndim == 3 or images.shape[3] == 1 else "RGB")
    samples = ((f"{key_prefix}{i:07d}", images[i], int(labels[i])) for i in shuffled_order(len(images), shuffle_seed))
    return write_shards(samples, out_dir, total=len(images), shuffle_seed=shuffle_seed, **kw)


def folder_samples(root: Path) -> tuple[list[str], list[tuple[str, Path, int]]]:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    items = []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for f in files:
            items.append((f"{len(items):08d}", f, ci))
    if not items:
        raise DataError(f"{root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return classes, items


def write_folder_shards(root: str | Path, out_dir: str | Path, *, role: str, image_size=None, encoding: str = "auto", shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED, **kw) -> Manifest:
    """Write an image folder with one sub-folder per class (sorted names give class indices).

    Keys number the files in folder order; they are written in ``shuffle_seed``'s order (None:
    folder order, class by class). ``encoding="auto"`` keeps JPEG files as JPEG when no resize is
    asked, else writes PNG."""
    root = Path(root)
    classes, items = folder_samples(root)
    if image_size is None:
        try:
            with Image.open(items[0][1]) as im:
                image_size = (im.size[1], im.size[0])
        except (OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{items[0][1]}: cannot read image ({e})") from None
    if encoding == "auto":
        encoding = auto_encoding([f for _, f, _ in items], bool(kw.get("resize")))
    kw.update(encoding=encoding, shuffle_seed=shuffle_seed)
    order = shuffled_order(len(items), shuffle_seed)

    def gen():
        for i in order:
            key, f, y = items[i]
            yield key, f, (OOD_LABEL if role in OOD_ROLES else y)

    if role in OOD_ROLES:
        kw.setdefault("description", f"images from {root}")
        return write_shards(gen(), out_dir, role=role, image_size=image_size, total=len(items), **kw)
    return write_shards(gen(), out_dir, role=role, image_size=image_size, class_names=classes, total=len(items), **kw)


def write_torchvision_shards(dataset: str, root: str | Path, out_dir: str | Path, *, role: str, split: str | None = None, shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED, **kw) -> Manifest:
    """Write a torchvision dataset that is already on disk (e.g. CIFAR10, SVHN); never downloads."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset, None)
    if cls is None or not isinstance(cls, type):
        raise DataError(f"unknown torchvision dataset {dataset!r} (e.g. CIFAR10, CIFAR100, SVHN, MNIST)")
    args: dict = {"root": str(root), "download": False}
    if split is not None:
        if dataset in ("SVHN", "STL10", "CelebA", "Places365"):
            args["split"] = split
        else:
            args["train"] = split == "train"
    try:
        ds = cls(**args)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot open torchvision {dataset} under {root}: {e}") from None
    class_names = [str(c) for c in getattr(ds, "classes", [])] or [str(i) for i in range(10)]
    first, _ = ds[0]
    kw.setdefault("image_size", (first.size[1], first.size[0]))
    kw.setdefault("mode", "L" if first.mode == "L" else "RGB")

    def gen():
        for i in shuffled_order(len(ds), shuffle_seed):
            img, y = ds[int(i)]
            yield f"{i:08d}", img, (OOD_LABEL if role in OOD_ROLES else int(y))

    kw["shuffle_seed"] = shuffle_seed
    if role in OOD_ROLES:
        return write_shards(gen(), out_dir, role=role, total=len(ds), **kw)
    return write_shards(gen(), out_dir, role=role, class_names=class_names, total=len(ds), **kw)
