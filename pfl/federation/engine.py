"""The `local` engine: rounds run in this process, clients one after another, on one device.

The loop knows nothing about any method: it samples clients, loads each one's private state into a module
(one cached module per architecture), lets the method's phases train through one reused lean Lightning
Trainer, collects uploads, calls the method's server step, and evaluates every client's personalised
model every `eval_every` rounds. Bytes are counted from the payloads actually exchanged; FLOPs are measured
(pfl/federation/costs.py) on the real training steps, the upload's computation and the server step.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch

from pfl.algorithms.base import Algorithm, ClientModule, Tensors, Upload, payload_bytes, payload_params
from pfl.config import Config
from pfl.data.batches import TensorBatches
from pfl.data.partition import ClientData
from pfl.errors import PflUserError
from pfl.federation.costs import FlopMeter, count_flops
from pfl.federation.seeding import derive_seed

EVAL_BATCH_SIZE = 512
DIAGNOSTIC_SAMPLES = 256  # training samples per client on which a method's diagnostics are measured
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def quiet_lightning() -> None:
    """Client fits are many and short: Lightning's per-fit banners and hints would drown the run's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*AMP with fp16 is not supported on CPU.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def make_trainer(accelerator: str = "cpu", devices: Any = 1, precision: str = "32-true",
                 grad_clip: float = 0.0) -> L.Trainer:
    """One lean Trainer for all client fits of a run (Lightning's barebones mode).

    Raises PflUserError when the hardware lacks the accelerator or precision asked for.
    """
    quiet_lightning()
    if precision not in PRECISIONS:
        raise PflUserError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        # barebones: no logger, checkpoints, progress bar, summary, sanity check or per-step logging
        # machinery; measured ~3% faster per local epoch than switching those off one by one.
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, precision=precision, max_epochs=0, barebones=True,
            gradient_clip_val=grad_clip if grad_clip > 0 else None, gradient_clip_algorithm="norm",
        )
    except Exception as exc:  # Lightning raises several types for unavailable hardware
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PflUserError(f"--accelerator/--devices/--precision: {accelerator}/{devices}/{precision} "
                           f"cannot be used here: {first}") from None
    on_cpu = type(trainer.accelerator).__name__ == "CPUAccelerator"
    if on_cpu and precision in ("16-mixed", "16-true"):
        # Lightning would silently switch 16-mixed to bf16 on a CPU; say so instead of running something else.
        raise PflUserError(f"--precision: {precision} (float16) needs a GPU and this run is on the CPU; "
                           f"use bf16-mixed or 32-true")
    return trainer


class ClientRunner:
    """Trains and evaluates client modules with one reused Trainer.

    A reused Trainer's `fit` is a silent no-op unless `fit_loop.max_epochs` is raised first; this class
    raises it before every fit and checks afterwards that steps actually ran.
    """

    def __init__(self, trainer: L.Trainer):
        self.trainer = trainer
        self.flop_meter = FlopMeter()

    @property
    def device(self) -> torch.device:
        """The device client fits run on (Lightning moves modules back to the CPU after each fit)."""
        return self.trainer.strategy.root_device

    def fit_phases(self, module: ClientModule, data: ClientData, batch_size: int, seed: int,
                   arch: str = "") -> tuple[dict[str, float], int]:
        """Train every phase of the method; returns the mean loss per phase and the training FLOPs."""
        losses, flops = {}, 0
        for phase in module.phases():
            module.set_phase(phase.name)
            flops += self.flop_meter.phase_flops(module, arch or type(module.model).__name__, phase.name,
                                                 phase.epochs, data.x_train, data.y_train, batch_size)
            torch.manual_seed(derive_seed(seed, phase.name, "augment"))
            batches = TensorBatches(data.x_train, data.y_train, batch_size, shuffle=True,
                                    seed=derive_seed(seed, phase.name, "order"))
            self.trainer.fit_loop.max_epochs = self.trainer.current_epoch + phase.epochs
            self.trainer.fit(module, train_dataloaders=batches)
            expected = phase.epochs * len(batches)
            if module.steps_in_phase != expected:
                raise RuntimeError(f"phase {phase.name!r} of client {data.client_id} ran "
                                   f"{module.steps_in_phase} steps, expected {expected}")
            losses[phase.name] = module.mean_phase_loss()
        return losses, flops

    def evaluate(self, module: ClientModule, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy on (x, y); NaN for an empty test set."""
        if len(y) == 0:
            return math.nan
        module.val_accuracy.reset()
        self.trainer.validate(module, dataloaders=TensorBatches(x, y, EVAL_BATCH_SIZE, shuffle=False),
                              verbose=False)
        acc = float(module.val_accuracy.compute())
        module.val_accuracy.reset()
        return acc


class Callbacks:
    """What a front end (the CLI's progress display, a notebook) hears from a run. All optional."""

    def on_round_start(self, round_idx: int, sampled: list[int]) -> None: ...

    def on_client_done(self, round_idx: int, client_id: int, done: int, total: int) -> None: ...

    def on_evaluate_start(self, round_idx: int) -> None: ...

    def on_round_end(self, record: dict[str, Any]) -> None: ...


class CallbackList(Callbacks):
    """Fans every event out to several callbacks, in order."""

    def __init__(self, *callbacks: Callbacks | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_round_start(self, round_idx, sampled):
        for c in self.callbacks:
            c.on_round_start(round_idx, sampled)

    def on_client_done(self, round_idx, client_id, done, total):
        for c in self.callbacks:
            c.on_client_done(round_idx, client_id, done, total)

    def on_evaluate_start(self, round_idx):
        for c in self.callbacks:
            c.on_evaluate_start(round_idx)

    def on_round_end(self, record):
        for c in self.callbacks:
            c.on_round_end(record)


def sample_clients(num_clients: int, participation: float, seed: int, round_idx: int) -> list[int]:
    """K = max(1, round(C * N)) distinct clients (round half up), seeded per round."""
    k = max(1, int(math.floor(participation * num_clients + 0.5)))
    rng = np.random.default_rng([seed, 2, round_idx])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


ACCURACY_COLUMNS = ("acc_mean", "acc_weighted", "acc_std", "acc_min", "acc_max")


def _mean(values) -> float:
    return float(np.mean(list(values)))


def summarise_accuracies(accs: list[float], weights: list[int]) -> dict[str, float]:
    """Unweighted mean (the headline), sample-weighted mean, std, min, max over clients with a test set."""
    pairs = [(a, w) for a, w in zip(accs, weights) if not math.isnan(a)]
    if not pairs:
        return dict.fromkeys(ACCURACY_COLUMNS, math.nan)
    a = np.array([p[0] for p in pairs])
    w = np.array([p[1] for p in pairs], dtype=np.float64)
    return {"acc_mean": float(a.mean()), "acc_weighted": float((a * w).sum() / w.sum()),
            "acc_std": float(a.std()), "acc_min": float(a.min()), "acc_max": float(a.max())}


@dataclass
class ClientResult:
    """What one client's round produced: what it received and sent, its phase losses and diagnostics."""

    download: Tensors
    upload: Upload
    losses: dict[str, float]
    diagnostics: dict[str, float]
    flops: int  # training steps, plus whatever receiving the download and computing the upload took


@dataclass
class RunState:
    """Everything the loop carries from round to round besides the client store."""

    global_state: Tensors
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_accuracies: list[float] = field(default_factory=list)


class FederatedRun:
    def __init__(self, cfg: Config, clients: list[ClientData], architectures: list[str], algorithm: Algorithm,
                 store, runner: ClientRunner, callbacks: Callbacks | None = None):
        self.cfg = cfg
        self.clients = clients
        self.architectures = architectures
        self.algorithm = algorithm
        self.store = store
        self.runner = runner
        self.callbacks = callbacks or Callbacks()
        self._modules: dict[str, ClientModule] = {}
        self.state = RunState(global_state={})

    # -- set-up -----------------------------------------------------------------------------
    def initialise(self) -> None:
        """Seeded initial server state and every client's initial private state (into the store)."""
        torch.manual_seed(derive_seed(self.cfg.seed, "server-init"))
        self.state = RunState(global_state=self.algorithm.initial_global())
        for k, arch in enumerate(self.architectures):
            torch.manual_seed(derive_seed(self.cfg.seed, "client-init", k))
            module = self.algorithm.make_client(arch)
            module.receive(self.algorithm.download(self.state.global_state, k))
            self.store.put(k, module.private_state())

    def module_for(self, client_id: int) -> ClientModule:
        """The cached module of the client's architecture, loaded with the client's private state."""
        arch = self.architectures[client_id]
        if arch not in self._modules:
            self._modules[arch] = self.algorithm.make_client(arch)
        module = self._modules[arch]
        module.load_private_state(self.store.get(client_id))
        return module

    # -- rounds -----------------------------------------------------------------------------
    def run(self) -> RunState:
        while self.state.round < self.cfg.rounds:
            self.run_round()
        return self.state

    def train_client(self, round_idx: int, client_id: int) -> ClientResult:
        """One client's part of a round: load its state, receive, train every phase, measure, upload, and
        put its new private state back in the store. (A Flower ClientApp needs exactly this.)"""
        data = self.clients[client_id]
        module = self.module_for(client_id)
        download = self.algorithm.download(self.state.global_state, client_id)
        with count_flops() as receive_flops:
            module.receive(download)
        losses, flops = self.runner.fit_phases(module, data, self.cfg.batch_size,
                                               derive_seed(self.cfg.seed, "fit", round_idx, client_id),
                                               self.architectures[client_id])
        module.to(self.runner.device)  # diagnostics and uploads that compute (prototypes) run where training did
        diagnostics = module.diagnostics(data.x_train[:DIAGNOSTIC_SAMPLES], data.y_train[:DIAGNOSTIC_SAMPLES])
        with count_flops() as upload_flops:
            tensors = module.upload(data.x_train, data.y_train)
        upload = Upload(client_id, data.num_train, tensors)
        self.store.put(client_id, module.private_state())
        return ClientResult(download, upload, losses, diagnostics, receive_flops() + flops + upload_flops())

    def run_round(self) -> dict[str, Any]:
        t = self.state.round + 1
        started = time.perf_counter()
        sampled = sample_clients(len(self.clients), self.cfg.participation, self.cfg.seed, t)
        self.callbacks.on_round_start(t, sampled)
        results = []
        for i, k in enumerate(sampled):
            results.append(self.train_client(t, k))
            self.callbacks.on_client_done(t, k, i + 1, len(sampled))
        with count_flops() as server_flops:
            self.state.global_state = self.algorithm.aggregate(self.state.global_state,
                                                               [r.upload for r in results])
        train_seconds = time.perf_counter() - started

        record: dict[str, Any] = {"round": t, "clients": len(sampled)}
        phase_names = list(results[0].losses)
        record["train_loss"] = _mean(r.losses[phase_names[0]] for r in results) if phase_names else math.nan
        for name in phase_names:
            record[f"loss_{name}"] = _mean(r.losses[name] for r in results)
        for name in results[0].diagnostics:
            record[name] = _mean(r.diagnostics[name] for r in results)
        record.update(
            params_up=sum(payload_params(r.upload.tensors) for r in results),
            params_down=sum(payload_params(r.download) for r in results),
            bytes_up=sum(payload_bytes(r.upload.tensors) for r in results),
            bytes_down=sum(payload_bytes(r.download) for r in results),
        )
        record.update(flops_client=sum(r.flops for r in results), flops_server=server_flops())
        previous = self.state.history[-1] if self.state.history else {"bytes_cumulative": 0, "flops_cumulative": 0}
        record["bytes_cumulative"] = previous["bytes_cumulative"] + record["bytes_up"] + record["bytes_down"]
        record["flops_cumulative"] = previous["flops_cumulative"] + record["flops_client"] + record["flops_server"]

        eval_seconds = 0.0
        if t % self.cfg.eval_every == 0 or t == self.cfg.rounds:
            self.callbacks.on_evaluate_start(t)
            eval_started = time.perf_counter()
            self.state.last_accuracies = self.evaluate_all()
            eval_seconds = time.perf_counter() - eval_started
            record.update(summarise_accuracies(self.state.last_accuracies, [len(c.y_test) for c in self.clients]))
        else:
            record.update(dict.fromkeys(ACCURACY_COLUMNS, math.nan))
        record.update(train_seconds=round(train_seconds, 4), eval_seconds=round(eval_seconds, 4))
        self.state.round = t
        self.state.history.append(record)
        self.callbacks.on_round_end(record)
        return record

    def evaluate_all(self) -> list[float]:
        """Personalised accuracy of every client on its own test set (the store is not modified)."""
        accs = []
        for k, data in enumerate(self.clients):
            module = self.module_for(k)
            module.prepare_eval(self.algorithm.download(self.state.global_state, k))
            accs.append(self.runner.evaluate(module, data.x_test, data.y_test))
        return accs
