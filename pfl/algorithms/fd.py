"""FD, federated distillation (Jeong et al. 2018): clients share per-class mean logits, no extra module.

Client k, one phase "local", the whole private model: z = head_k(phi_k(x)) and
    L = CE(z, y) + lambda * CE(z, softmax(t_y)),
t_y the global mean logit of class y; samples whose class has no global logit yet (round 1, or a class
nobody has sent) get CE only. Every training-time logit z_i (detached) is summed into its class; after
training the client sends, for each class it saw, the mean of those logits.
Server: the global logit of class c is the unweighted mean over the clients that sent c this round (a
client's own logits included); a class nobody sent this round keeps its previous global logit.
Personalised inference: argmax z.

The distillation term is CE against softmax(t), on the samples that have a target only: the field's
benchmark library has used MSE(t, z), then CE(z, softmax(t)), and at its latest commit CE(z, t) on raw
logits, which treats logits as probabilities and collapses to chance (docs/algorithms.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfl.algorithms.aggregation import class_means, class_reference, clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    LocalClient,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    register,
    setting,
)


@dataclass(frozen=True)
class FDSettings(Settings):
    lam: float = setting(1.0, "weight of the distillation term CE(z, softmax(global logit of y))", key="lambda",
                         low=0.0)


class FDClient(LocalClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FDSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.lam = settings.lam
        c = num_classes
        self.register_buffer("targets", torch.zeros(c, c), persistent=False)  # global mean logit per class
        self.register_buffer("known", torch.zeros(c), persistent=False)  # 1.0 where a global logit exists
        self.register_buffer("logit_sums", torch.zeros(c, c), persistent=False)  # this round's training logits
        self.register_buffer("logit_counts", torch.zeros(c), persistent=False)

    def receive(self, payload: Tensors) -> None:
        self.targets.zero_()
        self.known.zero_()
        labels = payload["labels"].to(self.known.device)
        self.targets[labels] = payload["logits"].to(self.targets)
        self.known[labels] = 1.0

    def on_train_start(self) -> None:
        super().on_train_start()
        # the round's logits start here, after the engine's FLOP measurement step
        self.logit_sums.zero_()
        self.logit_counts.zero_()

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        with torch.no_grad():
            self.logit_sums.index_add_(0, y, z.detach().float())
            self.logit_counts.index_add_(0, y, torch.ones_like(y, dtype=self.logit_counts.dtype))
        weight = self.known[y]
        soft = F.softmax(self.targets[y], dim=1)
        distill = -(soft * F.log_softmax(z.float(), dim=1)).sum(dim=1)
        return F.cross_entropy(z, y) + self.lam * (distill * weight).sum() / weight.sum().clamp_min(1.0)

    def upload(self) -> Tensors:
        present = torch.nonzero(self.logit_counts > 0).flatten()
        means = self.logit_sums[present] / self.logit_counts[present, None]
        return {"labels": present.cpu(), "logits": means.cpu()}


@register
class FD(Algorithm):
    name = "fd"
    AGGREGATED = ("per-class logits, per class over its senders (mean: unweighted); clipping against the "
                  "class's global logits")
    Settings = FDSettings
    SEARCH_SPACE = {"fd.lambda": "log:0.01:10", "weight_decay": "log:1e-5:1e-2"}

    def make_client(self, arch: str) -> FDClient:
        return FDClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                        self.settings)

    def initial_global(self) -> Tensors:
        return {"labels": torch.zeros(0, dtype=torch.int64), "logits": torch.zeros(0, self.spec.num_classes)}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        c = self.spec.num_classes
        known = {"logits": global_state["logits"]}
        uploads = clip_uploads(uploads, self.rule.clip,
                               lambda u: class_reference(u.tensors["labels"], global_state["labels"], known, c))
        means, sent = class_means([(u.tensors["labels"], u.tensors["logits"], None) for u in uploads], c, self.rule)
        logits = torch.zeros(c, c, dtype=torch.float64)
        have = torch.zeros(c, dtype=torch.bool)
        logits[global_state["labels"]] = global_state["logits"].double()  # classes nobody sent: keep
        have[global_state["labels"]] = True
        logits[sent] = means[sent]
        have |= sent
        labels = torch.nonzero(have).flatten()
        return {"labels": labels, "logits": logits[labels].float()}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"logits": (self.spec.num_classes,)})
