"""How a model turns stored uint8 images into its input tensor: the model's own preprocessing.

A ``Preprocess`` travels with the model (``Classifier.preprocess``) and is recorded in
``model.json``, so training, evaluation, ``predict``, the pyfunc model, ``mlflow models serve``
and the demo prepare images the same way:

* **eval**: when ``resize`` is set, the shorter side is resized to ``resize`` and the centre
  ``size`` is cropped (torchvision's ``weights.transforms()``: resize 256, crop 224); when only
  ``size`` is set, the image is resized to ``size``; then ``(x / 255 - mean) / std``.
* **train**: ``train_crop="pad"`` takes the data stream's pad-crop and flip (done on the stored
  images) and then the eval steps; ``train_crop="random-resized"`` crops a random area of 8-100%
  of the image with an aspect ratio in [3/4, 4/3], resizes it to ``size`` and flips it (when
  ``flip``), as torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``.

The project's own backbones keep ``x / 127.5 - 1`` at the stored size (``Preprocess.scaled``:
mean 0.5, std 0.5, computed exactly as before). A grayscale image is repeated to three channels
for a model that takes RGB. Plain torch (torchvision only for resizing); no I/O.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
TRAIN_CROPS = ("pad", "random-resized")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def _hw(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in value)):
        raise ValueError(f"{what}={value!r}; expected [height, width] of whole numbers in 8..4096")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class Preprocess:
    channels: int  # channels the model takes (1-channel images are repeated when this is 3)
    size: tuple[int, int] | None = None  # the model's input H, W; None = the images as stored
    resize: int | None = None  # eval: shorter side to this, then the centre crop of ``size``
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    train_crop: str = "pad"
    source: str = "scaled"  # where the values come from ("scaled", "torchvision:<Weights>", "timm:<cfg>", "given")

    def __post_init__(self) -> None:
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"channels={self.channels!r}; expected a positive whole number")
        object.__setattr__(self, "size", _hw(self.size, "size"))
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int) or not 8 <= self.resize <= 8192):
            raise ValueError(f"resize={self.resize!r}; expected a whole number in 8..8192 or null")
        if self.resize is not None and self.size is None:
            raise ValueError("resize needs size (the centre crop taken after resizing)")
        if self.resize is not None and self.resize < min(self.size):
            raise ValueError(f"resize={self.resize} is smaller than the crop {list(self.size)}")
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if not (isinstance(vals, list | tuple) and len(vals) == self.channels and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in vals)):
                raise ValueError(f"{name}={vals!r}; expected {self.channels} finite numbers (one per channel)")
            object.__setattr__(self, name, tuple(float(v) for v in vals))
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std={list(self.std)}; every value must be > 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop={self.train_crop!r}; expected one of {', '.join(TRAIN_CROPS)}")
        if not isinstance(self.source, str):
            raise ValueError(f"source={self.source!r}; expected a string")

    # ------------------------------------------------------------------ construction, records

    @classmethod
    def scaled(cls, channels: int, size=None) -> Preprocess:
        """``x / 127.5 - 1`` (the project's backbones), at the stored size or resized to ``size``."""
        return cls(channels, size=size, mean=(0.5,) * channels, std=(0.5,) * channels)

    def to_dict(self) -> dict:
        return {
            "channels": self.channels,
            "size": list(self.size) if self.size else None,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "train_crop": self.train_crop,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d, where: str = "preprocess") -> Preprocess:
        """The ``preprocess`` entry of a ``model.json``; errors name ``where`` and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
        if "channels" not in d:
            raise ValueError(f"{where}: missing key channels")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def input_size(self, stored: tuple[int, int]) -> tuple[int, int]:
        """The H, W the network sees for images stored at ``stored``."""
        return self.size or (int(stored[0]), int(stored[1]))

    def describe(self) -> str:
        geo = "as stored" if self.size is None else (f"resize {self.resize}, centre crop {self.size[0]}x{self.size[1]}" if self.resize else f"resized to {self.size[0]}x{self.size[1]}")
        if self.is_scaled:
            return f"x / 127.5 - 1, {geo}"
        return f"{geo}, mean {list(self.mean)}, std {list(self.std)} ({self.source})"

    @property
    def is_scaled(self) -> bool:
        return all(m == 0.5 for m in self.mean) and all(s == 0.5 for s in self.std)

    # ------------------------------------------------------------------ the transforms

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        raise ValueError(f"images have {c} channel(s), the model takes {self.channels}")

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_scaled:
            return x.float().div_(127.5).sub_(1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.float().div_(255.0).sub_(mean).div_(std)

    def _mode(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def eval_batch(self, x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 ``N x C x H x W`` images -> the model's float input on ``device``."""
        x = self._channels(x.to(device, non_blocking=True))
        if self.size is not None and (self.resize is not None or tuple(x.shape[-2:]) != self.size):
            from torchvision.transforms import functional as TF

            if self.resize is not None:
                x = TF.center_crop(TF.resize(x, [self.resize], interpolation=self._mode(), antialias=True), list(self.size))
            else:
                x = TF.resize(x, list(self.size), interpolation=self._mode(), antialias=True)
        return self._normalize(x)

    def train_batch(self, x: torch.Tensor, device: torch.device | str = "cpu", *, flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training input: ``eval_batch`` after the stream's pad-crop (``train_crop="pad"``), or a
        random-resized crop per image (+ a horizontal flip with probability 1/2 when ``flip``)."""
        if self.train_crop == "pad":
            return self.eval_batch(x, device)
        x = self._channels(x.to(device, non_blocking=True))  # crops run where the model runs
        n, _, h, w = x.shape
        boxes = [random_resized_box(h, w, generator) for _ in range(n)]
        flips = (torch.rand(n, generator=generator) < 0.5).tolist() if flip else [False] * n
        out = crop_resize(x, boxes, flips, self.input_size((h, w)), self.interpolation)
        return self._normalize(out)


def crop_resize(x: torch.Tensor, boxes, flips, out_hw, interpolation: str = "bilinear") -> torch.Tensor:
    """Every image of ``x`` (``N x C x H x W``) cropped to its box ``(top, left, height, width)``,
    mirrored where ``flips`` says so, and resized to ``out_hw``: one batched ``grid_sample`` (no
    antialiasing). The values equal torchvision's ``resized_crop(antialias=False)`` except on the
    outermost output pixels, which blend in the image's pixels just outside the box."""
    import torch.nn.functional as F

    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3)
    for i, ((top, left, ch, cw), mirror) in enumerate(zip(boxes, flips, strict=True)):
        theta[i, 0, 0] = -cw / w if mirror else cw / w
        theta[i, 0, 2] = (2 * left + cw) / w - 1
        theta[i, 1, 1] = ch / h
        theta[i, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(x.device), [n, c, *out_hw], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0, 255) if interpolation == "bicubic" else out


def random_resized_box(h: int, w: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop covering 8-100% of an ``h x w`` image with an
    aspect ratio in [3/4, 4/3] (log-uniform); ten tries, then the centre crop of the nearest
    allowed ratio (torchvision's ``RandomResizedCrop.get_params`` rule)."""
    area = h * w
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(10):
        r = torch.rand(2, generator=generator).tolist()
        target = area * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * r[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * r[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            return top, left, ch, cw
    ratio = w / h
    if ratio < RRC_RATIO[0]:
        cw, ch = w, round(w / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        ch, cw = h, round(h * RRC_RATIO[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def from_torchvision(weights, channels_in: int, input_size: int | None = None) -> Preprocess:
    """The preprocessing of a torchvision ``Weights`` entry (``weights.transforms()``), at
    ``input_size`` when given (the resize scaled by the same ratio: 256/224 of the crop)."""
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    if input_size is not None:
        resize, crop = max(input_size, round(input_size * resize / crop)), input_size
    return Preprocess(
        3, size=(crop, crop), resize=resize, mean=tuple(t.mean), std=tuple(t.std),
        interpolation=t.interpolation.value, train_crop="random-resized", source=f"torchvision:{type(weights).__name__}.{weights.name}",
    )  # fmt: skip


def from_timm(model, name: str, input_size: int | None = None) -> Preprocess:
    """The preprocessing of a timm model's data config (input size, crop_pct, mean/std)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    if input_size is not None:
        crop = input_size
    resize = max(crop, math.floor(crop / crop_pct))
    interp = cfg.get("interpolation", "bilinear")
    return Preprocess(
        3, size=(crop, crop), resize=resize, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=interp if interp in INTERPOLATIONS else "bilinear", train_crop="random-resized", source=f"timm:{name.removeprefix('timm:')}",
    )  # fmt: skip
