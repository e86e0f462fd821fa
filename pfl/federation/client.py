"""The client side of pfl, wherever it runs (mirroring Flower's ClientApp): the local engine calls it in this
process, a Flower ClientApp (pfl.flower.app) inside a SuperNode.

A `ClientWorker` holds its clients' data and the store of their private states. For one client and round it
loads the client's private state into a module (one cached module per architecture), receives the download,
lets the method's phases train through the one `ClientRunner` (a lean loop under Lightning Fabric), measures
the FLOPs of the real training steps and of computing the upload (pfl/federation/costs.py), and returns the
upload as it travels (`on_the_wire`). Nothing here depends on the engine or the round loop.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric import Fabric

from pfl.algorithms.base import Algorithm, ClientModule, Tensors, Upload
from pfl.data.batches import TensorBatches
from pfl.data.partition import ClientData
from pfl.errors import DataError, PflUserError
from pfl.federation.costs import FlopMeter, count_flops
from pfl.schema import Config
from pfl.seeding import derive_seed

EVAL_BATCH_SIZE = 512
DIAGNOSTIC_SAMPLES = 256  # training samples per client on which a method's diagnostics are measured
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def quiet_lightning() -> None:
    """Client fits are many and short: Lightning's per-fit banners and hints would drown the run's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*AMP with fp16 is not supported on CPU.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def make_runner(accelerator: str = "cpu", devices: Any = 1, precision: str = "32-true",
                grad_clip: float = 0.0) -> ClientRunner:
    """The one ClientRunner of a run: Lightning Fabric on one device at the asked precision.

    Raises PflUserError when the hardware lacks the accelerator or precision asked for.
    """
    quiet_lightning()
    # Same recipe + seed => same result: deterministic kernels where torch has them (warn where it has not).
    torch.use_deterministic_algorithms(True, warn_only=True)
    if precision not in PRECISIONS:
        raise PflUserError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, precision=precision)
    except Exception as exc:  # Lightning raises several types for unavailable hardware
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PflUserError(f"--accelerator/--devices/--precision: {accelerator}/{devices}/{precision} "
                           f"cannot be used here: {first}") from None
    if fabric.device.type == "cpu" and precision in ("16-mixed", "16-true"):
        # Lightning would silently switch 16-mixed to bf16 on a CPU; say so instead of running something else.
        raise PflUserError(f"--precision: {precision} (float16) needs a GPU and this run is on the CPU; "
                           f"use bf16-mixed or 32-true")
    return ClientRunner(fabric, grad_clip)


class ClientRunner:
    """Trains and evaluates client modules: a lean loop under Lightning Fabric that calls the module's own
    Lightning hooks (configure_optimizers, on_train_start, on_train_epoch_start, on_after_batch_transfer,
    training_step, on_train_batch_end, validation_step) in the Trainer's order.

    Why not `Trainer.fit` per phase: a cross-device client trains for a handful of steps, and a Trainer's
    per-fit set-up and teardown (which also moves the module back to the CPU) and per-step hook machinery
    cost pfl 1.5x a plain PyTorch loop there. Fabric keeps what matters of Lightning: the device, precision
    plugins (autocast, loss scaling, true-half conversion) and gradient clipping through the strategy. A
    module stays on the device between fits.
    """

    def __init__(self, fabric: Fabric, grad_clip: float = 0.0):
        self.fabric = fabric
        self.precision = fabric.strategy.precision
        self.grad_clip = grad_clip
        self.flop_meter = FlopMeter(self.precision)
        self._batch_norm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> has batch norm

    @property
    def device(self) -> torch.device:
        """The device client modules train and evaluate on."""
        return self.fabric.device

    def place(self, module: ClientModule) -> ClientModule:
        """The module on the device in the precision's dtype (converted and moved once: methods update their
        buffers in place, so a module stays where it was put unless someone moved it)."""
        if module not in self._batch_norm:
            self.precision.convert_module(module)
            self._batch_norm[module] = has_batch_norm(module)
            return module.to(self.device)
        first = next(module.parameters(), None)
        return module if first is None or first.device == self.device else module.to(self.device)

    def _on_device(self, module: ClientModule, batch: tuple[torch.Tensor, ...]) -> Any:
        batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
        return self.precision.convert_input(module.on_after_batch_transfer(batch, 0))

    def fit(self, module: ClientModule, batches: TensorBatches, epochs: int) -> None:
        """`epochs` passes over `batches` in the module's current phase, with a fresh optimiser from the
        module's `configure_optimizers`. No host synchronisation per step (losses accumulate on the device)."""
        self.place(module)
        strategy = self.fabric.strategy
        with torch.enable_grad():
            module.on_train_start()
            optimizer = module.configure_optimizers()
            for _ in range(epochs):
                module.on_train_epoch_start()
                for i, batch in enumerate(batches):
                    batch = self._on_device(module, batch)
                    with self.precision.forward_context():
                        loss = module.training_step(batch, i)
                    optimizer.zero_grad(set_to_none=True)
                    strategy.backward(loss, module)
                    if self.grad_clip > 0:
                        strategy.clip_gradients_norm(module, optimizer, self.grad_clip, error_if_nonfinite=False)
                    strategy.optimizer_step(optimizer)
                    module.on_train_batch_end(loss, batch, i)
                module.on_train_epoch_end()
            module.on_train_end()

    def fit_phases(self, module: ClientModule, data: ClientData, batch_size: int, seed: int,
                   arch: str = "") -> tuple[dict[str, float], int]:
        """Train every phase of the method; returns the mean loss per phase and the training FLOPs."""
        losses, flops = {}, 0
        self.place(module)
        no_single = self._batch_norm[module]
        if no_single and data.num_train < 2:
            raise DataError(f"client {data.client_id} has {data.num_train} training sample; its model "
                            f"({arch}) uses batch normalisation, which needs at least 2 samples per batch")
        for phase in module.phases():
            module.set_phase(phase)
            x, y = data.x_train, data.y_train
            if phase.samples is not None:  # the phase trains on part of the training data (FedL2G's quiz held out)
                x, y = x[phase.samples.to(x.device)], y[phase.samples.to(y.device)]
            batches = TensorBatches(x, y, batch_size, shuffle=True, seed=derive_seed(seed, phase.name, "order"),
                                    no_single=no_single)
            flops += self.flop_meter.phase_flops(module, arch or type(module.model).__name__, phase.name,
                                                 phase.epochs, x, y, batches.sizes())
            # seeded after the FLOP measurement, whose one-off step may draw (dropout) the first time only
            torch.manual_seed(derive_seed(seed, phase.name, "augment"))
            self.fit(module, batches, phase.epochs)
            expected = phase.epochs * len(batches)
            if module.steps_in_phase != expected:
                raise RuntimeError(f"phase {phase.name!r} of client {data.client_id} ran "
                                   f"{module.steps_in_phase} steps, expected {expected}")
            losses[phase.name] = module.mean_phase_loss()
        return losses, flops

    @torch.no_grad()
    def evaluate(self, module: ClientModule, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy on (x, y) by the module's `validation_step`; NaN for an empty test set."""
        if len(y) == 0:
            return math.nan
        self.place(module)
        was_training = module.training
        module.eval()
        module.val_accuracy.reset()
        for i, batch in enumerate(TensorBatches(x, y, EVAL_BATCH_SIZE, shuffle=False)):
            batch = self._on_device(module, batch)
            with self.precision.forward_context():
                module.validation_step(batch, i)
        acc = float(module.val_accuracy.compute())
        module.val_accuracy.reset()
        module.train(was_training)
        return acc


def on_the_wire(t: torch.Tensor) -> torch.Tensor:
    """An upload tensor as it travels: on the CPU, floats in float32 whatever precision the client computed
    in (bf16-true, 64-true), so the server's templates and aggregation see one dtype."""
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t if t.device.type == "cpu" else t.cpu()


def has_batch_norm(module: torch.nn.Module) -> bool:
    """Whether any sub-module normalises over the batch (it cannot train on a batch of one sample)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@dataclass
class ClientResult:
    """What one client's round produced: its upload, its phase losses and diagnostics, and the FLOPs of
    receiving the download, training and computing the upload."""

    upload: Upload
    losses: dict[str, float]
    diagnostics: dict[str, float]
    flops: int


def seeded_initial_global(algorithm: Algorithm, seed: int) -> Tensors:
    """The server's state before round 1; the same wherever it is computed (server or a client)."""
    torch.manual_seed(derive_seed(seed, "server-init"))
    return algorithm.initial_global()


class ClientWorker:
    """The client side of the protocol, wherever it runs: the local engine calls it in-process, a Flower
    ClientApp calls it inside a SuperNode. It holds the clients' data, the store of their private states,
    one cached module per architecture and the runner; nothing in it depends on the engine."""

    def __init__(self, cfg: Config, clients: list[ClientData], architectures: list[str], algorithm: Algorithm,
                 store, runner: ClientRunner):
        self.cfg = cfg
        self.clients = clients
        self.architectures = architectures
        self.algorithm = algorithm
        self.store = store
        self.runner = runner
        self._modules: dict[str, ClientModule] = {}

    def initialise(self, client_id: int, initial_global: Tensors) -> None:
        """Client `client_id`'s seeded initial private state, put in the store."""
        torch.manual_seed(derive_seed(self.cfg.seed, "client-init", client_id))
        module = self.algorithm.make_client(self.architectures[client_id])
        module.data = self.clients[client_id]
        module.start(self.algorithm.download(initial_global, client_id))
        self.store.put(client_id, module.private_state())

    def ensure_initialised(self, client_id: int) -> None:
        """Initialise a client on first contact (a Flower node), exactly as the local engine does up front."""
        if client_id not in self.store:
            self.initialise(client_id, seeded_initial_global(self.algorithm, self.cfg.seed))

    def module_for(self, client_id: int) -> ClientModule:
        """The cached module of the client's architecture, loaded with the client's private state."""
        arch = self.architectures[client_id]
        if arch not in self._modules:
            self._modules[arch] = self.algorithm.make_client(arch)
        module = self._modules[arch]
        module.state_device = self.store.device
        module.load_private_state(self.store.get(client_id))
        module.data = self.clients[client_id]
        return module

    def train(self, round_idx: int, client_id: int, download: Tensors) -> ClientResult:
        """One client's part of a round: load its state, receive, train every phase, measure, upload, and
        put its new private state back in the store."""
        data = self.clients[client_id]
        module = self.module_for(client_id)
        with count_flops() as receive_flops:
            module.receive(download)
        losses, flops = self.runner.fit_phases(module, data, self.cfg.batch_size,
                                               derive_seed(self.cfg.seed, "fit", round_idx, client_id),
                                               self.architectures[client_id])
        every = self.cfg.diagnostics_every
        diagnostics = (module.diagnostics(data.x_train[:DIAGNOSTIC_SAMPLES], data.y_train[:DIAGNOSTIC_SAMPLES])
                       if every and round_idx % every == 0 else {})
        with count_flops() as upload_flops:
            tensors = module.upload()
        tensors = {k: on_the_wire(v) for k, v in tensors.items()}
        self.store.put(client_id, module.private_state())
        return ClientResult(Upload(client_id, data.num_train, tensors), losses, diagnostics,
                            receive_flops() + flops + upload_flops())

    def evaluate(self, client_id: int, download: Tensors, split: str = "test") -> float:
        """Personalised accuracy of one client on its own `split` ("test" or "val"), by the method's inference
        rule, at the recipe's `evaluate_at`: the model as it last trained ("after_training"), or as it is
        after receiving `download` at the start of the next round ("round_start"). The store is not modified."""
        x, y = self.clients[client_id].split(split)
        module = self.module_for(client_id)
        if self.cfg.evaluate_at == "round_start":
            module.receive(download)
        module.prepare_eval(download)
        return self.runner.evaluate(module, x, y)
