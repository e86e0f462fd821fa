"""The two faces of a federated method: a client LightningModule and a server step.

Every engine (local: in this process; flower: Flower messages) drives every method through this interface only:

    module.data = clients[k]; module.load_private_state(store[k])
    module.receive(algorithm.download(global_state, k))
    for phase in module.phases():  module.set_phase(phase); runner.fit(module, batches, phase.epochs)
    uploads.append(Upload(k, n_k, module.upload())); store[k] = module.private_state()
    global_state = algorithm.aggregate(global_state, uploads)

A method is one file: it declares its recipe keys as a frozen `Settings` dataclass, subclasses
`ClientModule` (its `phases()`: a few `Phase(...)` lines saying what trains on which loss) and `Algorithm`,
and registers itself with `@register`; the package imports every module in it, so nothing else is edited
to add a method (docs/architecture.md, "Write a method").
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pfl.algorithms.aggregation import Rule
from pfl.data.batches import BatchTransform
from pfl.data.partition import ClientData
from pfl.schema import Config, Field, FrozenTable, Tensors

# A setting's annotation -> its recipe kind (pfl.schema.Field). A `dict[str, int]` setting is a table of names
# to integers: `ranks = { cnn1 = 2 }` in the method's recipe table; its value in `Settings` is read-only.
_KINDS: dict[Any, str] = {int: "int", float: "float", str: "str", bool: "bool", dict[str, int]: "table[int]"}


def setting(default: Any, help: str, *, key: str | None = None, choices: tuple[str, ...] | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """A method's setting: a field of its `Settings` dataclass that is also the recipe key `<method>.<key>`
    (`key` defaults to the field's name; give it where the recipe's name is not an identifier: `lambda`).
    A `dict[str, int]` setting takes a dict default (usually `{}`); `low`/`high` bound each of its values and
    `check` gets the whole table (e.g. to check its names)."""
    spec = {"help": help, "key": key, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "check": check}
    if isinstance(default, dict):
        default = FrozenTable(default)  # immutable, so a dataclass default may be one
    return dataclasses.field(default=default, metadata={"pfl": spec})


@dataclass(frozen=True)
class Settings:
    """A method's own recipe keys, typed and read-only: `self.settings.rank`, never `settings["rank"]`.
    A method subclasses it (still `@dataclass(frozen=True)`) with one `setting(...)` per key. A table
    setting (`dict[str, int]`) holds a read-only dict (`FrozenTable`), so a `Settings` stays hashable."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict) and not isinstance(value, FrozenTable):
                object.__setattr__(self, f.name, FrozenTable(value))

    @classmethod
    def schema(cls) -> dict[str, Field]:
        """Recipe key (without the method's prefix) -> its declaration, for the recipe reader."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            spec = dict(f.metadata["pfl"])
            key = spec.pop("key") or f.name
            if hints[f.name] not in _KINDS:
                raise TypeError(f"{cls.__qualname__}.{f.name}: a setting is one of "
                                f"{', '.join(map(_type_name, _KINDS))}, got {_type_name(hints[f.name])}")
            default = dict(f.default) if isinstance(f.default, dict) else f.default  # a Config holds plain dicts
            out[key] = Field(_KINDS[hints[f.name]], default, **spec)
        return out

    @classmethod
    def from_config(cls, cfg: Config, method: str) -> Settings:
        values = {}
        for f in dataclasses.fields(cls):
            values[f.name] = cfg[f"{method}.{f.metadata['pfl']['key'] or f.name}"]
        return cls(**values)


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


@dataclass(frozen=True, eq=False)
class Phase:
    """One training phase of a client's round, carrying everything that makes it differ from another phase:
    what trains (modules or single parameters; everything else is frozen), on which loss, for how many
    epochs; optionally its learning rate (default: the recipe's `lr`), parameters that train at their own
    learning rate (optimiser parameter groups), a projection after every optimiser step, frozen modules
    that stay in eval mode while it trains (their batch-norm statistics and dropout stay untouched), and the
    training samples it trains on (indices into the client's training data; default: all of them; FedL2G
    holds its quiz split out of local training).

    Every phase gets a fresh SGD optimiser (the recipe's momentum and weight decay) in every client round."""

    name: str
    epochs: int
    trains: Sequence[nn.Module | nn.Parameter]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) on the device -> scalar loss
    lr: float | None = None
    own_lr: Sequence[tuple[nn.Parameter, float]] = ()
    after_step: Callable[[], None] | None = None
    eval_mode: Sequence[nn.Module] = ()
    samples: torch.Tensor | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The trained parameters, in the order of `trains`."""
        out: list[nn.Parameter] = []
        for part in self.trains:
            out.extend([part] if isinstance(part, nn.Parameter) else part.parameters())
        return out


@dataclass(frozen=True)
class TaskSpec:
    """What a method needs to know about the task to build client modules. A text task's `image_shape` is
    (max_len,) and its `transform` keeps token ids as they are; `vocab_size` is 0 for images."""

    image_shape: tuple[int, ...]
    num_classes: int
    representation_dim: int
    transform: BatchTransform
    vocab_size: int = 0


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
    """Client side of a method. A subclass declares its `phases` (what trains, on which loss), what it does
    with what the server sends (`receive`) and what it sends back (`upload`); this base class does the
    freezing, the optimiser, on-device transforms, private state and accuracy.

    The engine loads one module per architecture with a client's `data` and private state, then
    `receive`s, trains every phase, `upload`s and stores `private_state()`."""

    def __init__(self, model: nn.Module, cfg: Config, transform: BatchTransform, num_classes: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.batch_transform = transform
        self.num_classes = num_classes
        self.phase: Phase | None = None
        # the client this module is loaded for (set by the engine with its private state): raw training, test
        # and validation data, on the CPU, or on the device when the run keeps client data there (--resident)
        self.data: ClientData | None = None
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # where `keep` puts private-state copies: the CPU, or the device when the run keeps states there
        self.state_device = torch.device("cpu")
        self._loss_sum = torch.zeros(())
        self._loss_steps = 0

    # --- what a method defines -------------------------------------------------------------
    def phases(self) -> list[Phase]:
        """The round's training phases, in order."""
        raise NotImplementedError

    def receive(self, payload: Tensors) -> None:
        """Load what the server sent this client."""

    def start(self, payload: Tensors) -> None:
        """Extension point: set up a fresh client from the server's initial broadcast, before its first round.
        Default: receive it. A method whose `receive` is a per-round update rather than a load (FedSSA's
        fusion of head rows) overrides it."""
        self.receive(payload)

    def upload(self) -> Tensors:
        """What goes to the server after training (methods whose upload summarises the client's training
        data, such as per-class prototypes, read it from `self.data`)."""
        raise NotImplementedError

    def private_modules(self) -> dict[str, nn.Module]:
        """Modules besides `model` that are this client's own between rounds, by state-name prefix (pFedLoRA's
        adapter, FedMRL's small model and projector, pFedAFM's mixing weights). Default: none."""
        return {}

    def prepare_eval(self, download: Tensors) -> None:
        """Put the module in the configuration personalised evaluation uses, given what the server sends the
        client now (default: as trained; a method evaluating with a global part loads it from `download`)."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores for personalised evaluation (argmax = the prediction). Default: the logits of
        `forward`; a method with another inference rule (nearest prototype) overrides it."""
        return self(x)

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Method-specific measurements after a client's round, on a sample of its training data
        (averaged over the round's clients into metrics.csv). Default: none."""
        return {}

    # --- shared machinery -------------------------------------------------------------------
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def transform(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Raw uint8 images -> normalised floats in the module's dtype (a true-precision run, bf16-true or
        64-true, converts the module once; every method's own data path then follows it). Token ids of a text
        task stay int64."""
        out = self.batch_transform(x, train)
        return out if out.dtype == self.dtype or not out.is_floating_point() else out.to(self.dtype)

    def phase_named(self, name: str) -> Phase:
        for phase in self.phases():
            if phase.name == name:
                return phase
        raise ValueError(f"{type(self).__name__} has no phase {name!r}; its phases are "
                         f"{', '.join(p.name for p in self.phases())}")

    def set_phase(self, phase: Phase | str) -> None:
        """Freeze everything, then unfreeze exactly the phase's trainable parameters."""
        self.phase = self.phase_named(phase) if isinstance(phase, str) else phase
        trainable = {id(p) for p in self.phase.parameters()}
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
        # them in eval mode. The phase's frozen parts go back to eval mode in on_train_epoch_start.
        self.train()

    def on_train_epoch_start(self) -> None:
        for module in self.phase.eval_mode:
            module.eval()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.transform(x, train=self.training), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.phase.loss(x, y)
        # summed on the device: no host sync per step
        self._loss_sum = loss.detach().float() if self._loss_steps == 0 else self._loss_sum + loss.detach().float()
        self._loss_steps += 1
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.phase.after_step is not None:
            self.phase.after_step()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(self.predict(x).argmax(dim=1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The phase's fresh SGD: its learning rate, and one parameter group per parameter with its own."""
        phase = self.phase
        params = [p for p in phase.parameters() if p.requires_grad]
        lr = self.cfg.lr if phase.lr is None else phase.lr
        own = {id(p): rate for p, rate in phase.own_lr}
        groups: Any = params
        if own:
            groups = [{"params": [p for p in params if id(p) not in own]},
                      *({"params": [p], "lr": own[id(p)]} for p in params if id(p) in own)]
        return torch.optim.SGD(groups, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)


class LocalClient(ClientModule):
    """One phase, "local": the whole private model trains on `local_loss` (default CE). Methods that differ
    only in what they receive and send (standalone, LG-FedAvg, FedAvg, FedGH), or add a term to the loss
    (FedProto, FD, FedTGP), build on this."""

    def phases(self) -> list[Phase]:
        return [Phase("local", self.cfg.local_epochs, trains=[self.model], loss=self.local_loss)]

    def local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


class ClassSums:
    """Per-class sum and count of representations, added on the device they were computed on (no host sync
    per step), in float32 or wider whatever the run's precision: plain tensors, not buffers, which a
    true-half precision would convert to its dtype."""

    def __init__(self, num_classes: int, dim: int):
        self.num_classes, self.dim = num_classes, dim
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def reset(self) -> None:
        self.sums = self.counts = None

    @torch.no_grad()
    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        if self.sums is None:
            dtype = torch.promote_types(h.dtype, torch.float32)
            self.sums = torch.zeros(self.num_classes, self.dim, dtype=dtype, device=h.device)
            self.counts = torch.zeros(self.num_classes, dtype=torch.int64, device=h.device)
        self.sums.index_add_(0, y, h.detach().to(self.sums.dtype))
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.int64))

    def means(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels [m] int64, means [m, d] float32, counts [m] int64) of the m classes added, on the CPU."""
        if self.sums is None:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        sums, counts = self.sums.cpu(), self.counts.cpu()
        present = torch.nonzero(counts > 0).flatten()
        return present, (sums[present] / counts[present].unsqueeze(1).to(sums.dtype)).float(), counts[present]


PROTOTYPE_SOURCES = ("after_training", "training_pass", "before_training")


class PrototypeClient(LocalClient):
    """A LocalClient that uploads per-class prototypes (FedProto, FedGH, FedTGP), taken where its
    `prototypes_from` says; libraries differ here, and the difference moves accuracy:

    - "after_training": a pass of the trained model over the whole training set in eval mode;
    - "training_pass": the mean of the phi(x) its training steps computed (train mode, each before its step,
      on the batches as trained: every local epoch, the last partial batch included), as HtFLlib's FedProto;
    - "before_training": the "after_training" pass with the model as it was when training began (HtFLlib's
      and the authors' FedTGP reload the round-start model before computing them).

    `local_loss` computes phi(x) through `represent`, which counts it in "training_pass" mode."""

    def __init__(self, model, cfg: Config, transform: BatchTransform, num_classes: int, prototypes_from: str):
        super().__init__(model, cfg, transform, num_classes)
        if prototypes_from not in PROTOTYPE_SOURCES:
            raise ValueError(f"prototypes_from must be one of {', '.join(PROTOTYPE_SOURCES)}, got {prototypes_from!r}")
        self.prototypes_from = prototypes_from
        self.seen = ClassSums(num_classes, model.representation_dim)
        self.round_start_state: Tensors | None = None

    def on_train_start(self) -> None:
        super().on_train_start()
        self.seen.reset()  # here, after the engine's FLOP measurement step, whose loss must not count
        if self.prototypes_from == "before_training":
            self.round_start_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def represent(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """phi(x) for the loss; counted into the class sums when prototypes come from the training pass."""
        h = self.model.phi(x)
        if self.prototypes_from == "training_pass":
            self.seen.add(h, y)
        return h

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, prototypes, counts) of the classes of the client's training data; counts are the classes'
        training samples whatever the source (a training pass sees each sample once per epoch)."""
        data = self.data
        if self.prototypes_from == "training_pass":
            labels, protos, _ = self.seen.means()
            return labels, protos, torch.bincount(data.y_train.cpu(), minlength=self.num_classes)[labels]
        if self.prototypes_from == "after_training":
            return class_prototypes(self.model, self.transform, data.x_train, data.y_train, self.num_classes)
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.round_start_state)
        try:
            return class_prototypes(self.model, self.transform, data.x_train, data.y_train, self.num_classes)
        finally:
            self.model.load_state_dict(trained)
            self.round_start_state = None


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

        return build_model(arch, self.spec.image_shape, self.spec.num_classes, self.spec.representation_dim,
                           self.spec.vocab_size)

    def architectures(self) -> list[str]:
        """Client k's architecture at index k, as every engine assigns them (a server that rebuilds a client's
        head reads it here)."""
        from pfl.models import assign_architectures

        return assign_architectures(self.cfg.num_clients, self.cfg.model_setting, self.cfg.model_zoo)

    def common_head(self) -> nn.Module:
        """A fresh head of the structure every client has (a method that exchanges heads calls `one_head` in
        its `check_config`, so there is exactly one): a linear d -> C, or the zoo's deeper head."""
        from pfl.models.zoo import build_head, split_architecture

        widths = split_architecture(self.architectures()[0])[1]
        return build_head(self.spec.representation_dim, widths, self.spec.num_classes)

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


def one_head(cfg: Config, method: str, what: str) -> None:
    """`check_config` of a method that exchanges `what` of its clients' heads: refuse a zoo whose clients'
    heads differ (pfl.models.zoo.head_problem), with one line naming the heads."""
    from pfl.errors import ConfigError
    from pfl.models import assign_architectures, head_problem

    problem = head_problem(method, assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo), what)
    if problem:
        raise ConfigError(problem)


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
