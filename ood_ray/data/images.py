"""Image preparation for shards: mode conversion (16-bit scaled, not clipped), resizing rules,
encoding (PNG, JPEG, raw) and when a JPEG file's own bytes can be stored. Plain PIL/NumPy."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import DataError

ENCODINGS = ("png", "raw", "jpg")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
JPEG_QUALITY = 95
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` in ``mode`` (L or RGB); 16- and 32-bit integer images are scaled to 8 bits first
    (PIL's own conversion clips them at 255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        top = 65535 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        im = Image.fromarray((np.clip(a, 0, top) * 255 // max(top, 1)).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "P") and mode == "RGB":
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent pixels become black
        im = Image.alpha_composite(bg, im)
    return im if im.mode == mode else im.convert(mode)


MAX_ASPECT = 50  # an image longer than this many times its width (or the reverse) is refused, not resized


def resize_to(im: Image.Image, size: tuple[int, int], rule: str, where: str = "image") -> Image.Image:
    """``im`` at ``size`` (H, W) by ``rule``: ``fit`` (shorter side scaled, centre crop, as
    OpenOOD's test preprocessing), ``stretch``, or ``none`` (the size must already match)."""
    h, w = size
    if im.size == (w, h):
        return im
    if rule == "none":
        raise DataError(f"{where}: image is {im.size[1]}x{im.size[0]} (HxW), the spec says {h}x{w} and resize: none")
    iw, ih = im.size
    if max(iw, ih) > MAX_ASPECT * min(iw, ih):
        raise DataError(f"{where}: image is {ih}x{iw}, an aspect ratio above {MAX_ASPECT}:1; refusing to resize it")
    if rule == "stretch":
        return im.resize((w, h), Image.BILINEAR)
    scale = max(w / iw, h / ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))


def stored_as_is(im: Image.Image, mode: str, size: tuple[int, int]) -> bool:
    """Whether an opened image file can be stored byte for byte as ``jpg``: a JPEG that already
    has the set's ``mode`` and ``size`` (H, W); read from the header, nothing is decoded."""
    return im.format == "JPEG" and im.mode == mode and im.size == (size[1], size[0])


def to_pil(image, mode: str, size: tuple[int, int], where: str, resize: bool = False) -> Image.Image:
    """Turn a PIL image or a uint8 array (H×W or H×W×C) into a PIL image of the given mode/size."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"{where}: array dtype is {image.dtype}, expected uint8 (scale images to 0..255)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3):
            raise DataError(f"{where}: array shape {image.shape} is not H×W or H×W×C")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise DataError(f"{where}: expected a PIL image or uint8 array, got {type(image).__name__}")
    if image.mode != mode:
        image = to_mode(image, mode)
    h, w = size
    if image.size != (w, h):
        if not resize:
            raise DataError(
                f"{where}: image is {image.size[1]}x{image.size[0]} (HxW), expected {h}x{w}; "
                "pass a resize size to convert"
            )
        image = resize_to(image, (h, w), "stretch", where)
    return image


def encode_image(image: Image.Image, encoding: str) -> bytes:
    if encoding == "png":
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=6)
        return buf.getvalue()
    if encoding == "jpg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return buf.getvalue()
    if encoding == "raw":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()
    raise DataError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def auto_encoding(files: Sequence[Path], resize: bool) -> str:
    """``jpg`` for JPEG files that need no resizing (their bytes are kept), else ``png``."""
    if not resize and files and all(Path(f).suffix.lower() in JPEG_EXTENSIONS for f in files):
        return "jpg"
    return "png"


def read_image_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror or e})") from None


def encode_sample(image, encoding: str, mode: str, size: tuple[int, int], where: str, resize: bool) -> tuple[bytes, bool]:
    """The stored bytes of one image, and whether they are the source file's own bytes.

    ``image`` is a PIL image, a uint8 array, or the path of an image file."""
    if isinstance(image, str | Path):
        path = Path(image)
        data = read_image_file(path)
        try:
            im = Image.open(io.BytesIO(data))
            if encoding == "jpg" and stored_as_is(im, mode, size):
                return data, True
            im.load()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        image, where = im, str(path)
    return encode_image(to_pil(image, mode, size, where, resize=resize), encoding), False
