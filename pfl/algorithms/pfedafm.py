"""pFedAFM (Yi et al. 2024): a shared small extractor mixed with the private one per dimension by a private,
trainable weight vector; only the shared extractor travels.

Client k holds its private model (phi_k -> R^d, head_k), a copy of the shared extractor phi_S -> R^d (the
zoo's CNN-5 representation by default, text_bow's on text) and a private alpha in [0, 1]^d (initialised to
1). Its prediction is
    z = head_k(alpha * phi_k(x) + (1 - alpha) * phi_S(x)).
With phi_S the global one, two phases each round:
  "local":  phi_k, head_k and alpha train on CE(z, y), phi_S frozen; alpha has its own learning rate
            (`pfedafm.alpha_lr`) and is clamped to [0, 1] after every step;
  "shared": phi_S trains on CE(head_k(phi_S(x)), y), everything else frozen.
phi_S goes up; the server takes the sample-weighted mean. Personalised inference: z with the phi_S the
client received this round (not the one it trained in the "shared" phase), as the authors' code does.

The authors' script keeps one alpha Parameter for all clients (so alpha is not personal from round 2), one
optimiser across clients, and an aliased upload that makes the "average" the last client's extractor; it
also ships the extractor's unused classifier. pfl keeps alpha per client, fresh optimisers per client
round, a true weighted mean, and sends phi_S only.
"""

from __future__ import annotations

import copy
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
from pfl.algorithms.fml import check_shared_model, known_model, shared_architecture
from pfl.schema import Config


@dataclass(frozen=True)
class PFedAFMSettings(Settings):
    alpha_lr: float = setting(0.01, "learning rate of the mixing weights alpha", low=0.0, low_open=True)
    shared_model: str = setting("auto", "architecture whose representation is the shared extractor (auto: cnn5 on "
                                "images, text_bow on text)", check=known_model)


class Mix(nn.Module):
    """The private mixing weights alpha in [0, 1]^d (1: only the client's own extractor)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))

    def clamp(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)


class PFedAFMClient(ClientModule):
    def __init__(self, model, shared: nn.Module, received: nn.Module, cfg, transform, num_classes: int,
                 settings: PFedAFMSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.shared = shared  # phi_S, trained in the "shared" phase and sent
        self.received = received  # phi_S as received this round: used in the "local" phase and for inference
        self.mix = Mix(model.representation_dim)
        self.settings = settings

    def phases(self) -> list[Phase]:
        mix = self.mix
        return [Phase("local", self.cfg.local_epochs, trains=[self.model, mix], loss=self.mixed_loss,
                      own_lr=[(mix.alpha, self.settings.alpha_lr)], after_step=mix.clamp, eval_mode=[self.received]),
                Phase("shared", self.cfg.local_epochs, trains=[self.shared], loss=self.shared_loss,
                      eval_mode=[self.model])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.mix.alpha
        return self.model.head(alpha * self.model.phi(x) + (1 - alpha) * self.received(x))

    def mixed_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), y)

    def shared_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model.head(self.shared(x)), y)

    def receive(self, payload: Tensors) -> None:
        shared = unprefixed("shared", payload)
        self.received.load_state_dict(shared)
        self.shared.load_state_dict(shared)

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("shared", self.shared.state_dict()))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"shared": self.received, "mix": self.mix}

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """How much the client leans on its own extractor: mean alpha (1: only phi_k, 0: only phi_S)."""
        return {"alpha_mean": float(self.mix.alpha.mean())}


@register
class PFedAFM(Algorithm):
    name = "pfedafm"
    Settings = PFedAFMSettings
    SEARCH_SPACE = {"pfedafm.alpha_lr": "log:0.001:0.3", "weight_decay": "log:1e-5:1e-2"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_shared_model(cls.name, cfg)

    def _shared(self) -> nn.Module:
        return self.private_model(shared_architecture(self.settings.shared_model, self.spec.vocab_size > 0)).phi

    def make_client(self, arch: str) -> PFedAFMClient:
        model, shared = self.private_model(arch), self._shared()
        return PFedAFMClient(model, shared, copy.deepcopy(shared), self.cfg,
                             self.spec.transform, self.spec.num_classes, self.settings)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("shared", self._shared().state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
