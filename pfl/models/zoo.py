"""The model zoo: every architecture is split into phi (input -> R^d representation) and head (R^d -> logits).

The split is what lets heterogeneous clients share something homogeneous: whatever phi looks like, the
representation h has the same size d, so a head-side adapter has the same shape for every client.
New families register a builder in MODEL_REGISTRY and return a SplitModel.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SplitModel(nn.Module):
    """f(x) = head(phi(x)); phi ends in the d-dimensional representation (after its ReLU)."""

    def __init__(self, phi: nn.Module, head: nn.Module, arch: str, representation_dim: int):
        super().__init__()
        self.phi = phi
        self.head = head
        self.arch = arch
        self.representation_dim = representation_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.phi(x))


# name -> (c2, h1) of the paper's five CNNs (ALGORITHMS.md)
CNN_SPECS: dict[str, tuple[int, int]] = {
    "cnn1": (32, 2000),
    "cnn2": (16, 2000),
    "cnn3": (32, 1000),
    "cnn4": (32, 800),
    "cnn5": (32, 500),
}


def _conv_out(size: int) -> int:
    """Spatial size after conv5 -> pool2 -> conv5 -> pool2 (no padding)."""
    size = (size - 4) // 2
    return (size - 4) // 2


def build_cnn(name: str, in_shape: tuple[int, int, int], num_classes: int, d: int = 500) -> SplitModel:
    c2, h1 = CNN_SPECS[name]
    channels, height, width = in_shape
    flat = c2 * _conv_out(height) * _conv_out(width)
    if flat <= 0:
        raise ValueError(f"{name}: input {in_shape} is too small for two 5x5 convolutions with pooling")
    phi = nn.Sequential(
        nn.Conv2d(channels, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, h1), nn.ReLU(),
        nn.Linear(h1, d), nn.ReLU(),
    )
    return SplitModel(phi, nn.Linear(d, num_classes), name, d)


def build_resnet18(name: str, in_shape: tuple[int, int, int], num_classes: int, d: int = 500) -> SplitModel:
    """torchvision's ResNet-18 with its classifier replaced by a projection to d (then ReLU)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=d)
    if in_shape[0] != 3:
        net.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    return SplitModel(nn.Sequential(net, nn.ReLU()), nn.Linear(d, num_classes), name, d)


Builder = Callable[[str, tuple[int, int, int], int, int], SplitModel]
MODEL_REGISTRY: dict[str, Builder] = {**{name: build_cnn for name in CNN_SPECS}, "resnet18": build_resnet18}


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int, d: int = 500) -> SplitModel:
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name](name, in_shape, num_classes, d)


def assign_architectures(num_clients: int, setting: str, zoo: list[str]) -> list[str]:
    """Heterogeneous: client k gets zoo[k mod len(zoo)] (CNN-(k mod 5 + 1)); homogeneous: all zoo[0]."""
    if setting == "homogeneous":
        return [zoo[0]] * num_clients
    return [zoo[k % len(zoo)] for k in range(num_clients)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
