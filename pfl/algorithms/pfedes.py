"""pFedES (Yi et al., AAAI 2025): a tiny shared feature extractor G that turns an image into an image-shaped
"enhanced" input; only G travels.

G = Conv2d(c, 8, 3, same) - ReLU - Conv2d(8, c, 3, same) - ReLU (c the image channels; 443 parameters at
c = 3). Client k, with G the global one, alternates two phases each round:
  "local":     E epochs, G frozen, the private model F_k = head_k . phi_k trains on
               (1 - mu) CE(F_k(x), y) + mu CE(F_k(G(x)), y);
  "extractor": E + `extra_epochs` epochs, F_k frozen (in eval mode; gradients flow through it), G trains on
               CE(F_k(G(x)), y).
G goes up; the server takes the sample-weighted mean. Personalised inference: argmax F_k(x) on the raw
input; G is not used.

Images only: on a text data set the recipe is refused (token ids have no input space for G to enhance).
As in the authors' code, G ends in a ReLU, so G(x) >= 0 while x is normalised. The authors keep one
optimiser for G across clients (shared momentum); pfl gives every client round fresh optimisers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.aggregation import robust_mean
from pfl.algorithms.base import (
    Algorithm,
    ClientModule,
    Phase,
    Settings,
    Tensors,
    Upload,
    cpu_clone,
    prefixed,
    register,
    setting,
    unprefixed,
)
from pfl.errors import ConfigError
from pfl.schema import Config


@dataclass(frozen=True)
class PFedESSettings(Settings):
    mu: float = setting(0.5, "weight of the CE on enhanced inputs G(x) in the local phase", low=0.0, high=1.0)
    extra_epochs: int = setting(10, "the extractor phase runs local_epochs + this many epochs", low=0)


def make_extractor(channels: int) -> nn.Sequential:
    """G: image -> image of the same shape."""
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding="same"), nn.ReLU(),
                         nn.Conv2d(8, channels, 3, padding="same"), nn.ReLU())


class PFedESClient(ClientModule):
    def __init__(self, model, extractor: nn.Sequential, cfg, transform, num_classes: int, settings: PFedESSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.extractor = extractor
        self.settings = settings

    def phases(self) -> list[Phase]:
        return [Phase("local", self.cfg.local_epochs, trains=[self.model], loss=self.local_loss),
                Phase("extractor", self.cfg.local_epochs + self.settings.extra_epochs, trains=[self.extractor],
                      loss=self.enhanced_loss, eval_mode=[self.model])]

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu = self.settings.mu
        return (1 - mu) * F.cross_entropy(self.model(x), y) + mu * self.enhanced_loss(x, y)

    def enhanced_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(self.extractor(x)), y)

    def receive(self, payload: Tensors) -> None:
        self.extractor.load_state_dict(unprefixed("extractor", payload))

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("extractor", self.extractor.state_dict()))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"extractor": self.extractor}


@register
class PFedES(Algorithm):
    name = "pfedes"
    Settings = PFedESSettings
    SEARCH_SPACE = {"pfedes.mu": "0.1:0.9", "pfedes.extra_epochs": "int:0:10"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.is_text:
            raise ConfigError(f"recipe key 'method': pfedes trains a convolution G that maps an image to an enhanced "
                              f"image, and token ids of the text data set {cfg.dataset} have no such input space to "
                              f"enhance; use pfedes on images, or another method on text")

    def make_client(self, arch: str) -> PFedESClient:
        return PFedESClient(self.private_model(arch), make_extractor(self.spec.image_shape[0]), self.cfg,
                            self.spec.transform, self.spec.num_classes, self.settings)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("extractor", make_extractor(self.spec.image_shape[0]).state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
