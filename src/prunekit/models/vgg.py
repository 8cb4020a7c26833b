"""CIFAR VGG-11/13/16/19 with BatchNorm (Simonyan & Zisserman 2015, CIFAR layout).

Every 3x3 convolution is followed by BatchNorm and its own ReLU instance; 'M'
in a configuration is a 2x2 max-pool. All layers are separate entries of the
``features`` ``nn.Sequential`` so that pruning code can hook the activation after
each ReLU or pool. For 32x32 inputs the five pools leave a 512x1x1 feature map,
which is flattened and classified by

* ``classifier="cifar"`` (default): a single ``Linear(512, num_classes)``;
* ``classifier="mlp"``: ``Linear(512, 512)-ReLU-Linear(512, num_classes)``, the
  head used by several pruning papers.

Both heads are ``nn.Sequential`` ``classifier`` modules, so the final layer is
always ``classifier[-1]``. ``width`` multiplies every convolution width (and the
hidden MLP width). Other square inputs of at least 32 pixels are accepted through
``image_size``: the flattened features then have ``512 * (image_size // 32) ** 2``
entries.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from prunekit.models.registry import register_model

# Convolutions per stage (stage widths 64, 128, 256, 512, 512, each stage ended by a 2x2 max-pool).
_STAGE_DEPTHS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
_STAGE_WIDTHS = (64, 128, 256, 512, 512)

# Standard configurations: integers are output channels, "M" a 2x2 max-pool.
VGG_CONFIGS: dict[int, list[int | str]] = {
    depth: [item for w, n in zip(_STAGE_WIDTHS, convs) for item in [w] * n + ["M"]]
    for depth, convs in _STAGE_DEPTHS.items()
}

CLASSIFIERS = ("cifar", "mlp")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 images.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: number of output logits.
        in_channels: channels of the input image.
        width: multiplier applied to every convolution width.
        classifier: ``"cifar"`` (single linear layer) or ``"mlp"`` (one hidden layer).
        image_size: side of the square input image (32 for CIFAR; at least 32).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        classifier: str = "cifar",
        image_size: int = 32,
    ):
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if image_size < 32:
            raise ValueError(f"VGG needs inputs of at least 32x32 (five 2x2 pools), got {image_size=}")
        spatial = image_size // 32
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = _scaled(int(item), width)
                layers += [
                    nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        flat = channels * spatial * spatial
        if classifier == "cifar":
            self.classifier = nn.Sequential(nn.Linear(flat, num_classes))
        else:
            hidden = _scaled(512, width)
            self.classifier = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def _make(depth: int):
    def factory(
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        classifier: str = "cifar",
        image_size: int = 32,
    ):
        return VGG(depth, num_classes, in_channels, width, classifier, image_size)

    factory.__doc__ = f"VGG-{depth} with BatchNorm for 32x32 images (CIFAR layout, 512-d features)."
    return factory


for _d in (11, 13, 16, 19):
    register_model(f"vgg{_d}", family="vgg", tiny_kwargs={"width": 0.25})(_make(_d))
