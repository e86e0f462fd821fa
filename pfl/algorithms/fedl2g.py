"""FedL2G (Zhang et al. 2024, "Learning to Guide Local Training in Heterogeneous Federated Learning"): the server
learns per-class guiding vectors g_c so that pulling a client's outputs towards them helps its own task.

`fedl2g.variant`: "feature" (FedL2G-f) guides the representation phi_k(x) in R^d, "logit" (FedL2G-l) the logits
z = head_k(phi_k(x)) in R^C; target(x) below is the one guided.

Client k holds out a quiz split Q of its training data (fixed per client; the rest, S, is what it trains on).
Phase "local", the whole private model on S (no training in the first `warm_up_rounds` server rounds):
    L_guided = CE(z, y) + lambda * MSE(target(x), g_y)        (MSE averaged over batch x width)
After training, the learning-to-guide step, on a copy of the parameters (the model is left as trained):
    theta' = theta - lr * grad_theta L_guided(theta, g; study batches from S)     (one plain SGD step)
    q = CE(f_theta'(x_Q), y_Q)                                                    (the quiz, no augmentation)
and the client sends dq/dg for the classes of its study batches (only their rows depend on g).
Server: per class, the unweighted mean of the gradients sent for it (classes nobody sent: zero); the whole
gradient table's norm clipped to 100; g <- g - guide_lr * gradient. g starts as N(0, 1) per entry.
Personalised inference: the client's own model. The download carries the server's count of its steps: the client
reads the warm-up from it and seeds the look-ahead's batches with (seed, count, client), so every engine sends the
same gradient.

A client too small for a quiz split (a BN model needs 2 samples per batch) trains on all its data and sends an
empty gradient table; docs/algorithms.md lists the departures from the authors' code.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pfl.algorithms.aggregation import class_means, clip_uploads
from pfl.algorithms.base import (
    Algorithm,
    ClientModule,
    Phase,
    Settings,
    Tensors,
    Upload,
    class_table_problem,
    register,
    setting,
)
from pfl.data.batches import TensorBatches
from pfl.seeding import derive_seed

log = logging.getLogger("pfl")
# the authors' server-side clip_grad_norm_ of the aggregated gradient of the guiding vectors
GUIDE_GRAD_CLIP = 100.0
# the authors' server rates (their run script) where `fedl2g.guide_lr` is 0
AUTHORS_GUIDE_LR = {"feature": 100.0, "logit": 0.1}
# a quiz split takes at most this share of a client's training data, so that a small client still trains
MAX_QUIZ_SHARE = 0.5


@dataclass(frozen=True)
class FedL2GSettings(Settings):
    variant: str = setting("feature", "what the guiding vectors guide: the representation phi(x) in R^d "
                           "(FedL2G-f) or the logits in R^C (FedL2G-l)", choices=("feature", "logit"))
    lam: float = setting(1.0, "weight of the guiding loss MSE(phi(x) or logits, g_y)", key="lambda", low=0.0)
    guide_lr: float = setting(0.0, "server SGD rate of the guiding vectors; 0: the authors' rate for the variant "
                              "(feature 100, logit 0.1)", low=0.0)
    quiz_batches: int = setting(1, "quiz split, in batches of batch_size (at most half a client's training data)",
                                low=1)
    study_batches: int = setting(1, "batches of the look-ahead step that measures the guide's effect", low=1)
    warm_up_rounds: int = setting(1, "first rounds in which clients only send guide gradients and do not train "
                                  "(the authors' default: 50)", low=0)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def quiz_split(num_train: int, batch_size: int, quiz_batches: int, min_batch: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(quiz indices, training indices) of a client's training data, a seeded random split that is the same
    every round: quiz_batches x batch_size samples, at most MAX_QUIZ_SHARE of them; none when that leaves fewer
    than `min_batch` (a model with batch normalisation cannot run a batch of one in train mode)."""
    size = min(quiz_batches * batch_size, int(num_train * MAX_QUIZ_SHARE))
    if size < min_batch:
        size = 0
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return order[:size].sort().values, order[size:].sort().values


def without_cudnn_rnn(model: nn.Module):
    """cuDNN off (its other settings kept) for a model with recurrent layers, whose cuDNN backward cannot be
    differentiated again; nothing for other models."""
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32)


def _hardsigmoid(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (x / 6 + 0.5).clamp(0, 1)  # relu6(x + 3) / 6


def _embedding_bag(module: nn.EmbeddingBag, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                   per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """nn.EmbeddingBag's sum or mean over fixed-length bags (B, L), padding left out, from F.embedding."""
    if offsets is not None or ids.dim() != 2 or module.mode not in ("sum", "mean") or module.max_norm is not None:
        return nn.EmbeddingBag.forward(module, ids, offsets, per_sample_weights)
    rows = F.embedding(ids, module.weight)
    keep = torch.ones_like(ids, dtype=rows.dtype) if module.padding_idx is None else \
        (ids != module.padding_idx).to(rows.dtype)
    total = (rows * (keep if per_sample_weights is None else keep * per_sample_weights).unsqueeze(-1)).sum(1)
    return total if module.mode == "sum" else total / keep.sum(1, keepdim=True).clamp_min(1)


# modules whose backward PyTorch cannot differentiate again, and the same function from ops that it can
TWICE_DIFFERENTIABLE = {nn.Hardsigmoid: _hardsigmoid, nn.EmbeddingBag: _embedding_bag}


@contextlib.contextmanager
def twice_differentiable(model: nn.Module):
    """Within the block, the model's hardsigmoid (MobileNetV3's squeeze-excitation) and embedding bags (text bags)
    compute the same values from ops with a second derivative: PyTorch has none for hardsigmoid_backward and
    _embedding_bag_backward, and the look-ahead differentiates the backward pass."""
    patched = []
    for module in model.modules():
        rule = next((f for kind, f in TWICE_DIFFERENTIABLE.items() if isinstance(module, kind)), None)
        if rule is not None:
            module.forward = functools.partial(rule, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def guided_loss(phi, head, x: torch.Tensor, y: torch.Tensor, guides: torch.Tensor, variant: str,
                lam: float) -> torch.Tensor:
    """CE(head(phi(x)), y) + lam * MSE(target, guides[y]), target = phi(x) ("feature") or the logits ("logit");
    `phi` and `head` are callables (the modules, or their functional forms in the look-ahead)."""
    h = phi(x)
    z = head(h)
    target = h if variant == "feature" else z
    return F.cross_entropy(z, y) + lam * F.mse_loss(target.float(), guides[y].float())


class FedL2GClient(ClientModule):
    def __init__(self, model, cfg, transform, num_classes: int, settings: FedL2GSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.settings = settings
        width = model.representation_dim if settings.variant == "feature" else num_classes
        self.register_buffer("guides", torch.zeros(num_classes, width), persistent=False)
        self.server_round = 0  # server steps taken before this round (from the download): warm-up and seeds

    def receive(self, payload: Tensors) -> None:
        self.guides.copy_(payload["guides"].to(self.guides))
        self.server_round = int(payload["round"])

    @property
    def warming_up(self) -> bool:
        return self.server_round < self.settings.warm_up_rounds

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This client's (quiz, training) indices."""
        data = self.data
        return quiz_split(data.num_train, self.cfg.batch_size, self.settings.quiz_batches,
                          2 if has_batch_norm(self.model) else 1,
                          derive_seed(self.cfg.seed, "fedl2g-quiz", data.client_id))

    def phases(self) -> list[Phase]:
        # before the client's data is known (a Flower server reading the phase names) every sample trains
        samples = None if self.data is None else self.split()[1]
        epochs = 0 if self.warming_up else self.cfg.local_epochs
        return [Phase("local", epochs, trains=[self.model], loss=self.local_loss, samples=samples)]

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return guided_loss(self.model.phi, self.model.head, x, y, self.guides, s.variant, s.lam)

    def upload(self) -> Tensors:
        labels, grads = self.guide_gradient()
        return {"labels": labels, "grads": grads}

    def guide_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels [m] int64, dq/dg of those classes [m, width] float32) on the CPU: the learning-to-guide step.
        Seeded by (seed, server round, client): batches, augmentation and dropout draw from their own streams, the
        global random state is left as it was, and so are the model's parameters, buffers and mode."""
        quiz, train = self.split()
        if len(quiz) == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.guides.shape[1])
        data, batch, s = self.data, self.cfg.batch_size, self.settings
        seed = derive_seed(self.cfg.seed, "fedl2g-meta", self.server_round, data.client_id)
        no_single = has_batch_norm(self.model)
        x, y = data.x_train, data.y_train
        study = list(itertools.islice(TensorBatches(x[train.to(x.device)], y[train.to(y.device)], batch,
                                                    shuffle=True, seed=derive_seed(seed, "study"),
                                                    no_single=no_single), s.study_batches))
        quizzes = list(TensorBatches(x[quiz.to(x.device)], y[quiz.to(y.device)], batch, shuffle=True,
                                     seed=derive_seed(seed, "quiz"), no_single=no_single))
        device = self.guides.device
        params = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # batch-norm statistics move on copies
        guides = self.guides.detach().float().clone().requires_grad_(True)
        was_training = self.model.training
        self.model.train()
        cuda = [device] if device.type == "cuda" else []
        try:
            # kernels without a double backward: the fused attention ones (vit_mini, text transformers), cuDNN's
            # recurrent ones (text LSTM/GRU on a GPU), hardsigmoid and embedding bags
            with torch.random.fork_rng(devices=cuda), sdpa_kernel(SDPBackend.MATH), without_cudnn_rnn(self.model), \
                    twice_differentiable(self.model), torch.enable_grad():
                torch.manual_seed(seed)
                study_loss = sum(guided_loss(self._part("phi", params, buffers), self._part("head", params, buffers),
                                             self.transform(xb.to(device), train=True), yb.to(device), guides,
                                             s.variant, s.lam) for xb, yb in study) / len(study)
                grads = torch.autograd.grad(study_loss, list(params.values()), create_graph=True, allow_unused=True)
                stepped = {n: p if g is None else p - self.cfg.lr * g for (n, p), g in zip(params.items(), grads)}
                quiz_loss = sum(F.cross_entropy(functional_call(self.model, {**stepped, **buffers},
                                                                (self.transform(xq.to(device), train=False),)),
                                                yq.to(device)) for xq, yq in quizzes) / len(quizzes)
                (grad,) = torch.autograd.grad(quiz_loss, [guides], allow_unused=True)
        finally:
            self.model.train(was_training)
        if grad is None:  # lambda = 0: the quiz does not depend on the guides
            grad = torch.zeros_like(guides)
        labels = torch.unique(torch.cat([yb for _, yb in study])).cpu()
        return labels, grad.detach()[labels.to(grad.device)].float().cpu()

    def _part(self, name: str, params: Tensors, buffers: Tensors):
        """model.<name> as a function of the given parameters and buffers."""
        prefix = name + "."
        tensors = {k[len(prefix):]: v for k, v in itertools.chain(params.items(), buffers.items())
                   if k.startswith(prefix)}
        module = getattr(self.model, name)
        return lambda x: functional_call(module, tensors, (x,))


@register
class FedL2G(Algorithm):
    name = "fedl2g"
    AGGREGATED = ("per-class gradients of the guiding vectors, per class over its senders (mean: unweighted, the "
                  "authors' arithmetic); clipping: each client's gradient table, a gradient being its own update")
    Settings = FedL2GSettings
    SEARCH_SPACE = {"fedl2g.lambda": "log:0.01:10", "fedl2g.guide_lr": "log:0.01:10000"}

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        if self.settings.warm_up_rounds >= cfg.rounds:
            log.warning("fedl2g.warm_up_rounds (%d) >= rounds (%d): no client trains in this run, only the guiding "
                        "vectors do", self.settings.warm_up_rounds, cfg.rounds)

    @property
    def width(self) -> int:
        """Size of a guiding vector: d (feature variant) or C (logit variant)."""
        return self.spec.representation_dim if self.settings.variant == "feature" else self.spec.num_classes

    @property
    def guide_lr(self) -> float:
        return self.settings.guide_lr or AUTHORS_GUIDE_LR[self.settings.variant]

    def make_client(self, arch: str) -> FedL2GClient:
        return FedL2GClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes,
                            self.settings)

    def initial_global(self) -> Tensors:
        """Guiding vectors N(0, 1) (the authors' nn.Embedding) and the count of server steps taken."""
        return {"guides": torch.randn(self.spec.num_classes, self.width), "round": torch.tensor(0)}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        guides = global_state["guides"]
        uploads = clip_uploads(uploads, self.rule.clip)  # the update of a gradient is the gradient itself
        tables = [(u.tensors["labels"], u.tensors["grads"], None) for u in uploads]
        grad = torch.zeros(guides.shape, dtype=torch.float64)
        if tables:
            means, sent = class_means(tables, self.spec.num_classes, self.rule)
            grad[sent] = means[sent]
        norm = float(grad.norm())
        grad = grad * min(1.0, GUIDE_GRAD_CLIP / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s scaling
        stepped = guides.double() - self.guide_lr * grad
        return {"guides": stepped.to(guides.dtype), "round": global_state["round"] + 1}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        return super().upload_problem(upload, global_state) or class_table_problem(
            upload.tensors, self.spec.num_classes, {"grads": (self.width,)})
