"""Feature-extractor backbones for OOD detection.

Every backbone maps an image batch ``N x C x H x W`` to a feature matrix
``N x F`` (after global average pooling) and exposes ``num_features == F``.
Backbones never produce logits; a method-specific head does that.

All constructors share the leading signature ``(in_channels, image_size, ...)``
so that :func:`ood_ray.models.build_backbone` can call them uniformly; the
remaining arguments are keyword-only and backbone-specific.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "SmallCNN",
    "CifarResNet",
    "WideResNet",
    "MobileNetV2Features",
    "init_weights",
    "AvgMaxPool",
    "resnet18",
    "wrn40_2",
    "small_cnn",
    "mobilenet_v2",
]


def _pair(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convs, BN/GN weight 1 / bias 0.

    Linear layers inside a backbone (none by default) get a small normal init
    and zero bias.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class AvgMaxPool(nn.Module):
    """Global max and average pooling concatenated: ``N x C x H x W`` -> ``N x 2C x 1 x 1`` (the
    Outlier Exposure article's head; the backbones flatten their ``pool`` output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.amax(x, dim=(2, 3), keepdim=True), x.mean(dim=(2, 3), keepdim=True)], dim=1)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Small, fast CNN for tiny images such as the 8x8 digits.

    ``conv3x3(C->32w)-BN-ReLU, conv3x3(32w->64w)-BN-ReLU, maxpool2,
    conv3x3(64w->128w)-BN-ReLU, global avg pool`` -> ``128w`` features, where
    ``w`` is the ``width`` multiplier (channel counts are rounded, minimum 1).
    The max-pool is only used when the input is at least 2 pixels on each side
    (always true for sizes accepted by ``build_backbone``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        *,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        h, w = _pair(image_size)
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        layers: list[nn.Module] = [
            _conv3x3(in_channels, c1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            _conv3x3(c1, c2),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
        ]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
        layers += [_conv3x3(c2, c3), nn.BatchNorm2d(c3), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = c3
        init_weights(self)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


# --------------------------------------------------------------------------- ResNet (CIFAR)


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al., 2016)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem: 3x3 conv, stride 1, no max-pool.

    Stages of :class:`BasicBlock` with widths 64/128/256/512 and strides
    1/2/2/2, then global average pooling -> 512 features.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        *,
        blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _pair(image_size)  # accepted for a uniform signature; any size >= 8 works
        widths = (64, 128, 256, 512)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (cout, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


def resnet18(
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    *,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-18 (BasicBlocks [2, 2, 2, 2]) with the CIFAR stem -> 512 features."""
    return CifarResNet(
        in_channels, image_size, blocks=(2, 2, 2, 2), zero_init_residual=zero_init_residual
    )


# --------------------------------------------------------------------------- Wide ResNet


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3.

    When the channel count changes, the pre-activated input feeds both the
    residual branch and the 1x1 projection shortcut (as in Zagoruyko &
    Komodakis' and Hendrycks et al.'s reference implementations).
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = cin == cout and stride == 1
        self.shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        identity = x if self.shortcut is None else self.shortcut(act)
        return out + identity


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis, 2016) as a feature extractor.

    ``depth = 6n + 4``; three groups of ``n`` wide basic blocks with widths
    ``16k, 32k, 64k`` and strides 1/2/2 after a 3x3 stem conv to 16 channels,
    then a final BN-ReLU and global average pooling -> ``64k`` features.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        *,
        depth: int = 40,
        widen_factor: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        _pair(image_size)
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (>= 10), got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(in_channels, widths[0])
        groups: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(cin, cout, stride if j == 0 else 1, dropout))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        init_weights(self)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn(x))
        return torch.flatten(self.pool(x), 1)


def wrn40_2(
    in_channels: int = 3, image_size: int | tuple[int, int] = 32, *, dropout: float = 0.3
) -> WideResNet:
    """WRN-40-2 (the Outlier Exposure paper's network) -> 128 features."""
    return WideResNet(in_channels, image_size, depth=40, widen_factor=2, dropout=dropout)


# --------------------------------------------------------------------------- MobileNetV2


class MobileNetV2Features(nn.Module):
    """torchvision MobileNetV2 ``features`` (random init) + global average pool.

    * ``width_mult`` is passed to :func:`torchvision.models.mobilenet_v2`;
      ``num_features`` is its ``last_channel`` (1280 for ``width_mult <= 1``).
    * The first conv is replaced when ``in_channels != 3``.
    * ``small_input``: when true, the first conv uses stride 1 instead of 2, so
      the total downsampling is 16x instead of 32x and 32x32 / 8x8 inputs keep
      some spatial extent in the early stages. The default ``None`` means
      "automatic": on when the smaller image side is below 64 pixels, off
      otherwise (standard ImageNet behaviour). Pass ``True``/``False`` to force.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        *,
        width_mult: float = 1.0,
        small_input: bool | None = None,
    ) -> None:
        super().__init__()
        h, w = _pair(image_size)
        if small_input is None:
            small_input = min(h, w) < 64
        self.small_input = bool(small_input)
        import torchvision  # imported here: it costs Ray workers ~1.5 s at start-up otherwise

        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        features = net.features
        old: nn.Conv2d = features[0][0]
        stride = 1 if self.small_input else old.stride
        if in_channels != old.in_channels or stride != old.stride:
            new = nn.Conv2d(
                in_channels,
                old.out_channels,
                kernel_size=old.kernel_size,
                stride=stride,
                padding=old.padding,
                bias=old.bias is not None,
            )
            nn.init.kaiming_normal_(new.weight, mode="fan_out")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
            features[0][0] = new
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = int(net.last_channel)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.features[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def small_cnn(
    in_channels: int = 3, image_size: int | tuple[int, int] = 32, *, width: float = 1.0
) -> SmallCNN:
    """Small fast CNN -> ``round(128 * width)`` features."""
    return SmallCNN(in_channels, image_size, width=width)


def mobilenet_v2(
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    *,
    width_mult: float = 1.0,
    small_input: bool | None = None,
) -> MobileNetV2Features:
    """MobileNetV2 features -> 1280 features (see :class:`MobileNetV2Features`)."""
    return MobileNetV2Features(
        in_channels, image_size, width_mult=width_mult, small_input=small_input
    )
