"""FedGH (Yi et al. 2023): a global head trained by the server on the clients' class prototypes.

Client: its head is replaced by the global head (d -> C, the same shape for every architecture; a deeper head
when the zoo gives every client the same one, and a zoo whose clients' heads differ is refused), the whole
local model trains on CE, then it sends per-class prototypes (`fedgh.prototypes_from`: the mean phi_k(x) per
class it holds, the trained model in eval mode, "after_training", default and HtFLlib's; or the mean of the
phi_k(x) its training steps computed, "training_pass"). Server: the global head trains by CE on the received
(prototype, class) pairs, all pairs in one full batch, `server_epochs` SGD steps at `server_lr` (momentum as
the recipe's, a fresh optimiser each round); that head is the next broadcast. No mean, so no weighting.

Personalised inference (`fedgh.inference`): "own", the client's model as trained, its head included
(default, the authors' code), or "global", its representation under the current global head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.aggregation import clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    PrototypeClient,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    cpu_clone,
    one_head,
    prefixed,
    register,
    setting,
    train_on_server,
    unprefixed,
)


@dataclass(frozen=True)
class FedGHSettings(Settings):
    server_epochs: int = setting(10, "full-batch SGD steps the server trains the global head per round", low=1)
    server_lr: float = setting(0.01, "learning rate of the server's head training", low=0.0, low_open=True)
    inference: str = setting("own", "head used for personalised evaluation: the client's own as trained, or the "
                             "current global head", choices=("own", "global"))
    prototypes_from: str = setting("after_training", "a client's prototypes: a pass of the trained model over its "
                                   "training set in eval mode (HtFLlib), or the mean of the representations its "
                                   "training steps computed (train mode, every local epoch)",
                                   choices=("after_training", "training_pass"))


class FedGHClient(PrototypeClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedGHSettings):
        super().__init__(model, cfg, transform, num_classes, settings.prototypes_from)
        self.settings = settings

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model.head(self.represent(x, y)), y)  # = CE(model(x), y)

    def receive(self, payload: Tensors) -> None:
        with torch.no_grad():
            self.model.head.load_state_dict(unprefixed("head", payload))

    def upload(self) -> Tensors:
        labels, protos, _ = self.prototypes()
        return {"labels": labels, "protos": protos}

    def prepare_eval(self, download: Tensors) -> None:
        if self.settings.inference == "global":
            self.receive(download)


@register
class FedGH(Algorithm):
    name = "fedgh"
    AGGREGATED = ("nothing but clipping: the server head trains on every received (prototype, class) pair, "
                  "no mean to replace; clipping bounds each upload's prototype table (the server holds no "
                  "prototypes)")
    Settings = FedGHSettings
    SEARCH_SPACE = {"fedgh.server_lr": "log:0.001:0.1", "fedgh.server_epochs": "int:1:20"}

    def make_client(self, arch: str) -> FedGHClient:
        return FedGHClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                           self.settings)

    def evaluation_label(self) -> str:
        head = "the current global head" if self.settings.inference == "global" else "its own head"
        return f"personalised: each client's representation on its own test set, with {head}"

    @classmethod
    def check_config(cls, cfg) -> None:
        one_head(cfg, cls.name, "its clients' heads")

    def _head(self) -> nn.Module:
        return self.common_head()

    def initial_global(self) -> Tensors:
        return cpu_clone(prefixed("head", self._head().state_dict()))

    def evaluation_reads_download(self) -> bool:
        return self.settings.inference == "global" or super().evaluation_reads_download()

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        head = self._head()
        head.load_state_dict(unprefixed("head", global_state))
        # no mean to make robust: the head trains on every pair; clipping bounds each upload's prototypes (the
        # server holds none, so the update is the prototype table itself)
        uploads = clip_uploads(uploads, self.rule.clip)
        protos = torch.cat([u.tensors["protos"] for u in uploads]).float()
        labels = torch.cat([u.tensors["labels"] for u in uploads])
        train_on_server(list(head.parameters()), protos, labels, lambda p, y: F.cross_entropy(head(p), y),
                        epochs=self.settings.server_epochs, lr=self.settings.server_lr, momentum=self.cfg.momentum)
        return cpu_clone(prefixed("head", head.state_dict()))

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"protos": (self.spec.representation_dim,)})
