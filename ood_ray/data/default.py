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
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import OOD_LABEL, DataError
from .writer import write_array_shards

DEFAULT_NAME = "digits-ood"
DEFAULT_VERSION = 2  # 2: tar members without pax headers (int mtime)
ENV_DATA_DIR = "OOD_RAY_DATA_DIR"
SPEC_FILE = "benchmark.json"

IMAGE_SIZE = 8
BITMAP_SIZE = 32  # the UCI digits' bitmaps; 4×4 blocks are counted into levels 0..16
MAX_LEVEL = 16
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

CROP_SIZES = (16, 64)  # photo crop side range in pixels (inclusive)
FACE_CROP_SIZES = (16, 25)  # LFW images are 25×25
BLOB_P, BLOB_SIGMA, BLOB_THRESHOLD = 0.7, 2.5, 0.72
LETTER_HEIGHTS = (24, 32)  # glyph height in the 32×32 bitmap before rotation (inclusive)
MIN_CROP_RANGE = 24  # reject (up to a few times) crops whose 8×8 means span fewer gray values
CROP_TRIES = 20


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
# Pixel helpers (pure)


def levels_to_uint8(levels: np.ndarray) -> np.ndarray:
    """Digits levels 0..16 -> stored uint8 pixels, ``min(level * 16, 255)``."""
    levels = np.asarray(levels)
    return np.minimum(levels.astype(np.int64) * 16, 255).astype(np.uint8)


def block_count(bitmaps: np.ndarray) -> np.ndarray:
    """N×32×32 binary bitmaps -> N×8×8 levels 0..16 (ink pixels per 4×4 block)."""
    b = np.asarray(bitmaps, dtype=bool)
    n, h, w = b.shape
    k = h // IMAGE_SIZE
    return b.reshape(n, IMAGE_SIZE, k, IMAGE_SIZE, w // IMAGE_SIZE).sum(axis=(2, 4), dtype=np.int64)


@cache
def _area_weights(size: int, out: int = IMAGE_SIZE) -> np.ndarray:
    """Integer area weights (out×size): overlap of input pixel p with output cell i, in 1/out px."""
    p = np.arange(size)[None, :] * out
    i = np.arange(out)[:, None] * size
    w = np.minimum(p + out, i + size) - np.maximum(p, i)
    return np.clip(w, 0, None).astype(np.int64)


def area_downsample(window: np.ndarray, out: int = IMAGE_SIZE) -> np.ndarray:
    """Exact area averaging of a square integer window to out×out, returned as sums × size².

    The true mean of each output cell is ``result / size**2``; keeping integers makes the result
    identical on every machine.
    """
    window = np.asarray(window, dtype=np.int64)
    w = _area_weights(window.shape[0], out)
    return np.einsum("ip,pq,jq->ij", w, window, w, optimize=False)


def to_levels(sums: np.ndarray) -> np.ndarray:
    """Rescale an integer image so its min maps to 0 and its max to 16 (rounded half up)."""
    lo, hi = int(sums.min()), int(sums.max())
    if hi == lo:
        return np.zeros(sums.shape, dtype=np.int64)
    span = hi - lo
    return (2 * MAX_LEVEL * (sums - lo) + span) // (2 * span)


def gray_u8(image: np.ndarray) -> np.ndarray:
    """Any skimage.data image (bool, uint8 gray/RGB/RGBA, float 0..1) -> uint8 grayscale."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 3:
        rgb = a[..., :3].astype(np.int64)  # ITU-R 601-2 luma, as PIL's convert("L")
        a = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    return np.asarray(a, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Sources


def load_photos(names: Sequence[str]) -> list[np.ndarray]:
    import skimage.data

    return [gray_u8(getattr(skimage.data, n)()) for n in names]


def load_faces(indices: Sequence[int]) -> list[np.ndarray]:
    import skimage.data

    faces = skimage.data.lfw_subset()
    return [gray_u8(faces[i]) for i in indices]


def digits_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn digits as uint8 N×8×8, stratified train/val/test = 60/20/20 with random_state=seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = levels_to_uint8(np.rint(d.images))
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=seed)
    return {role: (images[ix], y[ix]) for role, ix in (("train", train), ("val", val), ("test", test))}


# ---------------------------------------------------------------------------------------------
# Generators: (n, rng) -> uint8 n×8×8


def random_crops(
    sources: Sequence[np.ndarray], n: int, rng: np.random.Generator, sizes: tuple[int, int] = CROP_SIZES
) -> np.ndarray:
    """Random square crops, cycling through the sources, area-averaged to 8×8 and rescaled to levels.

    The side is drawn from ``sizes`` (inclusive, capped at the source's size); crops whose 8×8
    means span fewer than :data:`MIN_CROP_RANGE` gray values are redrawn a few times, so flat sky
    or empty background does not turn into amplified compression noise.
    """
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for k in range(n):
        img = sources[k % len(sources)]
        h, w = img.shape
        hi = min(sizes[1], h, w)
        lo = min(sizes[0], hi)
        for _ in range(CROP_TRIES):
            s = int(rng.integers(lo, hi + 1))
            y = int(rng.integers(0, h - s + 1))
            x = int(rng.integers(0, w - s + 1))
            sums = area_downsample(img[y : y + s, x : x + s])
            if (int(sums.max()) - int(sums.min())) >= MIN_CROP_RANGE * s * s:
                break
        out[k] = levels_to_uint8(to_levels(sums))
    return out


def gaussian_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel N(0.5, 1) clipped to [0, 1] (as in Outlier Exposure), on the level scale."""
    x = np.clip(0.5 + rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE)), 0.0, 1.0)
    return levels_to_uint8(np.rint(x * MAX_LEVEL))


def uniform_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel uniform levels 0..16."""
    return levels_to_uint8(rng.integers(0, MAX_LEVEL + 1, size=(n, IMAGE_SIZE, IMAGE_SIZE)))


def binary_blobs(
    n: int, rng: np.random.Generator, p: float = BLOB_P, sigma: float = BLOB_SIGMA, threshold: float = BLOB_THRESHOLD
) -> np.ndarray:
    """Bernoulli(p) 32×32 noise, Gaussian-blurred, thresholded into a bitmap, block-counted.

    The Outlier Exposure recipe (p 0.7, blur, threshold ~0.75), with the blur widened so blobs
    span a few of the 8×8 output pixels instead of washing out into noise.
    """
    from scipy.ndimage import gaussian_filter

    noise = (rng.random((n, BITMAP_SIZE, BITMAP_SIZE)) < p).astype(np.float64)
    blurred = gaussian_filter(noise, sigma=(0, sigma, sigma), mode="reflect")
    return levels_to_uint8(block_count(blurred >= threshold))


RENDER_SIZE = 64  # font size the glyphs are rendered at before scaling into the 32×32 bitmap


def render_glyph(letter: str, font) -> Image.Image:
    """``letter`` drawn white on black with ``font`` and cropped to its ink ("L" image).

    Small glyphs (Pillow's fixed-size bitmap font, used when FreeType is missing) are scaled up
    (nearest) to three quarters of :data:`RENDER_SIZE`.
    """
    from PIL import ImageDraw

    canvas = Image.new("L", (3 * RENDER_SIZE, 3 * RENDER_SIZE), 0)
    ImageDraw.Draw(canvas).text((RENDER_SIZE // 2, RENDER_SIZE // 2), letter, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        raise DataError(f"the default font has no glyph for {letter!r}")
    glyph = canvas.crop(box)
    if glyph.height < RENDER_SIZE // 2:
        scale = (RENDER_SIZE * 3 // 4) / glyph.height
        glyph = glyph.resize((round(glyph.width * scale), round(glyph.height * scale)), Image.NEAREST)
    return glyph


@cache
def _glyph(letter: str) -> Image.Image:
    """``letter`` rendered with Pillow's default font: scalable Aileron (Pillow >= 10.1 with
    FreeType) at :data:`RENDER_SIZE`, else the fixed-size bitmap font."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=RENDER_SIZE)
    except TypeError:  # Pillow < 10.1 takes no size
        font = ImageFont.load_default()
    return render_glyph(letter, font)


def letter_bitmap(letter: str, rng: np.random.Generator) -> np.ndarray:
    """One jittered 32×32 binary bitmap of ``letter`` (stroke, size, rotation, position)."""
    from PIL import ImageFilter, ImageOps

    g = _glyph(letter)
    stroke = int(rng.integers(1, 5))  # dilation radius at render size: thin to bold pen
    pad = stroke + 1
    g = ImageOps.expand(g, border=pad, fill=0).filter(ImageFilter.MaxFilter(2 * stroke + 1))
    g = g.crop(g.getbbox())
    height = int(rng.integers(LETTER_HEIGHTS[0], LETTER_HEIGHTS[1] + 1))
    width = max(1, min(BITMAP_SIZE, round(g.width * height / g.height)))
    g = g.resize((width, height), Image.BILINEAR)
    g = g.rotate(float(rng.uniform(-15.0, 15.0)), resample=Image.BILINEAR, expand=True, fillcolor=0)
    g = g.point(lambda v: 255 if v >= 128 else 0)
    box = g.getbbox()
    if box is not None:
        g = g.crop(box)
    if g.width > BITMAP_SIZE or g.height > BITMAP_SIZE:
        scale = BITMAP_SIZE / max(g.width, g.height)
        g = g.resize((max(1, int(g.width * scale)), max(1, int(g.height * scale))), Image.NEAREST)
    x = int(rng.integers(0, BITMAP_SIZE - g.width + 1))
    y = int(rng.integers(0, BITMAP_SIZE - g.height + 1))
    bitmap = Image.new("L", (BITMAP_SIZE, BITMAP_SIZE), 0)
    bitmap.paste(g, (x, y))
    return np.asarray(bitmap) >= 128


def letters(n: int, rng: np.random.Generator, alphabet: str) -> np.ndarray:
    """Capital letters drawn as 32×32 bitmaps and block-counted like the digits (cycling)."""
    bitmaps = np.stack([letter_bitmap(alphabet[k % len(alphabet)], rng) for k in range(n)])
    return levels_to_uint8(block_count(bitmaps))


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


@contextmanager
def _file_lock(path: Path):
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
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not spec.exists():
            _build_into(target, seed)
    _check_spec(spec, seed)
    return spec


def _build_into(target: Path, seed: int) -> None:
    if target.is_dir() and any(target.iterdir()):
        build_default(target, seed)
        return
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
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
