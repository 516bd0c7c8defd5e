"""The embedded default model: a small residual CNN for 64x64 upsampled digits.

Sized so that int8 pays off on a CPU at batch 1: about 115 M multiply-adds in 3x3 convolutions
of 32-128 channels, where the call overhead that dominates a tiny network (mnist_cnn runs in
0.04 ms, int8 or not) is a few percent. 0.29 M parameters (1.2 MB as float32).
The 8x8 scikit-learn digits are upsampled by the data loader (deploy.data), not here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

INPUT_SIZE = 64


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a skip connection (a 1x1 conv-BN where the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem (stride 2: 64 -> 32 pixels), a 64-channel block at 32x32, a 128-channel block at
    16x16, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        stem, mid, last = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        self.layer1 = BasicBlock(stem, mid, stride=1)
        self.layer2 = BasicBlock(mid, last, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet(num_classes: int = 10) -> DigitsResNet:
    return DigitsResNet(num_classes)
