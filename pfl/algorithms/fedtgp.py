"""FedTGP (Zhang et al., AAAI 2024): trainable global prototypes with an adaptive-margin contrastive loss.

Client k, one phase "local", the whole private model: r = phi_k(x) and
    L = CE(head_k(r), y) + lambda * MSE(r, P_y)
(MSE averaged over batch x d), P the global prototypes; the term is absent until the server has trained
them. After training the client sends, for each class it holds, its prototype (`fedtgp.prototypes_from`):
the mean of phi_k(x) over its training samples with the trained model in eval mode ("after_training",
default), with the model as it was before this round's training ("before_training": the authors' code and
HtFLlib), or the mean of the phi_k(x) its training steps computed ("training_pass").
Server: a prototype generator G = Embedding(C, d) -> Linear(d, d) + ReLU -> Linear(d, d), kept across
rounds. Each round: Q_c = unweighted mean of the received prototypes of class c; gap_c = distance from
Q_c to the nearest other Q_c' (a class without one gets the smallest gap); margin delta = min(max_c gap_c,
`margin_max`). Then `server_epochs` epochs of SGD (lr = the recipe's lr, no momentum, mini-batches of the
recipe's batch size, shuffled) over every received (prototype p, class y) pair on
    CE(-(D + delta * onehot(y)), y),   D_j = ||p - G(j)||_2  (clamped at 1e-12 before the root),
and P_c = G(c) is the next broadcast (all C classes). Personalised inference: the class of the nearest
global prototype, argmin_c ||phi_k(x) - P_c||^2; the head is not used.

The authors' code computes the uploaded prototypes with the round-start model (it reloads the model
before saving the trained one); pfl sends those of the trained model by default, as the method describes.
The server's class means are unweighted, as in the authors' code: there is no count to weigh by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.aggregation import class_means, clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    PrototypeClient,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    cpu_clone,
    prefixed,
    register,
    setting,
    train_on_server,
    unprefixed,
)
from pfl.algorithms.fedproto import nearest_prototype_scores
from pfl.seeding import derive_seed


@dataclass(frozen=True)
class FedTGPSettings(Settings):
    lam: float = setting(1.0, "weight of the MSE term pulling phi_k(x) to the global prototype of y", key="lambda",
                         low=0.0)
    server_epochs: int = setting(100, "epochs the server trains the prototype generator per round", low=1)
    margin_max: float = setting(100.0, "tau, the largest adaptive margin", low=0.0)
    prototypes_from: str = setting("after_training", "a client's prototypes: a pass over its training set in eval "
                                   "mode of the trained model, or of the model before this round's training (the "
                                   "authors' code, HtFLlib), or the mean of the representations its training "
                                   "steps computed (train mode, every local epoch)",
                                   choices=("after_training", "before_training", "training_pass"))


class PrototypeGenerator(nn.Module):
    """The server's trainable global prototypes: class index -> R^d."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.out = nn.Linear(dim, dim)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.out(self.middle(self.embedding(classes)))


def class_gaps(means: torch.Tensor) -> torch.Tensor:
    """gap_c = min_{c' != c} ||Q_c - Q_c'|| over the given class means [m, d]; with one class, +inf."""
    distance = torch.cdist(means.double(), means.double())
    distance.fill_diagonal_(float("inf"))
    return distance.min(dim=1).values


def adaptive_margin(means: torch.Tensor, margin_max: float) -> float:
    """delta = min(max_c gap_c, tau); classes without a gap take the smallest gap (tau when none has one)."""
    gaps = class_gaps(means)
    finite = gaps[torch.isfinite(gaps)]
    if len(finite) == 0:
        return float(margin_max)
    return float(min(float(finite.max()), margin_max))


def margin_loss(generator: PrototypeGenerator, protos: torch.Tensor, labels: torch.Tensor, margin: float,
                num_classes: int) -> torch.Tensor:
    """CE(-(D + delta * onehot(y)), y) with D_j = ||p - G(j)||: pull p to its class, push it delta further from
    the others."""
    g = generator(torch.arange(num_classes))
    squared = protos.pow(2).sum(1, keepdim=True) - 2 * protos @ g.T + g.pow(2).sum(1)[None, :]
    distance = squared.clamp_min(1e-12).sqrt()
    return F.cross_entropy(-(distance + margin * F.one_hot(labels, num_classes)), labels)


class FedTGPClient(PrototypeClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedTGPSettings):
        super().__init__(model, cfg, transform, num_classes, settings.prototypes_from)
        self.lam = settings.lam
        self.register_buffer("global_protos", torch.zeros(num_classes, model.representation_dim), persistent=False)
        self.register_buffer("known", torch.zeros(num_classes), persistent=False)

    def receive(self, payload: Tensors) -> None:
        if "protos" in payload:
            self.global_protos.copy_(payload["protos"].to(self.global_protos))
            self.known.fill_(1.0)
        else:  # before the server's first step
            self.global_protos.zero_()
            self.known.zero_()

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = self.represent(x, y)
        ce = F.cross_entropy(self.model.head(r), y)
        # known is all ones or all zeros: the term is on (MSE over batch x d) or absent, without a host sync
        return ce + self.lam * self.known[0] * F.mse_loss(r.float(), self.global_protos[y])

    def prepare_eval(self, download: Tensors) -> None:
        self.receive(download)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_prototype_scores(self.model.phi(x), self.global_protos, self.known)

    def upload(self) -> Tensors:
        labels, protos, _ = self.prototypes()
        return {"labels": labels, "protos": protos}


@register
class FedTGP(Algorithm):
    name = "fedtgp"
    AGGREGATED = ("the per-class prototype means that set the margin (the generator trains on every pair, "
                  "clipped); clipping against the class's global prototype (none before the first server "
                  "step)")
    Settings = FedTGPSettings
    SEARCH_SPACE = {"fedtgp.lambda": "log:0.1:100", "fedtgp.margin_max": "log:1:1000"}

    def make_client(self, arch: str) -> FedTGPClient:
        return FedTGPClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                            self.settings)

    def evaluation_label(self) -> str:
        return "personalised: each client's representation on its own test set, nearest global prototype"

    def _generator(self) -> PrototypeGenerator:
        return PrototypeGenerator(self.spec.num_classes, self.spec.representation_dim)

    def initial_global(self) -> Tensors:
        """The generator (kept on the server) and a round counter; no prototypes before the first step."""
        return {**cpu_clone(prefixed("generator", self._generator().state_dict())), "round": torch.tensor(0)}

    def evaluation_reads_download(self) -> bool:
        return True  # the nearest global prototype predicts

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        return {"protos": global_state["protos"]} if "protos" in global_state else {}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        c = self.spec.num_classes
        # clipping: a prototype's update is the prototype minus the current global one of its class (none
        # before the first server step: the prototype itself); the generator trains on the clipped pairs
        known = global_state.get("protos")
        uploads = clip_uploads(uploads, self.rule.clip,
                               None if known is None else lambda u: {"protos": known[u.tensors["labels"]]})
        protos = torch.cat([u.tensors["protos"] for u in uploads]).float()
        labels = torch.cat([u.tensors["labels"] for u in uploads])
        # the class means that set the margin: mean, or the rule's median / trimmed mean over the senders
        means, present = class_means([(labels, protos, None)], c, self.rule)
        margin = adaptive_margin(means[present], self.settings.margin_max)
        generator = self._generator()
        generator.load_state_dict(unprefixed("generator", global_state))
        round_idx = int(global_state["round"]) + 1
        train_on_server(list(generator.parameters()), protos, labels,
                        lambda p, y: margin_loss(generator, p, y, margin, c),
                        epochs=self.settings.server_epochs, lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                        seed=derive_seed(self.cfg.seed, "fedtgp-server", round_idx))
        with torch.no_grad():
            global_protos = generator(torch.arange(c))
        return {**cpu_clone(prefixed("generator", generator.state_dict())), "round": torch.tensor(round_idx),
                "protos": global_protos.detach().clone(), "margin": torch.tensor(margin)}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"protos": (self.spec.representation_dim,)})
