"""The model zoo: every architecture is split into phi (input -> R^d representation) and head (R^d -> logits).

The split is what lets heterogeneous clients share something homogeneous: whatever phi looks like, the
representation h has the same size d, so a head-side adapter has the same shape for every client.
New families register a builder in MODEL_REGISTRY and return a SplitModel.
"""

from __future__ import annotations

from collections.abc import Callable

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


# name -> (c2, h1) of the paper's five CNNs (docs/algorithms.md)
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


class InputChannels(nn.Module):
    """Feeds a c-channel image to a 3-channel network: 3 unchanged, 1 repeated, other c by a learned 1x1
    convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.mix = nn.Conv2d(channels, 3, 1) if channels not in (1, 3) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 3:
            return x
        if self.channels == 1:
            return x.expand(-1, 3, -1, -1)
        return self.mix(x)


def vit_patch_size(size: int) -> int:
    """The smallest patch size dividing the image that leaves at most 8 x 8 patches (4 for 28-32 px)."""
    return next(p for p in range(1, size + 1) if size % p == 0 and size // p <= 8)


def _vit_mini(size: int, d: int) -> nn.Module:
    """A small Vision Transformer for 28-32 px images: 4 layers, 4 heads, width 128, MLP 256 (~0.8M params)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=size, patch_size=vit_patch_size(size), num_layers=4, num_heads=4,
                             hidden_dim=128, mlp_dim=256, num_classes=d)


def _torchvision(name: str, size: int, d: int) -> nn.Module:
    """torchvision's architecture `name`, randomly initialised, with its classifier projecting to d."""
    import torchvision.models as tv

    if name == "vit_mini":
        return _vit_mini(size, d)
    if name == "googlenet":
        return tv.googlenet(weights=None, num_classes=d, aux_logits=False, init_weights=True)
    return getattr(tv, name)(weights=None, num_classes=d)


TORCHVISION_FAMILIES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2",
                        "mobilenet_v3_small", "shufflenet_v2_x1_0", "googlenet", "efficientnet_b0", "vit_mini")


def build_torchvision(name: str, in_shape: tuple[int, int, int], num_classes: int, d: int = 500) -> SplitModel:
    """A torchvision family split into phi (image -> R^d, then ReLU) and head (d -> C). Images of any
    channel count (see InputChannels) and small sizes: the networks as torchvision defines them, whose
    global pooling takes 16-32 px inputs (the ViT's patch size follows the image size)."""
    channels, height, width = in_shape
    if height != width:
        raise ValueError(f"{name}: needs square images, got {height}x{width}")
    net = _torchvision(name, height, d)
    return SplitModel(nn.Sequential(InputChannels(channels), net, nn.ReLU()), nn.Linear(d, num_classes), name, d)


Builder = Callable[[str, tuple[int, int, int], int, int], SplitModel]
MODEL_REGISTRY: dict[str, Builder] = {**{name: build_cnn for name in CNN_SPECS},
                                      **{name: build_torchvision for name in TORCHVISION_FAMILIES}}

# Named zoos for `model_zoo`: client k gets zoo[k mod len(zoo)].
ZOOS: dict[str, list[str]] = {
    "paper-cnn": list(CNN_SPECS),  # the paper's five CNNs (the default)
    # the field's benchmark zoo HtFE8: a CNN, GoogLeNet, MobileNetV2 and five ResNets
    "htfe8": ["cnn1", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    # mixed families that train on a CPU
    "mixed-small": ["cnn1", "resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "vit_mini"],
}


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


def describe_model(name: str, in_shape: tuple[int, int, int], num_classes: int, d: int) -> dict[str, int]:
    """Parameters (phi, head, total) and forward FLOPs per sample (measured, eval mode) of a zoo model."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(name, in_shape, num_classes, d).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *in_shape))
    return {"phi_params": count_parameters(model.phi), "head_params": count_parameters(model.head),
            "params": count_parameters(model), "forward_flops": int(counter.get_total_flops())}
