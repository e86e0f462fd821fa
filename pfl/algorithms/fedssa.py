"""FedSSA (Yi et al., IJCAI 2024): the head is shared class by class, with a decaying fusion of the global rows.

Client k owns the classes C_k of its training data. On receiving the global head (W_g, b_g) in round t
(counted from 0), for every owned class c:
    W_k[c] <- alpha_t W_k[c] + W_g[c]   (same for b_k[c]),   alpha_t = mu0 cos(t pi / (2T)) for t <= T, else 0
(as the authors' code has it; this is not a convex combination). Then one phase "local": the whole private
model trains on CE. The client sends its head's rows of the classes it owns (weight [m, d], bias [m]).
Server: it keeps every client's latest rows; W_g[c] is the unweighted mean of the latest row of every
client that has sent class c, as in the authors' code (no class counts travel, so no weighted variant;
clients not sampled this round contribute their stale rows); rows of classes nobody has sent keep their
initial values. Personalised inference: the client's model as trained.

The authors' simulation knows every client's classes before round 1, so their first average includes the
initial rows of clients not yet sampled; a pfl server only learns a client's classes from its first
upload. With full participation the two agree. A head deeper than one linear layer has no class rows on the
shared representation, so a zoo with such heads (`<extractor>+h...`) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pfl.algorithms.aggregation import clip_uploads, dense_class_means
from pfl.algorithms.base import (
    Algorithm,
    LocalClient,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    cpu_clone,
    register,
    setting,
)
from pfl.errors import ConfigError


@dataclass(frozen=True)
class FedSSASettings(Settings):
    mu0: float = setting(0.5, "weight of the local rows in the fusion at round 0", low=0.0)
    decay_rounds: int = setting(2, "T: the local rows' weight decays to 0 over this many rounds (cosine)", low=1)


def fusion_weight(settings: FedSSASettings, t: int) -> float:
    """alpha_t = mu0 cos(t pi / 2T) for t <= T (t from 0), else 0."""
    if t > settings.decay_rounds:
        return 0.0
    return settings.mu0 * math.cos(t * math.pi / (2 * settings.decay_rounds))


class FedSSAClient(LocalClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedSSASettings):
        super().__init__(model, cfg, transform, num_classes)
        self.settings = settings

    def owned_classes(self) -> torch.Tensor:
        """C_k: the classes of the client's training data."""
        return torch.unique(self.data.y_train)

    def start(self, payload: Tensors) -> None:
        """A new client keeps its own initial head; the first fusion happens when round 1 is received."""

    def receive(self, payload: Tensors) -> None:
        alpha = fusion_weight(self.settings, int(payload["round"]))
        owned = self.owned_classes().to(self.model.head.weight.device)
        head = self.model.head
        with torch.no_grad():
            head.weight[owned] = alpha * head.weight[owned] + payload["weight"].to(head.weight)[owned]
            head.bias[owned] = alpha * head.bias[owned] + payload["bias"].to(head.bias)[owned]

    def upload(self) -> Tensors:
        owned = self.owned_classes()
        head = self.model.head
        return {"labels": owned, "weight": head.weight.detach()[owned.to(head.weight.device)].cpu().clone(),
                "bias": head.bias.detach()[owned.to(head.bias.device)].cpu().clone()}


@register
class FedSSA(Algorithm):
    name = "fedssa"
    AGGREGATED = ("per-class head rows, per class over every client's latest rows (mean: unweighted); "
                  "clipping against the global head's rows")
    Settings = FedSSASettings
    SEARCH_SPACE = {"fedssa.mu0": "0.0:1.0", "fedssa.decay_rounds": "int:1:50"}

    @classmethod
    def check_config(cls, cfg) -> None:
        from pfl.models import assign_architectures, split_architecture

        deep = sorted({a for a in assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
                       if split_architecture(a)[1]})
        if deep:
            raise ConfigError(f"recipe key 'model_zoo': method fedssa shares the rows of a single linear head "
                              f"d -> C, but {', '.join(deep)} have deeper heads; use architectures without a head "
                              f"suffix (+h...)")

    def make_client(self, arch: str) -> FedSSAClient:
        return FedSSAClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                            self.settings)

    def initial_global(self) -> Tensors:
        """The global head, the round counter, and every client's latest rows (none sent yet)."""
        n, c, d = self.cfg.num_clients, self.spec.num_classes, self.spec.representation_dim
        head = cpu_clone(nn.Linear(d, c).state_dict())
        return {"weight": head["weight"], "bias": head["bias"], "round": torch.tensor(0),
                "client_weight": torch.zeros(n, c, d), "client_bias": torch.zeros(n, c),
                "client_owns": torch.zeros(n, c, dtype=torch.bool)}

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        return {k: global_state[k] for k in ("weight", "bias", "round")}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        state = {k: v.clone() for k, v in global_state.items()}
        # clipping: a row's update is the row minus the current global head's row of its class
        uploads = clip_uploads(uploads, self.rule.clip, lambda u: {
            "weight": global_state["weight"][u.tensors["labels"]], "bias": global_state["bias"][u.tensors["labels"]]})
        for u in uploads:
            labels = u.tensors["labels"]
            state["client_weight"][u.client_id, labels] = u.tensors["weight"].float()
            state["client_bias"][u.client_id, labels] = u.tensors["bias"].float()
            state["client_owns"][u.client_id, labels] = True
        owners = state["client_owns"].sum(0)  # [C]
        sent = owners > 0
        # mean: unweighted over the owners; median, trimmed_mean: the same rows, per class
        weight = dense_class_means(state["client_weight"], state["client_owns"], self.rule)
        bias = dense_class_means(state["client_bias"], state["client_owns"], self.rule)
        state["weight"][sent] = weight[sent].float()
        state["bias"][sent] = bias[sent].float()
        state["round"] = global_state["round"] + 1
        return state

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"weight": (self.spec.representation_dim,), "bias": ()})
