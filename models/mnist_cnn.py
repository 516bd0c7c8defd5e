"""Small digit classifier of the "QAT from scratch" seed article, sized for 16x16 inputs.

The 8x8 scikit-learn digits are upsampled to 16x16 by the data loader (deploy.data), not here,
so the exported graph holds only the layers being quantized.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MnistCNN(nn.Module):
    """Two conv-BN-ReLU-maxpool stages (16x16 -> 8x8 -> 4x4) and one fc layer."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def mnist_cnn(num_classes: int = 10) -> MnistCNN:
    return MnistCNN(num_classes)
