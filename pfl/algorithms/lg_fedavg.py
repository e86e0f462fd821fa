"""LG-FedAvg (Liang et al. 2020): private representation, shared head.

Each round the client's head (fc3, d -> C, the same shape for every architecture; or a deeper head when the
zoo gives every client the same one) starts from the global head, the whole local model trains on CE, and the
head goes back; the server takes the sample-weighted mean of the heads. Personalised inference: the client's
model as trained (its own latest head). A zoo whose clients' heads differ is refused: heads of different
structures have no mean.
"""

from __future__ import annotations

import torch

from pfl.algorithms.aggregation import robust_mean
from pfl.algorithms.base import (
    Algorithm,
    LocalClient,
    Tensors,
    Upload,
    cpu_clone,
    one_head,
    prefixed,
    register,
    unprefixed,
)


class LGFedAvgClient(LocalClient):
    def receive(self, payload: Tensors) -> None:
        with torch.no_grad():
            self.model.head.load_state_dict(unprefixed("head", payload))

    def upload(self) -> Tensors:
        return cpu_clone(prefixed("head", self.model.head.state_dict()))


@register
class LGFedAvg(Algorithm):
    name = "lg_fedavg"

    def make_client(self, arch: str) -> LGFedAvgClient:
        return LGFedAvgClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes)

    @classmethod
    def check_config(cls, cfg) -> None:
        one_head(cfg, cls.name, "its clients' heads")

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("head", self.common_head().state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
