"""FedMRL (Yi et al., NeurIPS 2024): a shared small model beside the private one, fused by a private
projector into a nested ("Matryoshka") representation.

Client k holds its private model (phi_k -> R^d, head_k), a copy of the shared small model S (phi_S ->
R^d1, head_S: d1 -> C; the zoo's CNN-5, text_bow on text, with representation size d1 by default) and a
private projector P = Linear(d1 + d, d), no activation. One phase "local", everything trains:
    r = P([phi_S(x); phi_k(x)]);   L = CE(head_k(r), y) + CE(head_S(r[:, :d1]), y).
S starts every round from the global S and travels both ways; the server takes the sample-weighted mean
(weights: the clients' training sizes). Personalised inference: argmax head_k(P([phi_S(x); phi_k(x)]))
with the client's locally trained S.

The authors' script stores a reference to one shared module as every client's upload, so its "average" is
the last client's S, and keeps one optimiser (momentum) across clients; pfl averages truly and gives every
client round fresh optimisers. `fedmrl.small_dim` = 0 means d1 = d, the authors' heterogeneous setting.
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
from pfl.algorithms.fml import check_shared_model, known_model, shared_architecture
from pfl.errors import ConfigError
from pfl.models import build_model
from pfl.schema import Config


@dataclass(frozen=True)
class FedMRLSettings(Settings):
    small_dim: int = setting(0, "d1, representation size of the shared small model (<= representation_dim; "
                             "0: = representation_dim)", low=0)
    shared_model: str = setting("auto", "architecture of the shared small model (auto: cnn5 on images, text_bow on "
                                "text)", check=known_model)


class FedMRLClient(ClientModule):
    def __init__(self, model, small, projector: nn.Linear, cfg, transform, num_classes: int):
        super().__init__(model, cfg, transform, num_classes)
        self.small = small
        self.projector = projector
        self.small_dim = small.representation_dim

    def phases(self) -> list[Phase]:
        return [Phase("local", self.cfg.local_epochs, trains=[self.model, self.small, self.projector],
                      loss=self.nested_loss)]

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(torch.cat([self.small.phi(x), self.model.phi(x)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.representation(x))

    def nested_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = self.representation(x)
        return F.cross_entropy(self.model.head(r), y) + F.cross_entropy(self.small.head(r[:, :self.small_dim]), y)

    def receive(self, payload: Tensors) -> None:
        self.small.load_state_dict(unprefixed("small", payload))

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("small", self.small.state_dict()))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"small": self.small, "projector": self.projector}


@register
class FedMRL(Algorithm):
    name = "fedmrl"
    Settings = FedMRLSettings

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        d1, d = cls.Settings.from_config(cfg, cls.name).small_dim, cfg.representation_dim
        if d1 > d:
            raise ConfigError(f"recipe key 'fedmrl.small_dim': must be an integer in [0, {d}] "
                              f"(representation_dim), got {d1}")
        check_shared_model(cls.name, cfg)

    @property
    def small_dim(self) -> int:
        return self.settings.small_dim or self.spec.representation_dim

    def _small(self):
        return build_model(shared_architecture(self.settings.shared_model, self.spec.vocab_size > 0),
                           self.spec.image_shape, self.spec.num_classes, self.small_dim, self.spec.vocab_size)

    def make_client(self, arch: str) -> FedMRLClient:
        d = self.spec.representation_dim
        return FedMRLClient(self.private_model(arch), self._small(), nn.Linear(self.small_dim + d, d), self.cfg,
                            self.spec.transform, self.spec.num_classes)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("small", self._small().state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
