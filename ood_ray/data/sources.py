"""Image sources of the embedded benchmark: pixel helpers and generators ``(n, rng) -> uint8 n×8×8``.

Every generator maps its source (scikit-learn's digits, scikit-image's photos and LFW faces,
rendered letters, noise) onto the digits' 0..16 level scale (``levels_to_uint8``). Pixel arithmetic
that feeds a rounding step is done in integers or element-wise, so every machine builds the same
bytes. ``default.py`` assigns sources to sets and writes the shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image

from .manifest import DataError

IMAGE_SIZE = 8
BITMAP_SIZE = 32  # the UCI digits' bitmaps; 4×4 blocks are counted into levels 0..16
MAX_LEVEL = 16
CROP_SIZES = (16, 64)  # photo crop side range in pixels (inclusive)
FACE_CROP_SIZES = (16, 25)  # LFW images are 25×25
BLOB_P, BLOB_SIGMA, BLOB_THRESHOLD = 0.7, 2.5, 0.72
LETTER_HEIGHTS = (24, 32)  # glyph height in the 32×32 bitmap before rotation (inclusive)
MIN_CROP_RANGE = 24  # reject (up to a few times) crops whose 8×8 means span fewer gray values
CROP_TRIES = 20


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
