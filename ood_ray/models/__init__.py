"""Backbones (feature extractors) and the generic backbone + head classifier.

Backbones map ``N x C x H x W`` float images to ``N x F`` features (after global
average pooling) and carry ``num_features == F``; they never output logits.

Registry (``BACKBONES``):

============== ======================================================== =========
name           network                                                  features
============== ======================================================== =========
small_cnn      3 conv-BN-ReLU layers + one max-pool (``width`` mult.)   128*width
resnet18       ResNet-18, CIFAR stem (3x3 conv stride 1, no max-pool)   512
wrn40_2        Wide ResNet 40-2, pre-activation, ``dropout`` (0.3)      128
mobilenet_v2   torchvision MobileNetV2 features (``width_mult``,        1280
               ``small_input``: first conv stride 1 when the image is
               smaller than 64 px, automatic by default)
============== ======================================================== =========
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .backbones import (
    CifarResNet,
    MobileNetV2Features,
    SmallCNN,
    WideResNet,
    init_weights,
    mobilenet_v2,
    resnet18,
    small_cnn,
    wrn40_2,
)

__all__ = [
    "BACKBONES",
    "MIN_IMAGE_SIZE",
    "Classifier",
    "build_backbone",
    "init_weights",
    "SmallCNN",
    "CifarResNet",
    "WideResNet",
    "MobileNetV2Features",
]

MIN_IMAGE_SIZE = 8

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "wrn40_2": wrn40_2,
    "mobilenet_v2": mobilenet_v2,
}


def _check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        try:
            hw = tuple(image_size)
        except TypeError:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}") from None
        if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in hw):
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    if min(hw) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size {image_size!r} is too small: height and width must be >= {MIN_IMAGE_SIZE}"
        )
    return hw  # type: ignore[return-value]


def build_backbone(
    name: str, in_channels: int, image_size: tuple[int, int] | int, **kwargs: Any
) -> nn.Module:
    """Build the backbone registered as ``name``.

    ``in_channels`` is any positive int (1 for grayscale, 3 for RGB, ...);
    ``image_size`` is ``H`` (square) or ``(H, W)``, each at least 8. Extra
    keyword arguments go to the backbone constructor (``width`` for
    ``small_cnn``, ``dropout`` for ``wrn40_2``, ``width_mult`` / ``small_input``
    for ``mobilenet_v2``, ``zero_init_residual`` for ``resnet18``); unknown
    ones raise ``TypeError``.
    """
    if not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        )
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    hw = _check_image_size(image_size)
    return BACKBONES[name](in_channels, hw, **kwargs)


class Classifier(nn.Module):
    """``head(backbone(x))``; the head's output (tensor or tuple) is returned as is.

    ``detector``: the fitted post-hoc detector (``ood_ray.detectors``) a checkpoint carries, set
    when it is loaded (None when it has none); it is not a module and not in the state_dict.
    """

    detector = None

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``N x num_features``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.backbone(x))
