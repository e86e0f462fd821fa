"""FedGen (Zhu, Hong, Zhou, ICML 2021): a server-side generator of representations distils the clients' heads
into every client, without data. Model-heterogeneous form (as the field's benchmark library runs it): only the
heads are knowledge; extractors stay private.

Server: a label-conditioned generator G(eps, y) -> R^d (eps ~ N(0, I), y one-hot; Linear -> BatchNorm -> ReLU
-> Linear), kept across rounds. Each round it rebuilds every uploading client's head from that client's
architecture, and trains G for `server_steps` SGD steps on batches of `server_batch_size` draws y ~ p(y),
eps ~ N(0, I):
    L_G = CE(sum_k w_ky head_k(G(eps, y)), y) + eta * exp(-mean_ij[ mean_e (eps_i - eps_j)^2 * mean_d |G_i - G_j| ])
with p(y) the round's uploaders' share of class y, w_ky = n_ky / sum_j n_jy (client k's share of class y: the
label-weighted ensemble of heads) and the second term the diversity loss of the authors' code (eta = `diversity`).
Client k, one phase "local", the whole private model:
    L = CE(f_k(x), y) + alpha * CE(head_k(G(eps, y')), y'),  y' ~ p(y), eps ~ N(0, I), G frozen in eval mode,
`generated_batch` draws per step; the generated features feed the head only. Before the first server step there
is no trained generator and no p(y): nothing is sent and the term is off (the authors' code regularises from the
second round on). Upload: the head's state and the client's per-class training counts (`labels`, `counts`).
Evaluation: the client's own model.

Where pfl departs from the authors' code and the benchmark library (docs/algorithms.md): Gaussian noise, as the
paper says (both codes draw uniform noise under a comment saying Gaussian); the generator is kept and trained on
across rounds (the library retrains a fresh copy of the initial generator every round and never keeps it); the
ensemble's logits are weighted per class (the authors sum per-client CEs with those weights, the library weights
logits by sample share); y ~ p(y) on both sides (the authors' server draws classes uniformly); SGD with a fresh
optimiser per round instead of Adam; the paper's one client term at a constant alpha (the authors decay it and
add a KL term); no heads are averaged (heads of different structures have no mean).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.aggregation import clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    LocalClient,
    Phase,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    cpu_clone,
    outside,
    prefixed,
    register,
    setting,
    structure_problem,
    train_on_server,
    unprefixed,
)
from pfl.seeding import derive_seed


@dataclass(frozen=True)
class FedGenSettings(Settings):
    noise_dim: int = setting(32, "size of the generator's Gaussian noise eps", low=1, high=65536)
    hidden_dim: int = setting(256, "width of the generator's hidden layer", low=1, high=65536)
    server_steps: int = setting(50, "SGD steps the server trains the generator per round", low=1)
    server_lr: float = setting(0.01, "learning rate of the generator's training", low=0.0, low_open=True)
    server_batch_size: int = setting(32, "draws (y, eps) per generator step (batch normalisation needs 2)", low=2,
                                     high=65536)
    diversity: float = setting(1.0, "eta, weight of the generator's diversity loss", low=0.0)
    alpha: float = setting(1.0, "weight of the clients' CE on generated features", low=0.0)
    generated_batch: int = setting(32, "generated features per client training step", low=1, high=65536)


class FeatureGenerator(nn.Module):
    """G(eps, y) -> R^d: a representation every client's head reads, conditioned on a class."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.hidden = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                    nn.ReLU())
        self.out = nn.Linear(hidden_dim, dim)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        return self.out(self.hidden(torch.cat([noise, onehot], dim=1)))


def diversity_loss(noise: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """exp(-mean_ij[mean_e (eps_i - eps_j)^2 * mean_d |G_i - G_j|]): small when draws with distant noise give
    distant features (the authors' l1/l2 form), so G does not collapse to one point per class."""
    noise_distance = torch.cdist(noise, noise).pow(2) / noise.shape[1]
    feature_distance = torch.cdist(features, features, p=1) / features.shape[1]
    return torch.exp(-(noise_distance * feature_distance).mean())


def ensemble_loss(heads: list[nn.Module], weights: torch.Tensor, features: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """CE of the label-weighted ensemble: sample i's logits are sum_k weights[k, y_i] head_k(G_i)."""
    logits = torch.stack([head(features) for head in heads])  # [clients, batch, C]
    return F.cross_entropy(torch.einsum("kb,kbc->bc", weights[:, labels], logits), labels)


class FedGenClient(LocalClient):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedGenSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.settings = settings
        self.generator = FeatureGenerator(settings.noise_dim, num_classes, settings.hidden_dim,
                                          model.representation_dim)
        # p(y) the generator was trained on, and 1.0 once a trained generator has been received (no host sync)
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes), persistent=False)
        self.register_buffer("active", torch.zeros(()), persistent=False)

    def phases(self) -> list[Phase]:
        return [Phase("local", self.cfg.local_epochs, trains=[self.model], loss=self.local_loss,
                      eval_mode=[self.generator])]

    def receive(self, payload: Tensors) -> None:
        if "prior" not in payload:  # before the first server step
            self.active.zero_()
            return
        with torch.no_grad():
            self.generator.load_state_dict(unprefixed("generator", payload))
            self.prior.copy_(payload["prior"].to(self.prior))
            self.active.fill_(1.0)

    def generated_loss(self) -> torch.Tensor:
        """CE(head_k(G(eps, y')), y') over `generated_batch` draws y' ~ p(y), eps ~ N(0, I) (the run's seeded
        stream); G is frozen, so only the head learns from it."""
        n = self.settings.generated_batch
        labels = torch.multinomial(self.prior.float(), n, replacement=True)
        noise = torch.randn(n, self.settings.noise_dim, device=self.prior.device, dtype=self.dtype)
        with torch.no_grad():
            features = self.generator(noise, labels)
        return F.cross_entropy(self.model.head(features), labels)

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # always computed, so the measured FLOPs of a step are those of every round after the first
        return F.cross_entropy(self.model(x), y) + self.settings.alpha * self.active * self.generated_loss()

    def upload(self) -> Tensors:
        counts = torch.bincount(self.data.y_train.cpu(), minlength=self.num_classes)
        labels = torch.nonzero(counts).flatten()
        return {**cpu_clone(prefixed("head", self.model.head.state_dict())), "labels": labels,
                "counts": counts[labels]}


@register
class FedGen(Algorithm):
    name = "fedgen"
    AGGREGATED = ("nothing but clipping: the generator trains against every uploaded head, no mean to replace; "
                  "clipping bounds each uploaded head's norm (the server holds no heads)")
    Settings = FedGenSettings
    SEARCH_SPACE = {"fedgen.alpha": "log:0.1:10", "fedgen.server_lr": "log:0.001:0.1"}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.client_architectures = self.architectures()  # client k's architecture, to rebuild its head
        self._heads: dict[str, nn.Module] = {}

    def make_client(self, arch: str) -> FedGenClient:
        return FedGenClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                            self.settings)

    def _generator(self) -> FeatureGenerator:
        s = self.settings
        return FeatureGenerator(s.noise_dim, self.spec.num_classes, s.hidden_dim, self.spec.representation_dim)

    def head_of(self, arch: str) -> nn.Module:
        """A head of architecture `arch` (built once, without touching the global random stream: the server
        draws nothing from it)."""
        if arch not in self._heads:
            with torch.random.fork_rng(devices=[]):
                self._heads[arch] = self.private_model(arch).head
        return self._heads[arch]

    def initial_global(self) -> Tensors:
        """The generator and a round counter; p(y) appears with the first trained generator."""
        return {**cpu_clone(prefixed("generator", self._generator().state_dict())), "round": torch.tensor(0)}

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        if "prior" not in global_state:  # no trained generator yet
            return {}
        return {k: v for k, v in global_state.items() if k.startswith("generator.") or k == "prior"}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        c = self.spec.num_classes
        # no mean to make robust: G trains against every head; clipping bounds each head (the server holds none)
        uploads = clip_uploads(uploads, self.rule.clip)
        heads = []
        counts = torch.zeros(len(uploads), c, dtype=torch.float64)
        for k, u in enumerate(uploads):
            head = copy.deepcopy(self.head_of(self.client_architectures[u.client_id]))
            head.load_state_dict(unprefixed("head", u.tensors))
            head.eval().requires_grad_(False)
            heads.append(head)
            counts[k, u.tensors["labels"]] = u.tensors["counts"].double()
        per_class = counts.sum(0)
        prior = (per_class / per_class.sum()).float()
        weights = (counts / per_class.clamp_min(1.0)).float()  # client k's share of class y
        with torch.random.fork_rng(devices=[]):
            generator = self._generator()
        generator.load_state_dict(unprefixed("generator", global_state))
        generator.train()
        round_idx = int(global_state["round"]) + 1
        s = self.settings
        draws = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "fedgen-server", round_idx))
        n = s.server_steps * s.server_batch_size
        labels = torch.multinomial(prior, n, replacement=True, generator=draws)
        noise = torch.randn(n, s.noise_dim, generator=draws)

        def loss(eps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = generator(eps, y)
            return ensemble_loss(heads, weights, features, y) + s.diversity * diversity_loss(eps, features)

        train_on_server(list(generator.parameters()), noise, labels, loss, epochs=1, lr=s.server_lr,
                        momentum=self.cfg.momentum, batch_size=s.server_batch_size,
                        seed=derive_seed(self.cfg.seed, "fedgen-order", round_idx))
        return {**cpu_clone(prefixed("generator", generator.state_dict())), "round": torch.tensor(round_idx),
                "prior": prior}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        problem = super().upload_problem(upload, global_state)
        if problem:
            return problem
        if not 0 <= upload.client_id < len(self.client_architectures):
            return f"client {upload.client_id} is not one of the run's {len(self.client_architectures)} clients"
        arch = self.client_architectures[upload.client_id]
        head = {k: v for k, v in upload.tensors.items() if k.startswith("head.")}
        problem = structure_problem(head, prefixed("head", self.head_of(arch).state_dict()))
        if problem:
            return f"its head does not match its architecture {arch}: {problem}"
        table = outside("head", upload.tensors)
        problem = class_table_problem(table, self.spec.num_classes, {}, counts_within=upload.num_samples)
        if problem is None and len(table["labels"]) == 0:
            return "it reports no class (a client holds at least one)"
        return problem
