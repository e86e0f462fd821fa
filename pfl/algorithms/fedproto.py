"""FedProto (Tan et al. 2022): clients share per-class prototypes (mean representation h per class).

Client: CE(f_k(x), y) + lambda * MSE(h, P[y]), P the global prototypes; samples whose class has no global
prototype yet (round 1, or a class no client has sent) get CE only. After training the client sends, for
each class it holds, its prototype p_kc and its sample count n_kc. `fedproto.prototypes_from`: the mean of
phi_k(x) over its training samples with the trained model in eval mode ("after_training", default), or the
mean of the phi_k(x) its training steps computed ("training_pass": train mode, every local epoch, the last
partial batch included, as HtFLlib collects them; HtFLlib's loader drops partial batches, pfl trains on them).
Server (`fedproto.server_mean`): global prototype of class c = sum_k n_kc p_kc / sum_k n_kc over this round's
senders ("weighted", default, the paper as pfl reads it), or sum_k p_kc / |senders of c| ("unweighted",
HtFLlib's and the authors' code); a class no sampled client holds keeps its previous global prototype (HtFLlib
drops it; with full participation the same).

Personalised inference (`fedproto.inference`): "head", the client's model as trained (default), or
"prototype", the class of the nearest global prototype to phi_k(x) (squared Euclidean distance; classes
without a global prototype are never predicted), the rule of the field's benchmark library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfl.algorithms.aggregation import class_means, class_reference, clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    PrototypeClient,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    register,
    setting,
)


@dataclass(frozen=True)
class FedProtoSettings(Settings):
    lam: float = setting(1.0, "weight of the prototype MSE term", key="lambda", low=0.0)
    inference: str = setting("head", "personalised prediction: the client's head, or its nearest global prototype",
                             choices=("head", "prototype"))
    server_mean: str = setting("weighted", "the server's per-class mean: weighted by the senders' class sample "
                               "counts, or unweighted (every sender of the class counts once: HtFLlib, the "
                               "authors' code)", choices=("weighted", "unweighted"))
    prototypes_from: str = setting("after_training", "a client's prototypes: a pass of the trained model over its "
                                   "training set in eval mode, or the mean of the representations its training "
                                   "steps computed (train mode, every local epoch: HtFLlib)",
                                   choices=("after_training", "training_pass"))


def nearest_prototype_scores(h: torch.Tensor, protos: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Class scores of the nearest-prototype rule: -||h - P_c||^2, and -inf for classes without a prototype."""
    distance = torch.cdist(h.float(), protos.float()).pow(2)
    return (-distance).masked_fill(known[None, :] == 0, float("-inf"))


class FedProtoClient(PrototypeClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedProtoSettings):
        super().__init__(model, cfg, transform, num_classes, settings.prototypes_from)
        self.settings = settings
        self.lam = settings.lam
        d = model.representation_dim
        self.register_buffer("global_protos", torch.zeros(num_classes, d), persistent=False)
        self.register_buffer("known", torch.zeros(num_classes), persistent=False)  # 1.0 where P[c] exists

    def receive(self, payload: Tensors) -> None:
        self.global_protos.zero_()
        self.known.zero_()
        labels = payload["labels"].to(self.known.device)
        self.global_protos[labels] = payload["protos"].to(self.global_protos)
        self.known[labels] = 1.0

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.represent(x, y)
        ce = F.cross_entropy(self.model.head(h), y)
        # per-sample MSE, averaged over the samples whose class has a prototype (no host sync)
        weight = self.known[y]
        per_sample = (h.float() - self.global_protos[y]).pow(2).mean(dim=1)
        return ce + self.lam * (per_sample * weight).sum() / weight.sum().clamp_min(1.0)

    def prepare_eval(self, download: Tensors) -> None:
        if self.settings.inference == "prototype":
            self.receive(download)  # the current global prototypes (only buffers change)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.inference == "prototype":
            return nearest_prototype_scores(self.model.phi(x), self.global_protos, self.known)
        return self(x)

    def upload(self) -> Tensors:
        labels, protos, counts = self.prototypes()
        return {"labels": labels, "protos": protos, "counts": counts}


@register
class FedProto(Algorithm):
    name = "fedproto"
    AGGREGATED = ("per-class prototypes, per class over its senders (mean: count-weighted, or unweighted with "
                  "fedproto.server_mean = unweighted); clipping against the class's previous global prototype, "
                  "or zero for a class without one")
    Settings = FedProtoSettings
    SEARCH_SPACE = {"fedproto.lambda": "log:0.01:10", "weight_decay": "log:1e-5:1e-2"}

    def make_client(self, arch: str) -> FedProtoClient:
        return FedProtoClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                              self.settings)

    def evaluation_label(self) -> str:
        rule = "nearest global prototype" if self.settings.inference == "prototype" else "its own head"
        return f"personalised: each client's model on its own test set, predicting by {rule}"

    def evaluation_reads_download(self) -> bool:
        return self.settings.inference == "prototype" or super().evaluation_reads_download()

    def initial_global(self) -> Tensors:
        return {"labels": torch.zeros(0, dtype=torch.int64),
                "protos": torch.zeros(0, self.spec.representation_dim)}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        c, d = self.spec.num_classes, self.spec.representation_dim
        known = {"protos": global_state["protos"]}
        uploads = clip_uploads(uploads, self.rule.clip,
                               lambda u: class_reference(u.tensors["labels"], global_state["labels"], known, c))
        # mean: weighted by the class counts, or unweighted; median, trimmed_mean: per class over its senders,
        # unweighted either way
        weighted = self.settings.server_mean == "weighted"
        means, sent = class_means([(u.tensors["labels"], u.tensors["protos"], u.tensors["counts"] if weighted else None)
                                   for u in uploads], c, self.rule)
        protos = torch.zeros(c, d, dtype=torch.float64)
        have = torch.zeros(c, dtype=torch.bool)
        protos[global_state["labels"]] = global_state["protos"].double()  # classes nobody sent: keep
        have[global_state["labels"]] = True
        protos[sent] = means[sent]
        have |= sent
        labels = torch.nonzero(have).flatten()
        return {"labels": labels, "protos": protos[labels].float()}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"protos": (self.spec.representation_dim,)},
            counts_within=upload.num_samples)
