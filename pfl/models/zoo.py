"""The model zoo: every architecture is split into phi (input -> R^d representation) and head (R^d -> logits).

The split is what lets heterogeneous clients share something homogeneous: whatever phi looks like, the
representation h has the same size d, so a head-side adapter has the same shape for every client.
New families register a builder in MODEL_REGISTRY and return a SplitModel.
"""

from __future__ import annotations

import itertools
import re
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

    vit = VisionTransformer(image_size=size, patch_size=vit_patch_size(size), num_layers=4, num_heads=4,
                            hidden_dim=128, mlp_dim=256, num_classes=d)
    # torchvision zero-initialises the classifier, which here is the projection to d: behind phi's ReLU a zero
    # output has zero gradient, so the representation would stay 0 for ever. Linear's default init instead.
    vit.heads.head.reset_parameters()
    return vit


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

HTFE8 = ["cnn1", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
HTC4 = ["", "+h512", "+h256", "+h128"]  # HtFLlib's HtC-img-4 heads on d (its d is 512)

# Named zoos for `model_zoo`: client k gets zoo[k mod len(zoo)].
ZOOS: dict[str, list[str]] = {
    "paper-cnn": list(CNN_SPECS),  # the paper's five CNNs (the default)
    # the field's benchmark zoo HtFE8: a CNN, GoogLeNet, MobileNetV2 and five ResNets
    "htfe8": HTFE8,
    # mixed families that train on a CPU
    "mixed-small": ["cnn1", "resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "vit_mini"],
    # heterogeneous heads (HtFLlib's HtC-img-4: Head([512]), Head([512, 512]), Head([512, 256]), Head([512, 128]),
    # client k gets head k mod 4): on ResNet-34 (its Res34-HtC-img-4), on HtFE8's extractors (HtFE-img-8-HtC-img-4:
    # client k gets extractor k mod 8 and head k mod 4), and a CPU-sized one, the paper's CNNs with heads of
    # depth 1 to 4
    "res34-htc4": ["resnet34" + h for h in HTC4],
    "htfe8-htc4": [arch + HTC4[k % 4] for k, arch in enumerate(HTFE8)],
    "paper-cnn-htc4": ["cnn1", "cnn2+h512", "cnn3+h256", "cnn4+h256-128", "cnn5+h256-128-64"],
}


# ---------------------------------------------------------------- heads deeper than one layer
#
# An architecture name may carry a head: "<extractor>+h<w1>-<w2>..." puts an MLP head d -> w1 -> ... -> C (ReLU
# between layers, none on the logits) on the extractor's representation instead of the single linear d -> C:
# "resnet34+h512" is HtFLlib's Head(hidden_dims=[512, 512]). The representation h stays in R^d, so everything that
# lives on h (pFedLoRA's adapter, prototypes) is unchanged; what exchanges heads must see equal heads
# (`head_problem`).

HEAD_SUFFIX = re.compile(r"h[1-9][0-9]*(?:-[1-9][0-9]*)*")
MAX_HEAD_WIDTH = 65536


def split_architecture(name: str) -> tuple[str, tuple[int, ...]]:
    """"resnet18+h512-256" -> ("resnet18", (512, 256)); a name without a head suffix has the linear head ()."""
    extractor, plus, head = name.partition("+")
    if not plus:
        return name, ()
    if not HEAD_SUFFIX.fullmatch(head):
        raise ValueError(f"model {name!r}: a head suffix is +h<width>[-<width>...] (e.g. {extractor}+h512 or "
                         f"{extractor}+h256-128), got +{head}")
    widths = tuple(int(w) for w in head[1:].split("-"))
    if max(widths) > MAX_HEAD_WIDTH:
        raise ValueError(f"model {name!r}: head widths are at most {MAX_HEAD_WIDTH}")
    return extractor, widths


def head_label(name: str) -> str:
    """The head of an architecture in words: "linear" or "mlp d-512-C"."""
    widths = split_architecture(name)[1]
    return "linear" if not widths else "mlp d-" + "-".join(map(str, widths)) + "-C"


def build_head(d: int, widths: tuple[int, ...], num_classes: int) -> nn.Module:
    """Linear d -> C, or an MLP d -> w1 -> ... -> C with ReLU between its layers (raw logits out)."""
    if not widths:
        return nn.Linear(d, num_classes)
    sizes = (d, *widths)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


def model_problem(name: str) -> str | None:
    """Why `name` is not an architecture of the zoo, or None."""
    try:
        extractor, _ = split_architecture(name)
    except ValueError as exc:
        return str(exc)
    if extractor not in MODEL_REGISTRY:
        return f"unknown model {extractor!r}; known models are {', '.join(sorted(MODEL_REGISTRY))}"
    return None


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int, d: int = 500,
                vocab_size: int = 0) -> SplitModel:
    """`in_shape`: one sample's shape, (C, H, W), or (max_len,) for text, whose models (pfl.models.text) also
    take the data set's `vocab_size` (0: images)."""
    problem = model_problem(name)
    if problem:
        raise KeyError(problem)
    extractor, widths = split_architecture(name)
    text = {"vocab_size": vocab_size} if vocab_size else {}
    model = MODEL_REGISTRY[extractor](extractor, in_shape, num_classes, d, **text)
    if widths:
        model.head = build_head(d, widths, num_classes)
    model.arch = name
    return model


def head_problem(method: str, architectures: list[str], what: str) -> str | None:
    """A method that exchanges `what` of its clients' heads needs one head structure for every client: the
    reason it cannot run these architectures (for its `check_config`), or None."""
    heads = sorted({head_label(a) for a in architectures})
    if len(heads) == 1:
        return None
    return (f"recipe key 'model_zoo': method {method} exchanges {what}, so every client needs the same head, but the "
            f"zoo gives heads {', '.join(heads)}; use a zoo without head suffixes (+h...) or a method that "
            f"shares no head (docs/algorithms.md, \"Heterogeneous heads\")")


def assign_architectures(num_clients: int, setting: str, zoo: list[str]) -> list[str]:
    """Heterogeneous: client k gets zoo[k mod len(zoo)] (CNN-(k mod 5 + 1)); homogeneous: all zoo[0]."""
    if setting == "homogeneous":
        return [zoo[0]] * num_clients
    return [zoo[k % len(zoo)] for k in range(num_clients)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_model(name: str, in_shape: tuple[int, ...], num_classes: int, d: int,
                   vocab_size: int = 0) -> dict[str, int]:
    """Parameters (phi, head, total) and forward FLOPs per sample (measured, eval mode) of a zoo model; a text
    model's on a text of max_len tokens, with autograd on (without it PyTorch runs LSTM and transformer layers as
    fused CPU kernels that the FLOP counter does not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(name, in_shape, num_classes, d, vocab_size).eval()
    sample = torch.ones(1, *in_shape, dtype=torch.int64) if vocab_size else torch.zeros(1, *in_shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(bool(vocab_size)):
        model(sample)
    return {"phi_params": count_parameters(model.phi), "head_params": count_parameters(model.head),
            "params": count_parameters(model), "forward_flops": int(counter.get_total_flops())}
