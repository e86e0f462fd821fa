"""The round loop of every engine (`FederatedRun`), the engine protocol as the loop sees it (`Workers`) and
the `local` engine (`LocalWorkers`: rounds in this process, clients one after another, on one device). The
client side, wherever it runs, is pfl.federation.client; the `flower` engine's dispatcher is
pfl.flower.app.FlowerWorkers.

The loop knows nothing about any method: it samples clients, sends each its download through the engine,
checks every update, lets the method's server step aggregate the accepted ones, and evaluates every
client's personalised model every `eval_every` rounds. Bytes are counted from the payloads actually
exchanged; FLOPs are those the clients measured (training steps, receiving, the upload's computation) plus
the server step's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pfl.algorithms.base import Algorithm, Tensors, payload_bytes, payload_params
from pfl.data.partition import ClientData
from pfl.errors import RunFailed
from pfl.federation.client import ClientResult, ClientRunner, ClientWorker, seeded_initial_global
from pfl.federation.costs import count_flops
from pfl.schema import Config

log = logging.getLogger("pfl")

CLIENT_CURVES_MAX = 20  # runs with at most this many clients keep every evaluated round's per-client accuracy


def nonfinite(tensors: Tensors) -> list[str]:
    """Names of the floating tensors in `tensors` with a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


class Callbacks:
    """What a front end (the CLI's progress display, a notebook, the run directory's writers) hears from a
    run. All optional. `on_run_start` hands over the run, for callbacks that read its state."""

    def on_run_start(self, run: FederatedRun) -> None: ...

    def on_round_start(self, round_idx: int, sampled: list[int]) -> None: ...

    def on_client_done(self, round_idx: int, client_id: int, done: int, total: int) -> None: ...

    def on_evaluate_start(self, round_idx: int) -> None: ...

    def on_round_end(self, record: dict[str, Any]) -> None: ...


class CallbackList(Callbacks):
    """Fans every event out to several callbacks, in order."""

    def __init__(self, *callbacks: Callbacks | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_run_start(self, run):
        for c in self.callbacks:
            c.on_run_start(run)

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
    k = max(1, math.floor(participation * num_clients + 0.5))
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


class NotSent(str):
    """Why a sampled client got nothing this round (its node is offline): its download is not counted."""


# What an engine's dispatcher returns per client: a result, or why there is none (crash, timeout, ...).
Outcome = ClientResult | str


class Workers(Protocol):
    """The engine, as the round loop sees it. `client_states(ids)` yields (client id, private state) for
    the clients `ids` (default: every client), for checkpoints and the run directory, or is None where the
    states live elsewhere (Flower nodes).

    `train(..., evaluate=splits)` announces that this round's evaluation (of every client, on `splits`) will
    follow and does not read the new server state (`Algorithm.evaluation_reads_download` is False): an
    engine whose messages are costly (Flower) tests each client in the same message wave as the training and
    answers the `evaluate` calls that follow from those results; the local engine ignores it."""

    def start(self, initial_global: Tensors) -> None: ...

    def train(self, round_idx: int, downloads: dict[int, Tensors], on_done: Callable[[int], None],
              evaluate: tuple[str, ...] = ()) -> dict[int, Outcome]: ...

    def evaluate(self, downloads: dict[int, Tensors], split: str) -> dict[int, float]: ...

    def client_states(self, ids: Iterable[int] | None = None) -> Iterator[tuple[int, Tensors]] | None: ...

    def restore(self, states: dict[int, Tensors]) -> None: ...


class LocalWorkers:
    """The `local` engine: every client in this process, one after another; it owns the clients' store."""

    def __init__(self, cfg: Config, clients: list[ClientData], architectures: list[str], algorithm: Algorithm,
                 store, runner: ClientRunner):
        self.worker = ClientWorker(cfg, clients, architectures, algorithm, store, runner)
        self.store = store

    def start(self, initial_global: Tensors) -> None:
        for k in range(len(self.worker.clients)):
            self.worker.initialise(k, initial_global)

    def train(self, round_idx: int, downloads: dict[int, Tensors], on_done, evaluate: tuple[str, ...] = ()
              ) -> dict[int, Outcome]:
        outcomes = {}
        for k, download in downloads.items():
            outcomes[k] = self.worker.train(round_idx, k, download)
            on_done(k)
        return outcomes

    def evaluate(self, downloads: dict[int, Tensors], split: str = "test") -> dict[int, float]:
        return {k: self.worker.evaluate(k, d, split) for k, d in downloads.items()}

    def client_states(self, ids: Iterable[int] | None = None) -> Iterator[tuple[int, Tensors]]:
        ids = range(len(self.worker.clients)) if ids is None else ids
        return ((k, self.store.get(k)) for k in ids)

    def restore(self, states: dict[int, Tensors]) -> None:
        for k, state in states.items():
            self.store.put(k, state)


@dataclass
class RunState:
    """Everything the loop carries from round to round besides the client states: the server state, the
    metrics rows, and every client's latest test (and validation) accuracy."""

    global_state: Tensors
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_accuracies: list[float] = field(default_factory=list)
    last_val_accuracies: list[float] = field(default_factory=list)
    # every evaluated round's per-client test accuracies ({"round", "accuracies"}), for runs of at most
    # CLIENT_CURVES_MAX clients (clients.png draws one curve per client)
    client_curves: list[dict[str, Any]] = field(default_factory=list)

    def progress(self) -> dict[str, Any]:
        """The JSON part of a checkpoint."""
        return {"history": self.history, "last_accuracies": self.last_accuracies,
                "last_val_accuracies": self.last_val_accuracies, "client_curves": self.client_curves}


class FederatedRun:
    """The round loop, the same for every engine: sample, dispatch (`workers`), check every update, let
    the method aggregate the accepted ones, account costs, evaluate. `workers` is the engine: in-process
    (`LocalWorkers`) or Flower messages (`pfl.flower.app.FlowerWorkers`)."""

    def __init__(self, cfg: Config, clients: list[ClientData], algorithm: Algorithm, workers: Workers,
                 callbacks: Callbacks | None = None):
        self.cfg = cfg
        self.clients = clients
        self.algorithm = algorithm
        self.workers = workers
        self.callbacks = callbacks or Callbacks()
        self.state = RunState(global_state={})

    @classmethod
    def local(cls, cfg: Config, clients: list[ClientData], architectures: list[str], algorithm: Algorithm,
              store, runner: ClientRunner, callbacks: Callbacks | None = None) -> FederatedRun:
        """A run on the local engine: every client in this process, states in `store`."""
        return cls(cfg, clients, algorithm, LocalWorkers(cfg, clients, architectures, algorithm, store, runner),
                   callbacks)

    # -- set-up -----------------------------------------------------------------------------
    def initialise(self) -> None:
        """Seeded initial server state; the engine initialises every client's private state from it."""
        self.state = RunState(global_state=seeded_initial_global(self.algorithm, self.cfg.seed))
        self.workers.start(self.state.global_state)
        self.callbacks.on_run_start(self)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint (`pfl.checkpoint.load`): the state after its round. Every random
        draw of later rounds is seeded by (seed, round, ...), so nothing else needs restoring."""
        self.state = RunState(global_state=checkpoint["global_state"], round=checkpoint["round"],
                              history=list(checkpoint["history"]),
                              last_accuracies=list(checkpoint["last_accuracies"]),
                              last_val_accuracies=list(checkpoint.get("last_val_accuracies", [])),
                              client_curves=list(checkpoint.get("client_curves", [])))
        self.workers.restore(checkpoint["clients"])
        self.callbacks.on_run_start(self)
    # -- rounds -----------------------------------------------------------------------------
    def run(self) -> RunState:
        while self.state.round < self.cfg.rounds:
            self.run_round()
        return self.state

    def _accept(self, t: int, sampled: list[int], outcomes: dict[int, Outcome]) -> list[ClientResult]:
        """The results whose update may be aggregated; every other sampled client is logged with why."""
        accepted, dropped = [], {}
        for k in sampled:
            outcome = outcomes.get(k, "no answer")
            if isinstance(outcome, str):
                dropped[k] = outcome
                continue
            problem = self.algorithm.upload_problem(outcome.upload, self.state.global_state)
            if problem:
                dropped[k] = f"update rejected: {problem}"
            else:
                accepted.append(outcome)
        for k, why in dropped.items():
            log.warning("round %d: client %d dropped from the aggregate: %s", t, k, why)
        if len(accepted) < self.cfg.min_clients:
            reasons = "; ".join(f"client {k}: {why}" for k, why in dropped.items())
            raise RunFailed(f"round {t}: {len(accepted)} of {len(sampled)} sampled clients returned a usable "
                            f"update, fewer than min_clients={self.cfg.min_clients} ({reasons})")
        return accepted

    def run_round(self) -> dict[str, Any]:
        t = self.state.round + 1
        started = time.perf_counter()
        sampled = sample_clients(len(self.clients), self.cfg.participation, self.cfg.seed, t)
        self.callbacks.on_round_start(t, sampled)
        downloads = {k: self.algorithm.download(self.state.global_state, k) for k in sampled}
        done = []

        def on_done(k: int) -> None:
            done.append(k)
            self.callbacks.on_client_done(t, k, len(done), len(sampled))

        evaluated = t % self.cfg.eval_every == 0 or t == self.cfg.rounds
        splits = (("test",) if self.cfg.eval_test else ()) + (("val",) if self.cfg.val_fraction > 0 else ())
        # an evaluation that does not read the new server state can travel with the training (one message wave)
        along = splits if evaluated and not self.algorithm.evaluation_reads_download() else ()
        outcomes = self.workers.train(t, downloads, on_done, along)
        received = [o for o in outcomes.values() if not isinstance(o, str)]
        results = self._accept(t, sampled, outcomes)
        with count_flops() as server_flops:
            aggregate = self.algorithm.aggregate(self.state.global_state, [r.upload for r in results])
        bad = nonfinite(aggregate)
        if bad:
            log.warning("round %d: the aggregate has non-finite values in %s; the previous server state is kept",
                        t, ", ".join(bad[:3]))
        else:
            self.state.global_state = aggregate
        train_seconds = time.perf_counter() - started

        record: dict[str, Any] = {"round": t, "clients": len(sampled), "clients_dropped": len(sampled) - len(results)}
        # every accepted result has the same phases (an engine drops replies that do not); diagnostics are
        # averaged over the clients that measured them
        phase_names = list(results[0].losses)
        record["train_loss"] = _mean(r.losses[phase_names[0]] for r in results) if phase_names else math.nan
        for name in phase_names:
            record[f"loss_{name}"] = _mean(r.losses[name] for r in results)
        for name in dict.fromkeys(n for r in results for n in r.diagnostics):
            record[name] = _mean(r.diagnostics[name] for r in results if name in r.diagnostics)
        # Costs count what travelled and ran: every download sent, every update received (rejected ones too).
        sent = [d for k, d in downloads.items() if not isinstance(outcomes.get(k), NotSent)]
        record.update(
            params_up=sum(payload_params(r.upload.tensors) for r in received),
            params_down=sum(payload_params(d) for d in sent),
            bytes_up=sum(payload_bytes(r.upload.tensors) for r in received),
            bytes_down=sum(payload_bytes(d) for d in sent),
        )
        record.update(flops_client=sum(r.flops for r in received), flops_server=server_flops())
        previous = self.state.history[-1] if self.state.history else {"bytes_cumulative": 0, "flops_cumulative": 0}
        record["bytes_cumulative"] = previous["bytes_cumulative"] + record["bytes_up"] + record["bytes_down"]
        record["flops_cumulative"] = previous["flops_cumulative"] + record["flops_client"] + record["flops_server"]

        eval_seconds = 0.0
        if evaluated:
            self.callbacks.on_evaluate_start(t)
            eval_started = time.perf_counter()
            if self.cfg.eval_test:
                self.state.last_accuracies = self.evaluate_all("test")
                if len(self.clients) <= CLIENT_CURVES_MAX:
                    self.state.client_curves.append({"round": t, "accuracies": list(self.state.last_accuracies)})
            if self.cfg.val_fraction > 0:
                self.state.last_val_accuracies = self.evaluate_all("val")
            eval_seconds = time.perf_counter() - eval_started
        record.update(self._accuracy_columns("test", "", evaluated and self.cfg.eval_test))
        if self.cfg.val_fraction > 0:
            record.update(self._accuracy_columns("val", "val_", evaluated))
        record.update(train_seconds=round(train_seconds, 4), eval_seconds=round(eval_seconds, 4))
        self.state.round = t
        self.state.history.append(record)
        self.callbacks.on_round_end(record)
        return record

    def _accuracy_columns(self, split: str, prefix: str, evaluated: bool) -> dict[str, float]:
        if not evaluated:
            return {prefix + c: math.nan for c in ACCURACY_COLUMNS}
        accs = self.state.last_accuracies if split == "test" else self.state.last_val_accuracies
        summary = summarise_accuracies(accs, [len(c.split(split)[1]) for c in self.clients])
        return {prefix + c: v for c, v in summary.items()}

    def evaluate_all(self, split: str = "test") -> list[float]:
        """Personalised accuracy of every client on its own `split` ("test" or "val"); NaN for a client that
        did not answer or has no sample in that split."""
        downloads = {k: self.algorithm.download(self.state.global_state, k) for k in range(len(self.clients))}
        accs = self.workers.evaluate(downloads, split)
        return [accs.get(k, math.nan) for k in range(len(self.clients))]
