"""Image input for a trained detector: files, PIL images, encoded bytes or arrays -> uint8 N×C×H×W.

Every image is checked against the model's mode and size and never resized (the detector's scores
depend on it); errors name the file (or the input's type) and the sizes expected and got. Images
are converted to the model's mode as the data writers convert them (``ood_ray.data.images.to_mode``:
16- and 32-bit images are scaled to 8 bits, not clipped at 255).

Strings in a batch are file paths or base64 by default (the Python API); with ``paths=False`` (the
pyfunc model, which ``mlflow models serve`` feeds with what HTTP clients send) they are base64 only
and no file is ever opened or looked up.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..checkpoint import MODE_CHANNELS
from ..data.images import to_mode


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a base64 string longer than a file name may be
        return False


def _decode_string(s: str) -> bytes | None:
    """Bytes of a base64 string (or ``data:...;base64,`` URI); None when it is not base64."""
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True) or None
    except (binascii.Error, ValueError):
        return None


class ImageInput:
    """The images a model of ``mode`` ("L" or "RGB") and ``image_size`` (H, W) accepts."""

    def __init__(self, mode: str, image_size):
        self.mode: str = mode
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.channels = MODE_CHANNELS[mode]

    def _size_error(self, got_hw, got_c=None) -> ValueError:
        h, w = self.image_size
        got = f"{got_hw[0]}x{got_hw[1]}" + (
            f" with {got_c} channel(s)" if got_c is not None else ""
        )
        return ValueError(
            f"image size mismatch: the model expects {h}x{w} (HxW) with {self.channels} channel(s) (mode {self.mode}), got {got}"
        )

    def _from_array(self, a: np.ndarray) -> np.ndarray:
        if a.dtype != np.uint8:
            if a.dtype == np.bool_ or not (
                np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
            ):
                raise ValueError(f"images must be uint8 pixels, got dtype {a.dtype}")
            if a.size and (
                not np.isfinite(a).all()
                or a.min() < 0
                or a.max() > 255
                or not np.array_equal(a, np.round(a))
            ):
                raise ValueError(
                    f"images must be uint8 pixels (whole numbers in [0, 255]), got dtype {a.dtype} with other values"
                )
            a = a.astype(np.uint8)
        h, w = self.image_size
        c = self.channels
        if a.ndim == 3:
            if c != 1:
                raise ValueError(
                    f"an N x H x W array is for mode L models; this model is {self.mode}: pass N x {c} x {h} x {w} or N x {h} x {w} x {c}"
                )
            a = a[:, None]
        elif a.ndim == 4:
            if a.shape[1:] == (h, w, c) or (
                a.shape[3] in (1, 3, 4) and a.shape[1] not in (1, 3, 4)
            ):
                a = a.transpose(0, 3, 1, 2)  # N x H x W x C
            if a.shape[1] != c:
                raise self._size_error(a.shape[2:], a.shape[1])
        else:
            raise ValueError(
                f"images array must be N x H x W, N x C x H x W or N x H x W x C, got shape {a.shape}"
            )
        if tuple(a.shape[2:]) != (h, w):
            raise self._size_error(a.shape[2:], a.shape[1])
        return np.ascontiguousarray(a)

    def _open(self, item, paths: bool = True) -> Image.Image:
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
        elif not paths and isinstance(item, str | os.PathLike):
            data = _decode_string(item) if isinstance(item, str) else None
            if data is None:  # the same words whatever the string names: no file is looked up
                raise ValueError(
                    "not a base64-encoded image: this input takes PNG/JPEG bytes or base64 strings of them, never file paths"
                )
        elif isinstance(item, str | os.PathLike):
            path = Path(item)
            if isinstance(item, os.PathLike) or _is_file(path):
                if not path.is_file():
                    raise FileNotFoundError(f"image file not found: {path}")
                with Image.open(path) as img:
                    self._check_header(img)
                    img.load()
                    return img
            data = _decode_string(item)  # not a file: base64 (or a data: URI) of PNG/JPEG bytes
            if data is None:
                raise FileNotFoundError(
                    f"image file not found (nor a base64 image string): {item[:80]}"
                )
        else:
            raise ValueError(f"cannot read an image from a {type(item).__name__}")
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Exception as e:  # noqa: BLE001 - PIL raises several types for undecodable data
            raise ValueError(
                f"cannot decode image bytes as PNG/JPEG/... ({type(e).__name__}: {e})"
            ) from None
        self._check_header(img)
        try:
            img.load()
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"cannot decode image bytes as PNG/JPEG/... ({type(e).__name__}: {e})"
            ) from None
        return img

    def _check_header(self, img: Image.Image) -> None:
        """Refuse an image of the wrong size from its header, before its pixels are decoded (a small
        file can declare a huge image: decoding it first would cost its whole size in memory)."""
        w, h = img.size
        if (h, w) != self.image_size:
            raise self._size_error((h, w))

    def _from_image(self, img: Image.Image) -> np.ndarray:
        img = to_mode(img, self.mode)
        w, h = img.size
        if (h, w) != self.image_size:
            raise self._size_error((h, w))
        a = np.asarray(img, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def image_array(self, item, name: str | None = None) -> np.ndarray:
        """One image as a uint8 ``C×H×W`` array checked against the model's mode and size.

        ``item`` is a file path (``str`` or ``PathLike``; a string is always a path here, never
        base64), a PIL image, encoded PNG/JPEG bytes, or a numpy array / tensor of one image
        (``H×W`` for mode L, ``H×W×C`` or ``C×H×W``). It is converted to the model's mode, never
        resized. Errors start with the file path (or ``name``): FileNotFoundError for a missing
        file, ValueError for a file that is no image, a wrong size or wrong pixel values.
        """
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            where = name or str(path)
            if not path.exists():
                raise FileNotFoundError(f"{where}: image file not found")
            if not path.is_file():
                raise ValueError(f"{where}: not a file")
            try:
                opened = Image.open(path)  # reads the header only
            except Exception as e:  # noqa: BLE001 - PIL raises several types for undecodable data
                raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
            with opened:
                self._prefixed(where, self._check_header, opened)
                try:
                    opened.load()
                    img = opened.copy()
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
            return self._prefixed(where, self._from_image, img)
        where = name or f"image of type {type(item).__name__}"
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray):
            return self._prefixed(where, lambda a: self._from_array(a[None])[0], item)
        if isinstance(item, Image.Image | bytes | bytearray | memoryview):
            return self._prefixed(where, lambda i: self._from_image(self._open(i)), item)
        raise ValueError(
            f"{where}: cannot read an image from a {type(item).__name__} (give a file path, a PIL image, PNG/JPEG bytes or a numpy array)"
        )

    @staticmethod
    def _prefixed(where: str, fn, arg) -> np.ndarray:
        try:
            return fn(arg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_batch(self, images, *, paths: bool = True) -> np.ndarray:
        """The images as one uint8 array ``N×C×H×W`` checked against the model's mode and size.

        Also accepts a pandas DataFrame (or a dict) with a column ``image`` of encoded images.
        ``paths=False``: strings are base64 of encoded images only, never file paths.
        """
        if isinstance(images, pd.DataFrame | dict):
            if "image" not in images:
                cols = list(images.columns) if isinstance(images, pd.DataFrame) else list(images)
                raise ValueError(
                    f"a table of images needs a column 'image' of encoded PNG/JPEG bytes, got columns {cols}"
                )
            images = images["image"]
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if isinstance(images, pd.Series):
            images = images.tolist()
        if isinstance(images, np.ndarray) and images.dtype != object:
            return self._from_array(images)
        if isinstance(images, Image.Image | str | bytes | bytearray | os.PathLike):
            images = [images]
        if not isinstance(images, Iterable):
            raise ValueError(f"cannot read images from a {type(images).__name__}")
        items = list(images)
        if items and all(isinstance(i, np.ndarray | list) for i in items):  # nested lists (JSON)
            return self._from_array(np.asarray(items))
        c, (h, w) = self.channels, self.image_size
        if not items:
            return np.zeros((0, c, h, w), dtype=np.uint8)
        return np.stack([
            self._prefixed(f"image {i}", lambda item: self._from_image(self._open(item, paths)), item)
            for i, item in enumerate(items)
        ])
