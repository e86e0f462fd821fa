"""FML (Shen et al. 2020), federated mutual learning: a shared "meme" model beside each private model.

Each round the client's meme starts from the global meme; then, on every batch, both models learn from
the labels and from each other (deep mutual learning):
    local: alpha * CE(f_k(x), y) + (1 - alpha) * KL(p_meme || p_local)
    meme:  beta  * CE(m(x), y)   + (1 - beta)  * KL(p_local || p_meme)
where the other model's distribution is a fixed target (no gradient through it). Both losses are summed
into one step of one SGD optimiser over both models, which is the same update as two optimisers with the
same settings. The meme goes to the server, which takes the sample-weighted mean. The meme is the same
architecture for every client (`fml.shared_model`, CNN-5 in the paper; "auto": CNN-5 on images, text_bow
on text). Personalised inference: the local model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def kl_to(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), batch mean, no gradient into the target."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target_logits.detach(), dim=1),
                    reduction="batchmean", log_target=True)


def known_model(name: str) -> str | None:
    """Check of a `shared_model` setting: "auto" or a zoo architecture."""
    from pfl.models import MODEL_REGISTRY

    if name == "auto" or name in MODEL_REGISTRY:
        return None
    return f"unknown model {name!r}; known: auto, {', '.join(sorted(MODEL_REGISTRY))}"


def shared_architecture(name: str, text: bool) -> str:
    """The architecture a `shared_model` setting names: itself, or for "auto" the small model of the data set's
    modality: CNN-5 on images (the papers' choice), text_bow (the cheapest text family) on text."""
    if name != "auto":
        return name
    return "text_bow" if text else "cnn5"


def check_shared_model(method: str, cfg: Config) -> None:
    """`check_config` of a method with a `shared_model`: it must read the recipe's data set (text or images)."""
    from pfl.models.text import modality_problem

    name = cfg[f"{method}.shared_model"]
    problem = modality_problem(shared_architecture(name, cfg.is_text), cfg.dataset, cfg.is_text)
    if problem:
        raise ConfigError(f"recipe key '{method}.shared_model': {problem}")


@dataclass(frozen=True)
class FMLSettings(Settings):
    alpha: float = setting(0.5, "weight of CE in the local model's loss (1 - alpha: KL to the meme)",
                           low=0.0, high=1.0)
    beta: float = setting(0.5, "weight of CE in the meme's loss (1 - beta: KL to the local model)",
                          low=0.0, high=1.0)
    shared_model: str = setting("auto", "architecture of the shared meme model (auto: cnn5 on images, text_bow on "
                                "text)", check=known_model)


class FMLClient(ClientModule):
    def __init__(self, model, meme, cfg, transform, num_classes: int, settings: FMLSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.meme = meme
        self.alpha, self.beta = settings.alpha, settings.beta

    def phases(self) -> list[Phase]:
        return [Phase("mutual", self.cfg.local_epochs, trains=[self.model, self.meme], loss=self.mutual_loss)]

    def mutual_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        local, meme = self.model(x), self.meme(x)
        local_loss = self.alpha * F.cross_entropy(local, y) + (1 - self.alpha) * kl_to(meme, local)
        meme_loss = self.beta * F.cross_entropy(meme, y) + (1 - self.beta) * kl_to(local, meme)
        return local_loss + meme_loss

    def receive(self, payload: Tensors) -> None:
        self.meme.load_state_dict(unprefixed("meme", payload))

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("meme", self.meme.state_dict()))


@register
class FML(Algorithm):
    name = "fml"
    Settings = FMLSettings
    SEARCH_SPACE = {"fml.alpha": "0.1:0.9", "fml.beta": "0.1:0.9"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        check_shared_model(cls.name, cfg)

    @property
    def shared_model(self) -> str:
        return shared_architecture(self.settings.shared_model, self.spec.vocab_size > 0)

    def make_client(self, arch: str) -> FMLClient:
        return FMLClient(self.private_model(arch), self.private_model(self.shared_model), self.cfg,
                         self.spec.transform, self.spec.num_classes, self.settings)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("meme", self.private_model(self.shared_model).state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
