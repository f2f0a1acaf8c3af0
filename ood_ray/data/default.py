"""The embedded default benchmark ``digits-ood``: built offline from what installed packages ship.

Every image is 8×8 grayscale uint8 in the style of scikit-learn's digits: the UCI digits are 32×32
binary bitmaps whose 4×4 blocks were counted into levels 0..16; we store ``min(level * 16, 255)``
and map every other set onto the same 0..16 level scale first, so intensity statistics compare.

Sets (sub-folder of the output directory, role, group):

* ``id-train`` / ``id-val`` / ``id-test`` (train / val / test): ``sklearn.datasets.load_digits()``,
  stratified 60/20/20 split with ``random_state=seed``; class names ``"0"``..``"9"``.
* ``outlier`` (outlier; training-only auxiliary data for Outlier Exposure): random square crops
  (16..64 px) of the photos in :data:`AUX_PHOTOS`, area-averaged to 8×8, rescaled to levels 0..16.
* ``ood-{val,test}-photos`` (far): the same crops from :data:`OOD_VAL_PHOTOS` /
  :data:`OOD_TEST_PHOTOS`.
* ``ood-{val,test}-faces`` (far): crops (16..25 px, up to the whole image) of the LFW faces in
  ``skimage.data.lfw_subset()``: :data:`OOD_VAL_FACES` / :data:`OOD_TEST_FACES`.
* ``ood-{val,test}-gaussian`` / ``-uniform`` (far): i.i.d. pixel noise on the level scale.
* ``ood-{val,test}-blobs`` (far): thresholded Gaussian-blurred Bernoulli noise (as in the Outlier
  Exposure paper) drawn as a 32×32 bitmap and block-counted like the digits.
* ``ood-{val,test}-letters`` (near): Latin capitals rendered with Pillow's default font as 32×32
  bitmaps with size/position/rotation/stroke jitter, block-counted like the digits;
  :data:`OOD_VAL_LETTERS` / :data:`OOD_TEST_LETTERS` (letters easily confused with digits,
  :data:`EXCLUDED_LETTERS`, are left out).

No source image or glyph is shared between the outlier, ood-val and ood-test roles
(:data:`SOURCE_ASSIGNMENT`); noise sets use separate random streams per set. Shards and manifests
are byte-identical for the same seed and the same package versions, so every node of a cluster can
rebuild the same data. All pixel arithmetic that feeds a rounding step is done in integers or
element-wise, never through BLAS reductions whose last bits could differ between machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import OOD_LABEL, DataError
from .sources import (
    BLOB_P,
    BLOB_SIGMA,
    BLOB_THRESHOLD,
    CROP_SIZES,
    FACE_CROP_SIZES,
    binary_blobs,
    digits_splits,
    gaussian_noise,
    letters,
    load_faces,
    load_photos,
    random_crops,
    uniform_noise,
)
from .writer import file_lock, remove_stale, write_array_shards

DEFAULT_NAME = "digits-ood"
DEFAULT_VERSION = 2  # 2: tar members without pax headers (int mtime)
ENV_DATA_DIR = "OOD_RAY_DATA_DIR"
SPEC_FILE = "benchmark.json"

CLASS_NAMES = [str(i) for i in range(10)]

# skimage.data photos, by role. Every name is a distinct bundled file.
AUX_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "page", "horse",
    "grass", "brick", "cell", "colorwheel", "logo", "retina",
)  # fmt: skip
OOD_VAL_PHOTOS = ("camera", "text", "gravel", "microaneurysms")
OOD_TEST_PHOTOS = ("moon", "coins", "clock", "hubble_deep_field")
# skimage.data.lfw_subset(): images 0..99 are faces, 100..199 non-faces (not used anywhere).
OOD_VAL_FACES = tuple(range(0, 50))
OOD_TEST_FACES = tuple(range(50, 100))
# Capital letters; those easily read as a digit are excluded:
# B~8, D~0, G~6, I~1, L~1/4/7, O~0, Q~0, S~5, T~7, Z~2.
EXCLUDED_LETTERS = "BDGILOQSTZ"
OOD_VAL_LETTERS = "ACEFHJK"
OOD_TEST_LETTERS = "MNPRUVWXY"

N_OUTLIER = 2000
N_OOD = 300  # per OOD set
MAXCOUNT = 128  # samples per shard: id-train (1077) gets 9 shards, outlier 16, others 3



def _sources(photos: Sequence[str], faces: Sequence[int], letters: str, noise: Sequence[str]) -> frozenset[str]:
    return frozenset(
        [f"skimage.data.{p}" for p in photos]
        + [f"skimage.data.lfw_subset[{i}]" for i in faces]
        + [f"letter:{c}" for c in letters]
        + [f"rng-stream:{s}" for s in noise]
    )


_NOISE = ("gaussian", "uniform", "blobs")
# role -> source identifiers (photos, LFW images, glyphs, random streams); pairwise disjoint.
SOURCE_ASSIGNMENT: dict[str, frozenset[str]] = {
    "outlier": _sources(AUX_PHOTOS, (), "", ["outlier"]),
    "ood-val": _sources(OOD_VAL_PHOTOS, OOD_VAL_FACES, OOD_VAL_LETTERS, [f"ood-val-{s}" for s in _NOISE]),
    "ood-test": _sources(OOD_TEST_PHOTOS, OOD_TEST_FACES, OOD_TEST_LETTERS, [f"ood-test-{s}" for s in _NOISE]),
}


# ---------------------------------------------------------------------------------------------
# The set table and the builder


@dataclass(frozen=True)
class OODSet:
    subdir: str
    role: str  # outlier, ood-val, ood-test
    key: str  # name in benchmark.json's ood_val / ood_test
    group: str | None
    make: Callable[[np.random.Generator], np.ndarray]
    description: str


def _photo_desc(names: Sequence[str]) -> str:
    return (
        f"random square crops ({CROP_SIZES[0]}..{CROP_SIZES[1]} px) of skimage.data photos "
        f"{', '.join(names)}, grayscale, area-averaged to 8x8, rescaled to levels 0..16, x16"
    )


def _role_note(role: str) -> str:
    others = [r for r in SOURCE_ASSIGNMENT if r != role]
    return (
        f" Source assignment (no source shared between roles): outlier photos {', '.join(AUX_PHOTOS)}; "
        f"ood-val photos {', '.join(OOD_VAL_PHOTOS)}, LFW faces {OOD_VAL_FACES[0]}..{OOD_VAL_FACES[-1]}, "
        f"letters {OOD_VAL_LETTERS}; ood-test photos {', '.join(OOD_TEST_PHOTOS)}, LFW faces "
        f"{OOD_TEST_FACES[0]}..{OOD_TEST_FACES[-1]}, letters {OOD_TEST_LETTERS}; this set ({role}) "
        f"shares none with {' or '.join(others)}."
    )


def ood_sets() -> list[OODSet]:
    sets = [
        OODSet(
            "outlier", "outlier", "outlier", None,
            lambda rng: random_crops(load_photos(AUX_PHOTOS), N_OUTLIER, rng),
            "Auxiliary outliers for Outlier Exposure (training only): " + _photo_desc(AUX_PHOTOS) + ".",
        ),
    ]  # fmt: skip
    for role, photos, faces, alphabet in (
        ("ood-val", OOD_VAL_PHOTOS, OOD_VAL_FACES, OOD_VAL_LETTERS),
        ("ood-test", OOD_TEST_PHOTOS, OOD_TEST_FACES, OOD_TEST_LETTERS),
    ):
        use = "tuning only" if role == "ood-val" else "reporting only"
        specs = [
            ("photos", "far", lambda rng, p=photos: random_crops(load_photos(p), N_OOD, rng), _photo_desc(photos)),
            (
                "faces", "far",
                lambda rng, f=faces: random_crops(load_faces(f), N_OOD, rng, sizes=FACE_CROP_SIZES),
                f"LFW faces skimage.data.lfw_subset()[{faces[0]}..{faces[-1]}], whole or cropped "
                f"({FACE_CROP_SIZES[0]}..{FACE_CROP_SIZES[1]} px), area-averaged to 8x8, levels 0..16, x16",
            ),
            ("gaussian", "far", lambda rng: gaussian_noise(N_OOD, rng),
             "per-pixel Gaussian noise N(0.5, 1) clipped to [0, 1], x16 levels, x16"),
            ("uniform", "far", lambda rng: uniform_noise(N_OOD, rng), "per-pixel uniform levels 0..16, x16"),
            ("blobs", "far", lambda rng: binary_blobs(N_OOD, rng),
             f"binary blobs: Bernoulli({BLOB_P}) 32x32 noise, Gaussian blur sigma {BLOB_SIGMA}, "
             f"threshold {BLOB_THRESHOLD}, "
             "4x4 block counts as levels 0..16, x16"),
            (
                "letters", "near", lambda rng, a=alphabet: letters(N_OOD, rng, a),
                f"capital letters {alphabet} (Pillow default font) drawn as 32x32 bitmaps with "
                "size/position/rotation/stroke jitter, 4x4 block counts as levels 0..16, x16 "
                f"(letters confusable with digits, {EXCLUDED_LETTERS}, are never used)",
            ),
        ]  # fmt: skip
        for key, group, make, desc in specs:
            sets.append(
                OODSet(f"{role}-{key}", role, key, group, make, f"{role} ({use}), {group} OOD: {desc}.")
            )
    return sets


ID_SUBDIRS = {"train": "id-train", "val": "id-val", "test": "id-test"}


def builder_entries() -> list[str]:
    """Names this builder owns inside an output directory (and removes when rebuilding)."""
    return [SPEC_FILE, *ID_SUBDIRS.values(), *(s.subdir for s in ood_sets())]


def set_rng(seed: int, name: str) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, set name)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def build_default(out_dir: str | Path, seed: int = 0, progress: bool = False) -> Path:
    """Build ``digits-ood`` into ``out_dir``; returns the path of its ``benchmark.json``.

    Only this builder's own sub-folders and ``benchmark.json`` are replaced; other files are left
    alone. ``benchmark.json`` is removed first and written last (atomically), so a half-built
    directory is never taken for a complete one.
    """
    seed = _check_seed(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    spec_path.unlink(missing_ok=True)
    for name in builder_entries()[1:]:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    common = {"maxcount": MAXCOUNT, "progress": progress}
    spec: dict = {"name": DEFAULT_NAME, "version": DEFAULT_VERSION, "seed": seed}
    for role, (images, labels) in digits_splits(seed).items():
        sub = ID_SUBDIRS[role]
        write_array_shards(
            images, labels, out / sub, name=sub, role=role, class_names=CLASS_NAMES, key_prefix=f"{sub}-",
            description=f"sklearn digits (load_digits), {role} part of a stratified 60/20/20 split "
            f"(train_test_split, random_state={seed}); levels 0..16 stored as min(level*16, 255).",
            **common,
        )  # fmt: skip
        spec[role] = f"{sub}/manifest.json"
    spec["outlier"] = None
    spec["ood_val"], spec["ood_test"] = {}, {}
    for s in ood_sets():
        images = s.make(set_rng(seed, s.subdir))
        write_array_shards(
            images, np.full(len(images), OOD_LABEL), out / s.subdir, name=s.subdir, role=s.role,
            group=s.group, key_prefix=f"{s.subdir}-", description=s.description + _role_note(s.role),
            **common,
        )  # fmt: skip
        rel = f"{s.subdir}/manifest.json"
        if s.role == "outlier":
            spec["outlier"] = rel
        else:
            spec["ood_val" if s.role == "ood-val" else "ood_test"][s.key] = rel
    tmp = out / f".{SPEC_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, spec_path)
    return spec_path


# ---------------------------------------------------------------------------------------------
# Cache location and build-once


def default_data_dir(seed: int = 0) -> Path:
    """``$OOD_RAY_DATA_DIR`` if set (absolute), else ``${XDG_CACHE_HOME:-~/.cache}/ood_ray/digits-ood-v1-seed{seed}``."""
    seed = _check_seed(seed)
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        if not os.path.isabs(env):
            raise ValueError(f"{ENV_DATA_DIR} must be an absolute path, got {env!r}")
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return (base / "ood_ray" / f"{DEFAULT_NAME}-v{DEFAULT_VERSION}-seed{seed}").absolute()


def _check_spec(path: Path, seed: int) -> None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the benchmark spec ({e}); remove the directory to rebuild") from None
    got = (d.get("name"), d.get("version"), d.get("seed"))
    want = (DEFAULT_NAME, DEFAULT_VERSION, seed)
    if got != want:
        raise DataError(
            f"{path} holds name/version/seed {got}, but {want} was asked for; point {ENV_DATA_DIR} "
            "(or data_dir) at another directory, or remove this one to rebuild"
        )


def build_default_locked(out_dir: str | Path, seed: int = 0, progress: bool = False) -> Path:
    """``build_default`` holding the same lock as ``ensure_default`` (``ood-ray data build-default``),
    so two builds into one folder never interleave."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        return build_default(out, seed=seed, progress=progress)


def ensure_default(seed: int = 0, data_dir: str | Path | None = None) -> Path:
    """Return the ``benchmark.json`` of ``digits-ood`` for ``seed``, building it first if missing.

    Concurrent callers on one node are serialized by a lock file next to the data directory; the
    set is built in a temporary sibling directory and renamed into place, so a crash never leaves
    a directory that looks complete. If another process wins the rename, its copy is used. When
    the directory already exists with other files in it, the set is built in place (only this
    builder's own entries are touched, ``benchmark.json`` last).
    """
    seed = _check_seed(seed)
    target = Path(data_dir).absolute() if data_dir is not None else default_data_dir(seed)
    spec = target / SPEC_FILE
    if spec.exists():
        _check_spec(spec, seed)
        return spec
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if not spec.exists():
            _build_into(target, seed)
    _check_spec(spec, seed)
    return spec


def _build_into(target: Path, seed: int) -> None:
    if target.is_dir() and any(target.iterdir()):
        build_default(target, seed)
        return
    remove_stale(target.parent, f".{target.name}.tmp-")  # left by a build that was killed
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError:  # parent not writable: build in place
        build_default(target, seed)
        return
    try:
        build_default(tmp, seed)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, target)  # atomic; replaces an empty directory
        except OSError:
            if not (target / SPEC_FILE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
