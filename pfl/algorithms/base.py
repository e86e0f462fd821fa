"""The two faces of a federated method: a client LightningModule and a server step.

An engine (the in-process loop today, Flower later) drives every method through this interface only:

    module.load_private_state(store[k]); module.receive(algorithm.download(global_state, k))
    for phase in module.phases():  module.set_phase(phase.name); runner.fit(module, batches, phase.epochs)
    uploads.append(Upload(k, n_k, module.upload(x_k, y_k))); store[k] = module.private_state()
    global_state = algorithm.aggregate(global_state, uploads)

A method is one file: it declares its recipe keys as a frozen `Settings` dataclass, subclasses
`ClientModule` and `Algorithm`, and registers itself with `@register`; the package imports every module in
it, so nothing else is edited to add a method.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pfl.algorithms.aggregation import Rule
from pfl.data.batches import BatchTransform
from pfl.schema import Config, Field, Tensors

_KINDS = {int: "int", float: "float", str: "str", bool: "bool"}


def setting(default: Any, help: str, *, key: str | None = None, choices: tuple[str, ...] | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """A method's setting: a field of its `Settings` dataclass that is also the recipe key `<method>.<key>`
    (`key` defaults to the field's name; give it where the recipe's name is not an identifier: `lambda`)."""
    spec = {"help": help, "key": key, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "check": check}
    return dataclasses.field(default=default, metadata={"pfl": spec})


@dataclass(frozen=True)
class Settings:
    """A method's own recipe keys, typed and read-only: `self.settings.rank`, never `settings["rank"]`.
    A method subclasses it (still `@dataclass(frozen=True)`) with one `setting(...)` per key."""

    @classmethod
    def schema(cls) -> dict[str, Field]:
        """Recipe key (without the method's prefix) -> its declaration, for the recipe reader."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            spec = dict(f.metadata["pfl"])
            key = spec.pop("key") or f.name
            out[key] = Field(_KINDS[hints[f.name]], f.default, **spec)
        return out

    @classmethod
    def from_config(cls, cfg: Config, method: str) -> Settings:
        values = {}
        for f in dataclasses.fields(cls):
            values[f.name] = cfg[f"{method}.{f.metadata['pfl']['key'] or f.name}"]
        return cls(**values)


@dataclass(frozen=True)
class Phase:
    """One training phase of a round: which parameters train, for how many epochs."""

    name: str
    epochs: int


@dataclass(frozen=True)
class TaskSpec:
    """What a method needs to know about the task to build client modules."""

    image_shape: tuple[int, int, int]
    num_classes: int
    representation_dim: int
    transform: BatchTransform


@dataclass
class Upload:
    """What one client sent to the server in one round."""

    client_id: int
    num_samples: int
    tensors: Tensors


# The dtypes an update may have: floats travel as float32 whatever precision the client computed in
# (ClientWorker's `on_the_wire`), integers (class labels, counts) as int64.
WIRE_DTYPES = (torch.float32, torch.int64)


def payload_bytes(tensors: Tensors) -> int:
    """Bytes on the wire for a payload: exactly the tensors' storage (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def payload_params(tensors: Tensors) -> int:
    return sum(t.numel() for t in tensors.values())


def weighted_mean(uploads: list[Upload]) -> Tensors:
    """sum_k n_k x_k / sum_k n_k for every tensor name; computed in float64, returned in the input dtype."""
    if not uploads:
        raise ValueError("no uploads to aggregate")
    total = float(sum(u.num_samples for u in uploads))
    if total <= 0:
        raise ValueError("uploads carry no samples")
    out = {}
    for name, first in uploads[0].tensors.items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for u in uploads:
            acc += u.tensors[name].to(torch.float64) * (u.num_samples / total)
        out[name] = acc.to(first.dtype)
    return out


def train_on_server(params: list[nn.Parameter], inputs: torch.Tensor, targets: torch.Tensor,
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int, lr: float,
                    momentum: float = 0.0, batch_size: int | None = None, seed: int = 0) -> float:
    """Server-side training (FedGH's head, FedTGP's prototype generator): `epochs` passes of a fresh SGD
    over (inputs, targets), full batch when `batch_size` is None, else seeded shuffled mini-batches;
    `loss(x_batch, y_batch)` computes the batch's loss from the trained module. Returns the last pass's
    mean loss."""
    optimiser = torch.optim.SGD(params, lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    n = len(targets)
    size = n if batch_size is None else batch_size
    last = math.nan
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.arange(n) if batch_size is None else torch.randperm(n, generator=generator)
            total, count = 0.0, 0
            for start in range(0, n, size):
                idx = order[start:start + size]
                optimiser.zero_grad()
                value = loss(inputs[idx], targets[idx])
                value.backward()
                optimiser.step()
                total, count = total + float(value.detach()) * len(idx), count + len(idx)
            last = total / max(count, 1)
    return last


def cpu_clone(tensors: Tensors) -> Tensors:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def prefixed(prefix: str, tensors: Tensors) -> Tensors:
    """Name a module's tensors for a payload: {"phi.0.weight": t} -> {"<prefix>.phi.0.weight": t}."""
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Tensors) -> Tensors:
    """The inverse of `prefixed`, keeping only the tensors under `prefix`."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def outside(prefix: str, tensors: Tensors) -> Tensors:
    """The tensors not under `prefix` (a private state's own model beside a prefixed module)."""
    p = prefix + "."
    return {k: v for k, v in tensors.items() if not k.startswith(p)}


@torch.no_grad()
def class_prototypes(model: nn.Module, transform: BatchTransform, x: torch.Tensor, y: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class mean representation phi(x) over (x, y), the model in eval mode (FedProto, FedGH).

    Returns (labels [m] int64, prototypes [m, d] float32, counts [m] int64) for the m classes present.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = None, torch.zeros(num_classes, dtype=torch.int64)
    for start in range(0, len(y), 512):
        xb = transform(x[start:start + 512].to(device), train=False)
        h = model.phi(xb).float().cpu()
        yb = y[start:start + 512].cpu()
        if sums is None:
            sums = torch.zeros(num_classes, h.shape[1])
        sums.index_add_(0, yb, h)
        counts += torch.bincount(yb, minlength=num_classes)
    model.train(was_training)
    present = torch.nonzero(counts > 0).flatten()
    return present, sums[present] / counts[present].unsqueeze(1).float(), counts[present]


class ClientModule(L.LightningModule):
    """Client side of a method. Subclasses say what trains in each phase, the phase's loss, and what
    travels; this base class does freezing, optimiser set-up, on-device transforms and accuracy."""

    def __init__(self, model: nn.Module, cfg: Config, transform: BatchTransform, num_classes: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.batch_transform = transform
        self.num_classes = num_classes
        self.phase: str | None = None
        # the labels of the client this module is loaded for (set by the engine with its private state), for
        # methods that act on the classes the client holds (FedSSA)
        self.train_labels: torch.Tensor | None = None
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # where `keep` puts private-state copies: the CPU, or the device when the run keeps states there
        self.state_device = torch.device("cpu")
        self._loss_sum = torch.zeros(())
        self._loss_steps = 0

    # --- what a method defines -------------------------------------------------------------
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def trainable_parameters(self, phase: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def phase_loss(self, phase: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def receive(self, payload: Tensors) -> None:
        """Load what the server sent this client."""

    def start(self, payload: Tensors) -> None:
        """Set up a fresh client from the server's initial broadcast, before its first round. Default: receive
        it (a method whose `receive` is a per-round update, not a load, overrides this)."""
        self.receive(payload)

    def upload(self, x_train: torch.Tensor, y_train: torch.Tensor) -> Tensors:
        """What goes to the server after training. x_train, y_train: the client's training data (raw, on
        the CPU), for methods whose upload summarises it (per-class prototypes)."""
        raise NotImplementedError

    def private_modules(self) -> dict[str, nn.Module]:
        """Modules besides `model` that are this client's own between rounds, by state-name prefix (pFedLoRA's
        adapter, FedMRL's small model and projector). Default: none."""
        return {}

    def keep(self, tensors: Tensors) -> Tensors:
        """Copies of `tensors` for the store, made on `state_device` (the CPU unless the run keeps client
        states on its device)."""
        return {k: v.detach().to(self.state_device, copy=True).contiguous() for k, v in tensors.items()}

    def private_state(self) -> Tensors:
        """Everything that must survive until this client's next round: the model and `private_modules`."""
        state = self.keep(self.model.state_dict())
        for prefix, module in self.private_modules().items():
            state.update(self.keep(prefixed(prefix, module.state_dict())))
        return state

    def load_private_state(self, state: Tensors) -> None:
        own = state
        for prefix, module in self.private_modules().items():
            module.load_state_dict(unprefixed(prefix, state))
            own = outside(prefix, own)
        self.model.load_state_dict(own)

    def prepare_eval(self, global_state: Tensors) -> None:
        """Put the module in the configuration personalised evaluation uses (default: as trained)."""

    def learning_rate(self, phase: str) -> float:
        return self.cfg.lr

    def optimizer(self, phase: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The phase's optimiser, fresh for every phase of every client round. Default: the recipe's SGD;
        a method overrides it for its own learning rates or parameter groups."""
        return torch.optim.SGD(params, lr=self.learning_rate(phase), momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def after_step(self, phase: str) -> None:
        """Called after every optimiser step (a projection such as a clamp). Default: nothing."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores for personalised evaluation (argmax = the prediction). Default: the logits of
        `forward`; a method with another inference rule (nearest prototype) overrides it."""
        return self(x)

    def unknown_phase(self, phase: str) -> ValueError:
        """The error for a phase name this method does not have (raise it; never fall into a branch)."""
        return ValueError(f"{type(self).__name__} has no phase {phase!r}; its phases are "
                          f"{', '.join(p.name for p in self.phases())}")

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Method-specific measurements after a client's round, on a sample of its training data
        (averaged over the round's clients into metrics.csv). Default: none."""
        return {}

    # --- shared machinery -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Raw uint8 images -> normalised floats in the module's dtype (a true-precision run, bf16-true or
        64-true, converts the module once; every method's own data path then follows it)."""
        out = self.batch_transform(x, train)
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def set_phase(self, phase: str) -> None:
        """Freeze everything, then unfreeze exactly the phase's trainable parameters."""
        self.phase = phase
        trainable = {id(p) for p in self.trainable_parameters(phase)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self._loss_sum = torch.zeros(())
        self._loss_steps = 0

    @property
    def steps_in_phase(self) -> int:
        """Optimiser steps taken since the last set_phase."""
        return self._loss_steps

    def mean_phase_loss(self) -> float:
        return float(self._loss_sum) / max(self._loss_steps, 1)

    def on_train_start(self) -> None:
        # Lightning 2.6 keeps whatever mode modules are in; evaluation or a previous phase may have left
        # them in eval mode. Phases that need frozen parts in eval mode set that in on_train_epoch_start.
        self.train()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.transform(x, train=self.training), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.phase_loss(self.phase, x, y)
        # summed on the device: no host sync per step
        self._loss_sum = loss.detach().float() if self._loss_steps == 0 else self._loss_sum + loss.detach().float()
        self._loss_steps += 1
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after_step(self.phase)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(self.predict(x).argmax(dim=1), y)

    def configure_optimizers(self):
        params = [p for p in self.trainable_parameters(self.phase) if p.requires_grad]
        return self.optimizer(self.phase, params)


class LocalClient(ClientModule):
    """One phase, "local": the whole private model trains on CE. Methods that differ only in what they
    receive and send (standalone, LG-FedAvg, FedAvg, FedGH), or add a term to the loss (FedProto), build on
    this."""

    def phases(self) -> list[Phase]:
        return [Phase("local", self.cfg.local_epochs)]

    def trainable_parameters(self, phase: str) -> list[nn.Parameter]:
        if phase != "local":
            raise self.unknown_phase(phase)
        return list(self.model.parameters())

    def phase_loss(self, phase: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if phase != "local":
            raise self.unknown_phase(phase)
        return F.cross_entropy(self.model(x), y)


ALGORITHMS: dict[str, type[Algorithm]] = {}
A = TypeVar("A", bound="type[Algorithm]")


def register(cls: A) -> A:
    """Class decorator: make a method known by its `name` (the recipe's `method`) and its `Settings` keys
    part of the recipe schema."""
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {ALGORITHMS[cls.name].__module__} and {cls.__module__}")
    cls.SETTINGS = cls.Settings.schema()
    ALGORITHMS[cls.name] = cls
    return cls


class Algorithm:
    """Server side of a method, and the factory of its client modules."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    SETTINGS: ClassVar[dict[str, Field]] = {}  # derived from `Settings` by @register
    # `pfl tune`'s default search space (recipe key -> SPEC, see pfl/tune.py): the shared learning rate plus
    # two keys of the method's own, so that every method gets a space of the same size.
    SHARED_SEARCH_SPACE: ClassVar[dict[str, str]] = {"lr": "log:0.003:0.1"}
    SEARCH_SPACE: ClassVar[dict[str, str]] = {"weight_decay": "log:1e-5:1e-2", "momentum": "0.5:0.99"}
    # what the recipe's `aggregation` rule and `clip_update_norm` act on (summary.json; docs/algorithms.md)
    AGGREGATED: ClassVar[str] = "every uploaded tensor, coordinate-wise (clipping: against the global tensor)"

    @classmethod
    def search_space(cls) -> dict[str, str]:
        return {**cls.SHARED_SEARCH_SPACE, **cls.SEARCH_SPACE}

    def __init__(self, cfg: Config, spec: TaskSpec):
        self.cfg = cfg
        self.spec = spec
        self.settings = self.Settings.from_config(cfg, self.name)
        # the recipe's `aggregation`, `aggregation_trim`, `clip_update_norm` (pfl.algorithms.aggregation)
        self.rule = Rule.from_config(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Cross-key checks of this method's settings against the rest of the recipe."""

    def make_client(self, arch: str) -> ClientModule:
        raise NotImplementedError

    def private_model(self, arch: str) -> nn.Module:
        """A fresh model of the zoo architecture `arch` for this task."""
        from pfl.models import build_model

        return build_model(arch, self.spec.image_shape, self.spec.num_classes, self.spec.representation_dim)

    def evaluation_label(self) -> str:
        """What personalised evaluation tests, for summary.json and tables."""
        return "personalised: each client's own model on its own test set"

    def evaluation_reads_download(self) -> bool:
        """Whether personalised evaluation uses what the server sends after the round (`evaluate_at =
        "round_start"`, or a `prepare_eval` that receives the download: a global model, head, adapter or
        prototypes). Such an evaluation needs the round's aggregate, so an engine cannot test clients inside
        their training messages. A method whose `prepare_eval` reads the download overrides this (tested for
        every method: an evaluation that says it does not read the download gives the same accuracy without
        one)."""
        return self.cfg.evaluate_at == "round_start"

    def initial_global(self) -> Tensors:
        """The server's state before round 1 (what the first broadcast carries)."""
        return {}

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        """What the server sends client `client_id` this round."""
        return global_state

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        raise NotImplementedError

    def upload_template(self, global_state: Tensors) -> Tensors | None:
        """Tensors whose names, shapes and dtypes a client's update must match exactly; None where the
        update's structure varies (prototypes, compressed factors) and `upload_problem` checks it."""
        return None

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        """Why an update must not be aggregated (no samples, non-finite, mis-shaped), or None. The round
        loop calls this for every update on every engine; nothing rejected reaches `aggregate`."""
        if upload.num_samples < 1:
            return f"it reports {upload.num_samples} training samples"
        for name, t in upload.tensors.items():
            if not isinstance(t, torch.Tensor):
                return f"'{name}' is not a tensor"
            if t.dtype not in WIRE_DTYPES:
                return f"'{name}' has dtype {t.dtype}; updates carry float32 (int64 for labels and counts)"
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"'{name}' has non-finite values (NaN or Inf)"
        template = self.upload_template(global_state)
        if template is None:
            return None
        return structure_problem(upload.tensors, template)


def structure_problem(tensors: Tensors, template: Tensors) -> str | None:
    """Names, shapes and dtypes of `tensors` against `template`: the first difference, or None."""
    missing = sorted(set(template) - set(tensors))
    extra = sorted(set(tensors) - set(template))
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in template.items():
        t = tensors[name]
        if t.shape != ref.shape:
            return f"'{name}' has shape {list(t.shape)}, expected {list(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"'{name}' has dtype {t.dtype}, expected {ref.dtype}"
    return None


def class_table_problem(tensors: Tensors, num_classes: int, rows: dict[str, tuple[int, ...]],
                        counts_within: int | None = None) -> str | None:
    """Structure of a per-class update (FedProto, FedGH, FedTGP, FD, FedSSA): 'labels' [m] distinct int64
    classes in [0, C); for every name in `rows` a float tensor [m, *shape]; and, where `counts_within` is the
    client's training-set size, 'counts' [m] int64 >= 1 adding up to at most that size (counts weigh the
    server's mean: a client must not outweigh its own data)."""
    with_counts = counts_within is not None
    names = {"labels", *rows} | ({"counts"} if with_counts else set())
    if set(tensors) != names:
        return f"tensor names must be {sorted(names)}, got {sorted(tensors)}"
    labels = tensors["labels"]
    if labels.dtype != torch.int64 or labels.ndim != 1:
        return "'labels' must be a 1-d int64 tensor"
    m = len(labels)
    if m and (int(labels.min()) < 0 or int(labels.max()) >= num_classes or len(labels.unique()) != m):
        return f"'labels' must be distinct classes in [0, {num_classes})"
    for name, shape in rows.items():
        t = tensors[name]
        if tuple(t.shape) != (m, *shape) or not t.is_floating_point():
            return f"'{name}' has shape {list(t.shape)}, expected {[m, *shape]} floats"
    if with_counts:
        counts = tensors["counts"]
        if counts.shape != (m,) or counts.dtype != torch.int64 or (m and int(counts.min()) < 1):
            return "'counts' must be one int64 count >= 1 per label"
        if int(counts.sum()) > counts_within:
            return f"'counts' add up to {int(counts.sum())}, more than the client's {counts_within} training samples"
    return None
