"""LeNet-300-100 (MLP) and LeNet-5 (conv) for 28x28 or 32x32 inputs."""

from __future__ import annotations

import torch
import torch.nn as nn

from prunekit.models.registry import register_model


class LeNet300100(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
        super().__init__()
        h1, h2 = max(1, round(300 * width)), max(1, round(100 * width))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, h1)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(h1, h2)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Conv(6,5x5)-pool-Conv(16,5x5)-pool-FC120-FC84-FC; ReLU and max-pooling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
        super().__init__()
        if image_size not in (28, 32):
            raise ValueError(f"lenet5 expects 28x28 or 32x32 inputs, got image_size={image_size}")
        c1, c2 = max(1, round(6 * width)), max(1, round(16 * width))
        f1, f2 = max(1, round(120 * width)), max(1, round(84 * width))
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2 if image_size == 28 else 0)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.relu3 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet_300_100", family="lenet", input_size=(1, 28, 28), tiny_kwargs={"width": 0.1})
def lenet_300_100(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
    """LeNet-300-100: a 784-300-100-10 multilayer perceptron (ShrinkBench, SiPP)."""
    return LeNet300100(num_classes, in_channels, image_size, width)


@register_model("lenet5", family="lenet", input_size=(1, 28, 28), tiny_kwargs={"width": 0.5})
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
    """LeNet-5: two 5x5 convolutions and three fully connected layers."""
    return LeNet5(num_classes, in_channels, image_size, width)
