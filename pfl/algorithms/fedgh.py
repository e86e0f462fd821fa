"""FedGH (Yi et al. 2023): a global head trained by the server on the clients' class prototypes.

Client: its head is replaced by the global head (d -> C, the same shape for every architecture), the whole
local model trains on CE, then it sends per-class prototypes (mean phi_k(x) per class it holds, model in
eval mode). Server: the global head trains by CE on the received (prototype, class) pairs, all pairs in one
full batch, `server_epochs` SGD steps at `server_lr` (momentum as the recipe's, a fresh optimiser each
round); that head is the next broadcast. Personalised inference: the client's model as trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.base import (Algorithm, LocalClient, Tensors, Upload, class_prototypes, cpu_clone, prefixed,
                                 prototype_problem, unprefixed)
from pfl.schema import Field


class FedGHClient(LocalClient):
    def receive(self, payload: Tensors) -> None:
        with torch.no_grad():
            self.model.head.load_state_dict(unprefixed("head", payload))

    def upload(self, x_train, y_train) -> Tensors:
        labels, protos, _ = class_prototypes(self.model, self.transform, x_train, y_train, self.num_classes)
        return {"labels": labels, "protos": protos}


class FedGH(Algorithm):
    name = "fedgh"
    SETTINGS = {
        "server_epochs": Field("int", 10, "full-batch SGD steps the server trains the global head per round",
                               low=1),
        "server_lr": Field("float", 0.01, "learning rate of the server's head training", low=0.0,
                           low_open=True),
    }
    SEARCH_SPACE = {"fedgh.server_lr": "log:0.001:0.1", "fedgh.server_epochs": "int:1:20"}

    def make_client(self, arch: str) -> FedGHClient:
        return FedGHClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes)

    def _head(self) -> nn.Linear:
        return nn.Linear(self.spec.representation_dim, self.spec.num_classes)

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("head", self._head().state_dict()))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        head = self._head()
        head.load_state_dict(unprefixed("head", global_state))
        protos = torch.cat([u.tensors["protos"] for u in uploads]).float()
        labels = torch.cat([u.tensors["labels"] for u in uploads])
        optimiser = torch.optim.SGD(head.parameters(), lr=self.settings["server_lr"], momentum=self.cfg.momentum)
        with torch.enable_grad():
            for _ in range(self.settings["server_epochs"]):
                optimiser.zero_grad()
                F.cross_entropy(head(protos), labels).backward()
                optimiser.step()
        return cpu_clone(prefixed("head", head.state_dict()))

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or prototype_problem(
            upload.tensors, self.spec.num_classes, self.spec.representation_dim, with_counts=False)
