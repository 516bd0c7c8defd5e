"""Train the digit classifiers shipped in models/weights/ on scikit-learn's digits (real, offline).

`python -m qat_deploy.models.train_digits [NAME ...]` regenerates their weights deterministically
(all of them without a name). digits_resnet is the embedded default `deploy build` ships;
mnist_cnn is the tiny model the tests and the CI gate use.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.data import digits_split
from qat_deploy.models.digits_resnet import INPUT_SIZE, DigitsResNet
from qat_deploy.models.mnist_cnn import MnistCNN

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Recipe:
    """How one shipped digit model is trained."""

    factory: Callable[[], nn.Module]
    size: int  # the digits are upsampled to size x size pixels
    weights: str  # file name in models/weights/
    epochs: int
    lr: float = 3e-3


RECIPES = {
    "digits_resnet": Recipe(
        DigitsResNet, INPUT_SIZE, "digits_resnet_digits.pt", epochs=12, lr=1e-3
    ),
    "mnist_cnn": Recipe(MnistCNN, 16, "mnist_cnn_digits.pt", epochs=8),
}


def train(name: str, seed: int = 0) -> nn.Module:
    """Adam, batch 64, fixed shuffles; returns the model in eval mode."""
    recipe = RECIPES[name]
    data = digits_split(upsample_to=recipe.size)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    torch.manual_seed(seed)
    model = recipe.factory().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def test_accuracy(name: str, model: nn.Module) -> float:
    data = digits_split(upsample_to=RECIPES[name].size)
    with torch.no_grad():
        pred = model(torch.from_numpy(data.x_test)).argmax(1).numpy()
    return float((pred == data.y_test).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(RECIPES)}")
    names = parser.parse_args(argv).names or list(RECIPES)
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(RECIPES)}")
    for name in names:
        model = train(name)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        path = write_atomic(WEIGHTS_DIR / RECIPES[name].weights, buffer.getvalue())
        print(f"{name}: test accuracy {test_accuracy(name, model):.4f}; wrote {path}")


if __name__ == "__main__":
    main()
