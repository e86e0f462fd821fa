"""pfl's algorithms on Flower's Message API: a ServerApp that runs pfl's round loop, a ClientApp that runs
pfl's client worker. Nothing of any method is written here: both sides call the same `Algorithm` and
`ClientWorker` objects the local engine calls.

Messages (one per client and round; a SuperNode serves the clients k with k mod nodes = its partition-id):

    query     server -> node   "who are you?"                 reply: partition-id, num-partitions
    train     server -> node   download arrays + run config    reply: upload arrays + losses, diagnostics, FLOPs
    evaluate  server -> node   download arrays + run config    reply: personalised test accuracy

The run config (the resolved recipe as TOML, the state directory, accelerator and precision) travels in
every message, so a node needs nothing but its partition id and the data set; a client's private state
persists between rounds on the node's disk (`DiskStore`, one safetensors file per client id), in the
directory the server names or the node's own `state-dir` node-config entry (`data-dir` likewise says
where the node keeps the data set).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pfl.algorithms.base import Tensors, Upload
from pfl.errors import RunFailed
from pfl.federation.engine import ClientResult, ClientWorker, NotSent, Outcome
from pfl.federation.store import DiskStore
from pfl.schema import Config

log = logging.getLogger("pfl")

NODE_WAIT_SECONDS = 120.0  # how long the server waits for the expected SuperNodes to connect
POLL_SECONDS = 0.2


# ---------------------------------------------------------------- tensors and records

def to_record(tensors: Tensors) -> ArrayRecord:
    """Tensors as Flower arrays (exact: numpy's bytes of the same dtype and shape)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def _run_record(cfg: Config, state_dir: str, accelerator: str, precision: str, client_id: int,
                round_idx: int, split: str = "test") -> ConfigRecord:
    import tomli_w

    return ConfigRecord({"config": tomli_w.dumps(cfg.as_nested()), "state_dir": state_dir,
                         "accelerator": accelerator, "precision": precision, "client_id": client_id,
                         "round": round_idx, "split": split})


# ---------------------------------------------------------------- client side

_WORKERS: dict[tuple, ClientWorker] = {}


def _worker_for(run: ConfigRecord, context: Context) -> tuple[ClientWorker, int]:
    """The node's worker for this run (built once per process: data, partition, method, runner)."""
    from pfl import config as config_mod
    from pfl.build import build
    from pfl.federation import DiskStore, make_runner

    # a node's own state-dir is shared by every run it serves: each run keeps its clients under its run id,
    # so a new `flwr run` never picks up the states an earlier run left there
    node_dir = str(context.node_config.get("state-dir", ""))
    state_dir = str(Path(node_dir) / f"run-{context.run_id}") if node_dir else str(run["state_dir"])
    # A warm ClientApp process (pfl/flower/warm.py) serves many messages: the cache lives as long as the run
    # and the node; a new `flwr run` (run id) rebuilds it even for the same recipe.
    key = (context.run_id, context.node_id, run["config"], state_dir, run["accelerator"], run["precision"])
    if key not in _WORKERS:
        _WORKERS.clear()  # one run at a time per process
        cfg = config_mod.from_toml(str(run["config"]))
        if context.node_config.get("data-dir"):  # where this node keeps the data set, if not where the server does
            cfg = config_mod.resolve(cfg.as_flat(), {"data_dir": str(context.node_config["data-dir"])})
        # a ClientApp uses the cores it was given (Ray's client_resources in a simulation, the same share per
        # ClientApp process in a deployment), so that clients sharing a machine do not oversubscribe it
        torch.set_num_threads(max(1, round(cfg["flower.client_cpus"])))
        setup = build(cfg)
        runner = make_runner(str(run["accelerator"]), 1, str(run["precision"]), cfg.grad_clip)
        _WORKERS[key] = ClientWorker(cfg, setup.clients, setup.architectures, setup.algorithm,
                                     DiskStore(state_dir), runner)
    worker = _WORKERS[key]
    client_id = int(run["client_id"])
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if client_id % partitions != partition:
        raise ValueError(f"client {client_id} is not served by the node with partition-id {partition} "
                         f"of {partitions}")
    worker.ensure_initialised(client_id)
    return worker, client_id


def handle_query(msg: Message, context: Context) -> Message:
    node = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})
    return Message(RecordDict({"node": node}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    worker, k = _worker_for(msg.content["run"], context)
    result = worker.train(int(msg.content["run"]["round"]), k, from_record(msg.content["download"]))
    metrics = {"num_samples": result.upload.num_samples, "flops": result.flops,
               "seconds": time.perf_counter() - started}
    metrics.update({f"loss.{name}": float(v) for name, v in result.losses.items()})
    metrics.update({f"diag.{name}": float(v) for name, v in result.diagnostics.items()})
    return Message(RecordDict({"upload": to_record(result.upload.tensors), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    worker, k = _worker_for(msg.content["run"], context)
    accuracy = worker.evaluate(k, from_record(msg.content["download"]), str(msg.content["run"]["split"]))
    metrics = {"accuracy": float(accuracy), "seconds": time.perf_counter() - started}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(mods: list | None = None) -> ClientApp:
    """pfl's ClientApp; `mods` are Flower client mods (middleware), e.g. for fault-injection tests."""
    app = ClientApp(mods=mods or [])
    app.query()(handle_query)
    app.train()(handle_train)
    app.evaluate()(handle_evaluate)
    return app


client_app = make_client_app()


# ---------------------------------------------------------------- server side

class FlowerWorkers:
    """The `flower` engine's dispatcher: one Flower message per client, replies checked and decoded.

    A client whose node is offline, whose reply is an error (it crashed), that has not answered within
    `flower.round_timeout` seconds, or whose reply is malformed gets a reason instead of a result; the
    round loop drops it (and rejects updates that are non-finite or mis-shaped)."""

    def __init__(self, grid: Grid, cfg: Config, clients, state_dir: str, accelerator: str = "cpu",
                 precision: str = "32-true", expected_nodes: int = 0, shared_states: bool = False):
        self.grid, self.cfg, self.clients = grid, cfg, clients
        self.state_dir, self.accelerator, self.precision = state_dir, accelerator, precision
        # a simulation's nodes keep client states in this machine's `state_dir`, which the server can read
        # (checkpoints) and write (resume); a deployment's nodes keep them on their own disks
        self.shared_states = shared_states
        self.expected_nodes = expected_nodes or cfg["flower.num_supernodes"] or cfg.num_clients
        self.timeout = cfg["flower.round_timeout"]
        self.partitions = 0
        self.node_of_partition: dict[int, int] = {}
        # per message wave of the current round ("train", "evaluate test", ...): (wall seconds from push to the
        # last reply, seconds the busiest node's ClientApp spent handling its messages); the difference is
        # Flower's own messaging latency (its polling) plus transfers
        self.round_timing: dict[str, tuple[float, float]] = {}

    # -- nodes --------------------------------------------------------------------------------
    def start(self, initial_global: Tensors) -> None:
        """Wait for the SuperNodes, learn which partition each serves. Clients initialise on first contact
        from the same seeds the local engine uses, so `initial_global` need not travel."""
        self._discover_nodes()

    def _discover_nodes(self) -> None:
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.expected_nodes:
            if time.monotonic() > deadline:
                raise RunFailed(f"only {len(nodes)} of {self.expected_nodes} SuperNodes connected within "
                                f"{NODE_WAIT_SECONDS:.0f} s")
            time.sleep(POLL_SECONDS)
            nodes = list(self.grid.get_node_ids())
        queries = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in nodes]
        replies = self._exchange(queries, timeout=NODE_WAIT_SECONDS, on_reply=None)
        reported = {}
        for node_id, reply in zip(nodes, replies):
            if reply is None or reply.has_error():
                continue
            node = reply.content["node"]
            reported[node_id] = (int(node["partition-id"]), int(node["num-partitions"]))
        counts = {p for _, p in reported.values()}
        if len(counts) != 1:
            raise RunFailed(f"SuperNodes disagree on num-partitions: {sorted(counts)}")
        self.partitions = counts.pop()
        self.node_of_partition = {}
        for node_id, (partition, _) in reported.items():
            if partition in self.node_of_partition:
                raise RunFailed(f"two SuperNodes have partition-id {partition}")
            self.node_of_partition[partition] = node_id
        missing = sorted(set(range(self.partitions)) - set(self.node_of_partition))
        if missing:
            raise RunFailed(f"no SuperNode has partition-id {missing} (of num-partitions={self.partitions})")
        if self.partitions > self.cfg.num_clients:
            raise RunFailed(f"{self.partitions} SuperNode partitions for {self.cfg.num_clients} clients: "
                            f"some nodes would serve nobody")
        log.info("flower: %d SuperNodes, node p serves the clients k with k mod %d = p",
                 self.partitions, self.partitions)

    def _node(self, client_id: int) -> int:
        return self.node_of_partition[client_id % self.partitions]

    def _exchange(self, messages: list[Message], timeout: float, on_reply, wave: str = "") -> list[Message | None]:
        """Push messages, pull replies until all are in or `timeout` passes; the reply to messages[i] at
        position i (None: none came). `on_reply(i, reply)` is called as each arrives. A named `wave` records
        its timing in `round_timing`."""
        started = time.perf_counter()
        replies = self._push_and_pull(messages, timeout, on_reply)
        if wave:
            busy: dict[int, float] = {}
            for message, reply in zip(messages, replies):
                if reply is not None and not reply.has_error() and "seconds" in reply.content["metrics"]:
                    node = message.metadata.dst_node_id
                    busy[node] = busy.get(node, 0.0) + float(reply.content["metrics"]["seconds"])
            self.round_timing[wave] = (time.perf_counter() - started, max(busy.values(), default=0.0))
        return replies

    def _push_and_pull(self, messages: list[Message], timeout: float, on_reply) -> list[Message | None]:
        ids = list(self.grid.push_messages(messages))
        position = {mid: i for i, mid in enumerate(ids) if mid}
        replies: list[Message | None] = [None] * len(messages)
        deadline = time.monotonic() + timeout
        pending = set(position)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[position[mid]] = reply
                    if on_reply is not None:
                        on_reply(position[mid], reply)
            if pending:
                time.sleep(POLL_SECONDS)
        return replies

    def _messages(self, kind: str, round_idx: int, downloads: dict[int, Tensors], split: str = "test"
                  ) -> tuple[list[int], list[Message], dict[int, str]]:
        online = set(self.grid.get_node_ids())
        order, messages, offline = [], [], {}
        for k, download in downloads.items():
            node = self._node(k)
            if node not in online:
                offline[k] = NotSent("its SuperNode is offline")
                continue
            content = RecordDict({"run": _run_record(self.cfg, self.state_dir, self.accelerator, self.precision,
                                                     k, round_idx, split),
                                  "download": to_record(download)})
            order.append(k)
            messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(round_idx)))
        return order, messages, offline

    # -- rounds -------------------------------------------------------------------------------
    def train(self, round_idx: int, downloads: dict[int, Tensors], on_done) -> dict[int, Outcome]:
        order, messages, outcomes = self._messages("train", round_idx, downloads)
        self.round_timing = {}
        replies = self._exchange(messages, self.timeout, lambda i, _: on_done(order[i]), wave="train")
        for i, k in enumerate(order):
            outcomes[k] = self._result(k, replies[i])
        return outcomes

    def _result(self, k: int, reply: Message | None) -> Outcome:
        if reply is None:
            return f"no reply within {self.timeout:g} s (flower.round_timeout)"
        if reply.has_error():
            reason = (reply.error.reason or "").strip().splitlines()
            return f"the client failed (Flower error {reply.error.code}: {reason[-1] if reason else 'no reason'})"
        try:
            metrics = reply.content["metrics"]
            tensors = from_record(reply.content["upload"])
            num_samples = int(metrics["num_samples"])
            losses = {key[5:]: float(v) for key, v in metrics.items() if key.startswith("loss.")}
            diagnostics = {key[5:]: float(v) for key, v in metrics.items() if key.startswith("diag.")}
            flops = int(metrics["flops"])
        except Exception as exc:  # a reply that does not follow the protocol
            return f"malformed reply ({type(exc).__name__}: {exc})"
        if num_samples != self.clients[k].num_train:
            return f"it reports {num_samples} training samples, its partition has {self.clients[k].num_train}"
        return ClientResult(Upload(k, num_samples, tensors), losses, diagnostics, flops)

    def client_states(self, ids=None):
        """In a simulation, the states of the clients among `ids` (default all) that exist yet (a client is
        initialised on first contact), read from the nodes' state directory; None in a deployment, whose
        client states live on the SuperNodes' disks."""
        if not self.shared_states:
            return None
        store = DiskStore(Path(self.state_dir))
        ids = range(self.cfg.num_clients) if ids is None else ids
        return ((k, store.get(k)) for k in ids if k in store)

    def restore(self, states: dict[int, Tensors]) -> None:
        """A simulation continued from a checkpoint: the nodes' state directory holds exactly the checkpoint's
        client states (files a crashed run wrote later are removed; clients the checkpoint does not hold
        initialise on first contact, as they would have), then the nodes are discovered as at the start."""
        if not self.shared_states:
            raise RunFailed("a deployed Flower run cannot be restored: its client states live on the SuperNodes")
        directory = Path(self.state_dir)
        for path in directory.glob("client_*.safetensors"):
            path.unlink()
        store = DiskStore(directory)
        for k, state in states.items():
            store.put(k, state)
        self._discover_nodes()

    def evaluate(self, downloads: dict[int, Tensors], split: str = "test") -> dict[int, float]:
        order, messages, offline = self._messages("evaluate", -1, downloads, split)  # -1: not a training round
        replies = self._exchange(messages, self.timeout, None, wave=f"evaluate {split}")
        accs: dict[int, float] = {}
        for i, k in enumerate(order):
            reply = replies[i]
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else f"error: {(reply.error.reason or '').strip()[-200:]}"
                log.warning("evaluation: client %d has no accuracy (%s)", k, why)
                continue
            try:
                accs[k] = float(reply.content["metrics"]["accuracy"])
            except Exception:
                log.warning("evaluation: client %d sent a malformed reply", k)
        for k, why in offline.items():
            log.warning("evaluation: client %d has no accuracy (%s)", k, why)
        return accs


def quiet_flower() -> None:
    """Flower's INFO banners and the run_simulation deprecation notice would drown pfl's own display."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    if getattr(flwr_logger, "_pfl_quieted", False):  # once per process, not once per run
        return
    flwr_logger._pfl_quieted = True

    class _NoDeprecation(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "run_simulation` function is deprecated" not in record.getMessage() and \
                "deprecated feature" not in record.getMessage().lower()

    flwr_logger.addFilter(_NoDeprecation())
    for handler in flwr_logger.handlers:
        handler.addFilter(_NoDeprecation())


def simulate(make_run, cfg: Config, clients, state_dir: str, accelerator: str, precision: str,
             client_mods: list | None = None, verbose: bool = False, resume_from: dict | None = None):
    """Run the rounds through Flower's simulation runtime (Ray): the ServerApp runs the round loop, built by
    `make_run(workers)` around this simulation's `FlowerWorkers`, in a thread of this process; ClientApps
    run in Ray actors with the recipe's resources. `resume_from`: a checkpoint (pfl.checkpoint.load) to
    continue from. Returns the finished FederatedRun."""
    quiet_flower()
    from flwr.simulation import run_simulation

    num_nodes = cfg["flower.num_supernodes"] or cfg.num_clients
    app = ServerApp()
    runs = []

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run = make_run(FlowerWorkers(grid, cfg, clients, state_dir, accelerator, precision, num_nodes,
                                     shared_states=True))
        runs.append(run)
        if resume_from is None:
            run.initialise()
        else:
            run.restore(resume_from)
        run.run()

    backend_config = {"client_resources": {"num_cpus": cfg["flower.client_cpus"],
                                           "num_gpus": cfg["flower.client_gpus"]},
                      "init_args": {"log_to_driver": verbose, "logging_level": "error" if not verbose else "info"}}
    try:
        run_simulation(app, make_client_app(client_mods), num_supernodes=num_nodes, backend_config=backend_config,
                       verbose_logging=verbose)
    finally:  # an interrupt can leave Ray's local cluster (raylet, GCS, actors) running: stop it
        import ray

        if ray.is_initialized():
            ray.shutdown()
    done = runs[0].state.round if runs else 0
    if done < cfg.rounds:
        raise RunFailed(f"the Flower simulation ended after {done} of {cfg.rounds} rounds")
    return runs[0]
