"""pFedLoRA: private heterogeneous models, one shared homogeneous low-rank adapter, alternating training.

Client k predicts z = head_k(h) + g_theta(h) with h = phi_k(x) and g_theta(h) = (alpha / r) B A h.
Each round (docs/algorithms.md):
  phase "local"   (global -> local): theta frozen; phi_k and head_k train for `local_epochs` on
                  mu * CE(z, y) + (1 - mu) * CE(head_k(h), y);
  phase "adapter" (local -> global): phi_k and head_k frozen; theta trains for `adapter_epochs` on CE(z, y);
then theta_k and n_k go up and the server takes the sample-weighted mean of the adapters.

Choices made here, beyond the paper:
- Each phase starts a fresh SGD optimiser (no momentum carried across phases or rounds).
- In the adapter phase the frozen backbone runs in eval mode and without autograd (it is frozen, so its
  activations need no graph; batch-norm statistics of other zoo families stay untouched).
- Personalised inference uses the client's own latest adapter theta_k ("own", default) or the current
  global adapter ("global"): `pfedlora.inference_adapter`. Results record which.
- `alpha = 0` means alpha = rank (scaling 1), the default; `adapter_lr = 0` means the recipe's `lr`.
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
from pfl.models import LoRAAdapter, build_model
from pfl.schema import Config


@dataclass(frozen=True)
class PFedLoRASettings(Settings):
    rank: int = setting(8, "r, rank of the adapter (<= representation_dim)", low=1)
    alpha: float = setting(0.0, "LoRA alpha; the adapter is scaled by alpha / rank (0: alpha = rank)", low=0.0)
    mu: float = setting(1.0, "weight of CE(z, y) in the local phase; 1 - mu goes to CE(head(h), y)",
                        low=0.0, high=1.0, low_open=True)
    adapter_epochs: int = setting(1, "epochs of the adapter phase per round", low=1)
    adapter_lr: float = setting(0.0, "learning rate of the adapter phase (0: the recipe's lr)", low=0.0)
    inference_adapter: str = setting("own", "adapter used for personalised evaluation", choices=("own", "global"))

    @property
    def scaling_alpha(self) -> float:
        return self.alpha if self.alpha > 0 else float(self.rank)


class PFedLoRAClient(ClientModule):
    def __init__(self, model, adapter: LoRAAdapter, cfg: Config, transform, num_classes: int,
                 settings: PFedLoRASettings):
        super().__init__(model, cfg, transform, num_classes)
        self.adapter = adapter
        self.settings = settings

    def phases(self) -> list[Phase]:
        s = self.settings
        return [Phase("local", self.cfg.local_epochs, trains=[self.model], loss=self.local_loss),
                Phase("adapter", s.adapter_epochs, trains=[self.adapter], loss=self.adapter_loss,
                      lr=s.adapter_lr or None, eval_mode=[self.model])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.phi(x)
        return self.model.head(h) + self.adapter(h)

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.model.phi(x)
        head_logits = self.model.head(h)
        loss = F.cross_entropy(head_logits + self.adapter(h), y)
        mu = self.settings.mu
        return loss if mu == 1.0 else mu * loss + (1.0 - mu) * F.cross_entropy(head_logits, y)

    def adapter_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the backbone is frozen: no graph through it
            h = self.model.phi(x)
            head_logits = self.model.head(h)
        return F.cross_entropy(head_logits + self.adapter(h), y)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """How much the shared adapter moves predictions: mean |g(h)| / mean |head(h)| (the paper reports
        about 1% after phase 2 on Fashion-MNIST; docs/algorithms.md), and accuracy with and without it."""
        was_training = self.training
        self.eval()
        x = self.transform(x.to(self.device), train=False)
        y = y.to(self.device)
        h = self.model.phi(x)
        head_logits, adapter_logits = self.model.head(h), self.adapter(h)
        self.train(was_training)
        ratio = adapter_logits.abs().mean() / head_logits.abs().mean().clamp_min(1e-12)
        return {"adapter_logit_ratio": float(ratio),
                "train_acc_with_adapter": float(((head_logits + adapter_logits).argmax(1) == y).float().mean()),
                "train_acc_head_only": float((head_logits.argmax(1) == y).float().mean())}

    def receive(self, payload: Tensors) -> None:
        self.adapter.load_state_dict(unprefixed("adapter", payload))

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("adapter", self.adapter.state_dict()))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter}

    def prepare_eval(self, download: Tensors) -> None:
        if self.settings.inference_adapter == "global":
            self.receive(download)


@register
class PFedLoRA(Algorithm):
    name = "pfedlora"
    Settings = PFedLoRASettings
    SEARCH_SPACE = {"pfedlora.alpha": "log:4:128", "pfedlora.mu": "0.5:1.0"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        rank, d = cls.Settings.from_config(cfg, cls.name).rank, cfg.representation_dim
        if rank > d:
            raise ConfigError(f"recipe key 'pfedlora.rank': must be an integer in [1, {d}] "
                              f"(representation_dim), got {rank}")

    def evaluation_label(self) -> str:
        return (f"personalised: each client's model on its own test set; adapter used at inference: "
                f"{self.settings.inference_adapter}")

    def evaluation_reads_download(self) -> bool:
        return self.settings.inference_adapter == "global" or super().evaluation_reads_download()

    def _adapter(self) -> LoRAAdapter:
        return LoRAAdapter(self.spec.representation_dim, self.spec.num_classes, self.settings.rank,
                           self.settings.scaling_alpha)

    def make_client(self, arch: str) -> PFedLoRAClient:
        model = build_model(arch, self.spec.image_shape, self.spec.num_classes, self.spec.representation_dim)
        return PFedLoRAClient(model, self._adapter(), self.cfg, self.spec.transform, self.spec.num_classes,
                              self.settings)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("adapter", self._adapter().state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
