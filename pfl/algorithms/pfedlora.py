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

How the adapter is federated, `pfedlora.aggregation` (docs/algorithms.md has the table; s_k = alpha_k / r_k,
w_k = n_k / sum n):
- "mean" (the paper): A and B averaged separately, sample-weighted. The mean of the B_k times the mean of
  the A_k is not the mean of the B_k A_k; this is the bias the other variants correct.
- "svd" (FlexLoRA, Bai et al. 2024): the server forms DW = sum_k w_k s_k B_k A_k [C, d] and sends each
  client the rank-r_k truncated SVD of DW as its factors, scaled so that s_k B A is that SVD. Round 1 sends
  the initial factors (an SVD of DW = 0 would be all zeros, and an adapter with A = B = 0 never trains).
- "stack" (FLoRA, Wang et al. 2024): the server keeps the global update as stacked factors,
  [..., w_k s_k B_k] and [...; A_k], whose product is the exact sum; each round adds the round's clients
  (FLoRA merges every round into the base model) and, above `stack_rank` components (0: min(C, d), where
  the stack is still exact), replaces the stack by its truncated SVD. A client holds the received product
  as a frozen dense C x d delta and trains a fresh adapter on top (A drawn from the run's seed and the
  round, the same for every client; B = 0), which is what it sends; z = head_k(h) + W h + g(h).
- "freeze_a" (FFA-LoRA, Sun et al. 2024): A drawn once from the run's seed, identical on every client,
  never trained or sent; only B trains and travels. The server averages s_k B_k and each client divides by
  its own s_k, so the mean of the products is exact for equal ranks.
- "share_a" (FedSA-LoRA, Guo et al. 2025): A averaged, B private (it stays in the client's state).
Heterogeneous ranks: `pfedlora.ranks` (architecture -> rank) and `rank_policy = "capacity"` (rank in
proportion to the private model's parameter count, within [rank_min, rank]). With "mean" they are HetLoRA's
aggregation (Cho et al. 2024): factors zero-padded to the largest rank, weighted by the norms ||s_k B_k
A_k||_F instead of the sample counts, truncated back to each client's rank (HetLoRA's rank self-pruning is
not implemented). "share_a" and "freeze_a" average each rank component over the clients that hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms import lora
from pfl.algorithms.aggregation import clip_uploads, combine, robust_mean
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
    structure_problem,
    unprefixed,
)
from pfl.errors import ConfigError
from pfl.models import LoRAAdapter, assign_architectures, count_parameters
from pfl.schema import Config
from pfl.seeding import derive_seed

AGGREGATIONS = ("mean", "svd", "stack", "freeze_a", "share_a")


def _known_architectures(ranks: dict) -> str | None:
    from pfl.models import MODEL_REGISTRY

    unknown = sorted(set(ranks) - set(MODEL_REGISTRY))
    return f"unknown architecture(s) {', '.join(unknown)}; known: {', '.join(sorted(MODEL_REGISTRY))}" if unknown \
        else None


@dataclass(frozen=True)
class PFedLoRASettings(Settings):
    rank: int = setting(8, "r, rank of the adapter (<= representation_dim)", low=1)
    alpha: float = setting(0.0, "LoRA alpha; the adapter is scaled by alpha / rank (0: alpha = rank)", low=0.0)
    mu: float = setting(1.0, "weight of CE(z, y) in the local phase; 1 - mu goes to CE(head(h), y)",
                        low=0.0, high=1.0, low_open=True)
    adapter_epochs: int = setting(1, "epochs of the adapter phase per round", low=1)
    adapter_lr: float = setting(0.0, "learning rate of the adapter phase (0: the recipe's lr)", low=0.0)
    inference_adapter: str = setting("own", "adapter used for personalised evaluation", choices=("own", "global"))
    aggregation: str = setting("mean", "how the adapter is federated: mean (the paper), svd (FlexLoRA), stack "
                               "(FLoRA), freeze_a (FFA-LoRA), share_a (FedSA-LoRA)", choices=AGGREGATIONS)
    ranks: dict[str, int] = setting({}, "adapter rank per architecture (others: rank_policy)", low=1,
                                    check=_known_architectures)
    rank_policy: str = setting("fixed", "ranks of architectures not in `ranks`: fixed (= rank) or capacity (in "
                               "proportion to the model's parameters, within [rank_min, rank])",
                               choices=("fixed", "capacity"))
    rank_min: int = setting(1, "the smallest rank rank_policy = capacity gives", low=1)
    stack_rank: int = setting(0, "aggregation = stack: the most stacked components the server keeps (0: "
                              "min(C, representation_dim), where the stack is exact)", low=0)

    def alpha_for(self, rank: int) -> float:
        return self.alpha if self.alpha > 0 else float(rank)


class DenseDelta(nn.Module):
    """A frozen C x d update of the logits, W h (FLoRA's merged stack)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.t()


class PFedLoRAClient(ClientModule):
    def __init__(self, model, adapter: LoRAAdapter, cfg: Config, transform, num_classes: int,
                 settings: PFedLoRASettings, base: DenseDelta | None = None):
        super().__init__(model, cfg, transform, num_classes)
        self.adapter = adapter
        self.settings = settings
        self.base = base  # aggregation = stack: the received global update, frozen

    def phases(self) -> list[Phase]:
        s = self.settings
        trained = [self.adapter.B] if s.aggregation == "freeze_a" else [self.adapter]
        return [Phase("local", self.cfg.local_epochs, trains=[self.model], loss=self.local_loss),
                Phase("adapter", s.adapter_epochs, trains=trained, loss=self.adapter_loss,
                      lr=s.adapter_lr or None, eval_mode=[self.model])]

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """What the federated part adds to the head's logits."""
        return self.adapter(h) if self.base is None else self.base(h) + self.adapter(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.phi(x)
        return self.model.head(h) + self.delta(h)

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.model.phi(x)
        head_logits = self.model.head(h)
        loss = F.cross_entropy(head_logits + self.delta(h), y)
        mu = self.settings.mu
        return loss if mu == 1.0 else mu * loss + (1.0 - mu) * F.cross_entropy(head_logits, y)

    def adapter_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the backbone is frozen: no graph through it
            h = self.model.phi(x)
            head_logits = self.model.head(h)
        return F.cross_entropy(head_logits + self.delta(h), y)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """How much the shared adapter moves predictions: mean |g(h)| / mean |head(h)| (the paper reports
        about 1% after phase 2 on Fashion-MNIST; docs/algorithms.md), and accuracy with and without it."""
        was_training = self.training
        self.eval()
        x = self.transform(x.to(self.device), train=False)
        y = y.to(self.device)
        h = self.model.phi(x)
        head_logits, adapter_logits = self.model.head(h), self.delta(h)
        self.train(was_training)
        ratio = adapter_logits.abs().mean() / head_logits.abs().mean().clamp_min(1e-12)
        return {"adapter_logit_ratio": float(ratio),
                "train_acc_with_adapter": float(((head_logits + adapter_logits).argmax(1) == y).float().mean()),
                "train_acc_head_only": float((head_logits.argmax(1) == y).float().mean())}

    def receive(self, payload: Tensors) -> None:
        aggregation = self.settings.aggregation
        if aggregation == "stack":
            with torch.no_grad():
                self.base.weight.copy_((payload["stack.B"] @ payload["stack.A"]).to(self.base.weight))
                fresh = self.adapter
                fresh.A.copy_(shared_a(self.cfg.seed, ("stack", int(payload["round"])), fresh.A.shape))
                fresh.B.zero_()
            return
        own = {k: v for k, v in self.adapter.state_dict().items()}
        received = unprefixed("adapter", payload)
        self.adapter.load_state_dict({**own, **received})

    def upload(self) -> Tensors:
        sent = {"freeze_a": ("B",), "share_a": ("A",)}.get(self.settings.aggregation, ("A", "B"))
        return cpu_clone(prefixed("adapter", {k: v for k, v in self.adapter.state_dict().items() if k in sent}))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter} if self.base is None else {"adapter": self.adapter, "base": self.base}

    def prepare_eval(self, download: Tensors) -> None:
        if self.settings.inference_adapter == "global":
            self.receive(download)


def shared_a(seed: int, what: tuple, shape: torch.Size) -> torch.Tensor:
    """A LoRA A matrix (Kaiming-uniform, as LoRAAdapter draws it) from the run's seed: the same on every client,
    every engine and across a resume."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "pfedlora-shared-A", *what))
    bound = 1.0 / shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [r, d]: U(-1/sqrt(d), 1/sqrt(d))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@register
class PFedLoRA(Algorithm):
    name = "pfedlora"
    Settings = PFedLoRASettings
    SEARCH_SPACE = {"pfedlora.alpha": "log:4:128", "pfedlora.mu": "0.5:1.0"}
    AGGREGATED = ("the adapter's factors, coordinate-wise (aggregation = svd: the clients' products s B A; "
                  "stack: sums exactly, mean only); clipping against the global factors or product")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s, d = cls.Settings.from_config(cfg, cls.name), cfg.representation_dim
        for key, value in [("rank", s.rank), *((f"ranks.{a}", r) for a, r in s.ranks.items())]:
            if value > d:
                raise ConfigError(f"recipe key 'pfedlora.{key}': must be an integer in [1, {d}] "
                                  f"(representation_dim), got {value}")
        if s.rank_min > s.rank:
            raise ConfigError(f"recipe key 'pfedlora.rank_min': must be <= pfedlora.rank ({s.rank}), got {s.rank_min}")
        if s.aggregation == "stack" and cfg["aggregation"] != "mean":
            raise ConfigError(f"recipe key 'aggregation': pfedlora.aggregation = stack sums the clients' updates "
                              f"exactly and takes no {cfg['aggregation']}; use aggregation = mean")

    def __init__(self, cfg: Config, spec):
        super().__init__(cfg, spec)
        archs = assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
        self.arch_ranks = self.ranks_of(sorted(set(archs)))
        self.client_ranks = [self.arch_ranks[a] for a in archs]
        self.max_rank = max(self.client_ranks)
        self.heterogeneous = len(set(self.client_ranks)) > 1

    def ranks_of(self, archs: list[str]) -> dict[str, int]:
        """Each architecture's adapter rank: `ranks`, else `rank_policy` (`pfl models` shows them)."""
        s = self.settings
        ranks = dict.fromkeys(archs, s.rank)
        if s.rank_policy == "capacity":
            with torch.random.fork_rng():
                params = {a: count_parameters(self.private_model(a)) for a in archs}
            ranks = lora.capacity_ranks(params, s.rank, s.rank_min)
        return {a: s.ranks.get(a, ranks[a]) for a in archs}

    def scaling(self, rank: int) -> float:
        return self.settings.alpha_for(rank) / rank

    def evaluation_label(self) -> str:
        return (f"personalised: each client's model on its own test set; adapter used at inference: "
                f"{self.settings.inference_adapter}")

    def evaluation_reads_download(self) -> bool:
        return self.settings.inference_adapter == "global" or super().evaluation_reads_download()

    def _adapter(self, rank: int) -> LoRAAdapter:
        return LoRAAdapter(self.spec.representation_dim, self.spec.num_classes, rank, self.settings.alpha_for(rank))

    def make_client(self, arch: str) -> PFedLoRAClient:
        model = self.private_model(arch)
        rank = self.arch_ranks[arch]
        adapter = self._adapter(rank)
        if self.settings.aggregation == "freeze_a":
            with torch.no_grad():
                adapter.A.copy_(shared_a(self.cfg.seed, ("freeze_a",), (self.max_rank, adapter.A.shape[1]))[:rank])
        base = DenseDelta(self.spec.num_classes, self.spec.representation_dim) \
            if self.settings.aggregation == "stack" else None
        return PFedLoRAClient(model, adapter, self.cfg, self.spec.transform, self.spec.num_classes, self.settings,
                              base)

    # --- server ----------------------------------------------------------------------------------
    def initial_global(self) -> Tensors:
        aggregation, c, d = self.settings.aggregation, self.spec.num_classes, self.spec.representation_dim
        if aggregation == "stack":  # one zero component: the global update starts at 0
            return {"stack.A": torch.zeros(1, d), "stack.B": torch.zeros(c, 1), "round": torch.tensor(0)}
        if aggregation == "freeze_a":
            return {"adapter.B": torch.zeros(c, self.max_rank)}
        adapter = cpu_clone(prefixed("adapter", self._adapter(self.max_rank).state_dict()))
        return {"adapter.A": adapter["adapter.A"]} if aggregation == "share_a" else adapter

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        aggregation, rank = self.settings.aggregation, self.client_ranks[client_id]
        if aggregation == "stack":
            return global_state
        if "delta" in global_state:  # svd after round 1
            a, b = lora.factors_of(global_state["delta"], rank, self.scaling(rank))
            return {"adapter.A": a.float(), "adapter.B": b.float()}
        if aggregation == "freeze_a":  # the server holds the mean of s_k B_k
            return {"adapter.B": global_state["adapter.B"][:, :rank] / self.scaling(rank)}
        if not self.heterogeneous:
            return global_state
        return {k: v[:rank] if k == "adapter.A" else v[:, :rank] for k, v in global_state.items()}

    def expected_upload(self, client_id: int) -> Tensors:
        """The names, shapes and dtypes of client `client_id`'s update (its own rank)."""
        rank, c, d = self.client_ranks[client_id], self.spec.num_classes, self.spec.representation_dim
        shapes = {"adapter.A": (rank, d), "adapter.B": (c, rank)}
        sent = {"freeze_a": ("adapter.B",), "share_a": ("adapter.A",)}.get(self.settings.aggregation, tuple(shapes))
        return {k: torch.empty(shapes[k]) for k in sent}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        if not 0 <= upload.client_id < len(self.client_ranks):
            return f"client id {upload.client_id} is not in this run"
        return super().upload_problem(upload, global_state) or structure_problem(
            upload.tensors, self.expected_upload(upload.client_id))

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        aggregation = self.settings.aggregation
        if aggregation == "svd":
            return {"delta": self._mean_product(global_state, uploads)}
        if aggregation == "stack":
            return self._stack(global_state, uploads)
        if not self.heterogeneous and aggregation != "freeze_a":
            return robust_mean(uploads, self.rule, reference=global_state)
        return self._rankwise(global_state, uploads)

    def _product(self, u: Upload) -> torch.Tensor:
        rank = self.client_ranks[u.client_id]
        return self.scaling(rank) * u.tensors["adapter.B"].double() @ u.tensors["adapter.A"].double()

    def _mean_product(self, global_state: Tensors, uploads: list[Upload]) -> torch.Tensor:
        """DW = sum_k w_k s_k B_k A_k (median / trimmed mean of the products under those rules), each product
        clipped against the current global one."""
        if "delta" in global_state:
            reference = global_state["delta"]
        else:
            b, a = global_state["adapter.B"].double(), global_state["adapter.A"].double()
            reference = self.scaling(self.max_rank) * b @ a
        products = [Upload(u.client_id, u.num_samples, {"delta": self._product(u)}) for u in uploads]
        return robust_mean(products, self.rule, reference={"delta": reference})["delta"].float()

    def _stack(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        total = float(sum(u.num_samples for u in uploads))
        b_parts, a_parts = [global_state["stack.B"]], [global_state["stack.A"]]
        for u in uploads:
            b = u.tensors["adapter.B"].double() * self.scaling(self.client_ranks[u.client_id])
            a = u.tensors["adapter.A"].double()
            norm = float(torch.linalg.matrix_norm(b @ a))
            if 0 < self.rule.clip < norm:  # the client's update to the logits, s B A, bounded in norm
                b = b * (self.rule.clip / norm)
            b_parts.append(b * (u.num_samples / total))
            a_parts.append(a)
        cap = self.settings.stack_rank or min(self.spec.num_classes, self.spec.representation_dim)
        a, b = lora.stacked(b_parts, a_parts, cap)
        return {"stack.A": a.float(), "stack.B": b.float(), "round": global_state["round"] + 1}

    def _rankwise(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        """Factors of different ranks (or freeze_a's scaled B): HetLoRA's zero-padded, norm-weighted mean for
        `mean`; for share_a and freeze_a each rank component averaged over the clients holding it."""
        aggregation = self.settings.aggregation
        # clipping: each update against what its client received this round
        uploads = clip_uploads(uploads, self.rule.clip, lambda u: self.download(global_state, u.client_id))
        ranks = [self.client_ranks[u.client_id] for u in uploads]
        factors = {name: [u.tensors[name].double() for u in uploads] for name in uploads[0].tensors}
        if aggregation == "freeze_a":  # s_k B_k: the mean of the products is then exact for equal ranks
            factors["adapter.B"] = [self.scaling(r) * b for r, b in zip(ranks, factors["adapter.B"])]
        dims = {"adapter.A": 0, "adapter.B": 1}
        if aggregation == "mean":
            weights = lora.sparsity_weights([self._product(u) for u in uploads])
        else:
            total = float(sum(u.num_samples for u in uploads))
            weights = [u.num_samples / total for u in uploads]
        out = {}
        for name, parts in factors.items():
            if self.rule.is_mean:
                mean = lora.padded_mean(parts, weights, self.max_rank, dims[name]) if aggregation == "mean" else \
                    lora.rankwise_mean(parts, weights, self.max_rank, dims[name])
            else:  # median / trimmed mean over the zero-padded factors, unweighted
                pad = lora.pad_rows if dims[name] == 0 else lora.pad_columns
                mean = combine(torch.stack([pad(p, self.max_rank) for p in parts]), self.rule)
            out[name] = mean.float()
        return out
