"""MobileNet-V1 (Howard et al. 2017) and MobileNet-V2 (Sandler et al. 2018) for 32x32 images.

CIFAR variants: the 3x3 stem convolution has stride 1 and the early strides are
reduced so that a 32x32 image ends with a 2x2 (V1) or 4x4 (V2) feature map
before global average pooling.

``width`` multiplies every channel count (rounded to the nearest integer, at
least 1; no rounding to multiples of 8, so the layout is deterministic and any
multiplier works). As in the MobileNet-V2 paper, the final 1x1 convolution keeps
its 1280 channels for ``width < 1`` and is scaled for ``width > 1``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from prunekit.models.registry import register_model


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_width(width: float) -> None:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- V1


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv_pw = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv_dw(x)))
        return self.relu2(self.bn2(self.conv_pw(x)))


# (output channels, stride) of the 13 depthwise-separable blocks, CIFAR strides.
MOBILENET_V1_CFG: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip


class MobileNetV1(nn.Module):
    """MobileNet-V1 for 32x32 images: stem conv, 13 depthwise-separable blocks, pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        _check_width(width)
        stem = _scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        blocks, in_planes = [], stem
        for planes, stride in MOBILENET_V1_CFG:
            out = _scaled(planes, width)
            blocks.append(DepthwiseSeparable(in_planes, out, stride))
            in_planes = out
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


# --------------------------------------------------------------------------- V2


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when ``expansion == 1``), depthwise 3x3, linear projection 1x1.

    The input is added to the output when ``stride == 1`` and the channel counts match.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_planes * expansion
        self.has_expand = expansion != 1
        self.use_residual = stride == 1 and in_planes == planes
        if self.has_expand:
            self.conv1 = nn.Conv2d(in_planes, hidden, 1, 1, 0, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.relu1 = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU6(inplace=True)
        self.conv3 = nn.Conv2d(hidden, planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self.relu1(self.bn1(self.conv1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.use_residual:
            out = out + x
        return out


# (expansion t, output channels c, repeats n, first stride s); CIFAR: second row stride 2 -> 1.
MOBILENET_V2_CFG: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    """MobileNet-V2 for 32x32 images (stem stride 1, first stride-2 stage at stride 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        _check_width(width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        stem = _scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU6(inplace=True)
        blocks, in_planes = [], stem
        for t, c, n, s in MOBILENET_V2_CFG:
            out = _scaled(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(in_planes, out, s if i == 0 else 1, t))
                in_planes = out
        self.layers = nn.Sequential(*blocks)
        last = _scaled(1280, max(1.0, width))
        self.conv2 = nn.Conv2d(in_planes, last, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.dropout(self.flatten(self.avgpool(x))))


@register_model("mobilenet_v1", family="mobilenet", tiny_kwargs={"width": 0.25})
def mobilenet_v1(num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
    """MobileNet-V1 for 32x32 images (13 depthwise-separable blocks, CIFAR strides)."""
    return MobileNetV1(num_classes, in_channels, width)


@register_model("mobilenet_v2", family="mobilenet", tiny_kwargs={"width": 0.25})
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
    """MobileNet-V2 for 32x32 images (inverted residuals, CIFAR strides, 1280-d head)."""
    return MobileNetV2(num_classes, in_channels, width, dropout)
