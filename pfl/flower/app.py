"""pfl's algorithms on Flower's Message API: a ServerApp that runs pfl's round loop (pfl.federation.engine) with
`FlowerWorkers` as its engine, a ClientApp that runs pfl's client side (pfl.federation.client). Nothing of any
method is written here: both sides call the same `Algorithm` and `ClientWorker` objects the local engine calls.

Messages (one per client and round; a SuperNode serves the clients k with k mod nodes = its partition-id):

    query     server -> node   "who are you?"                        reply: partition-id, num-partitions
    train     server -> node   download arrays + run config           reply: upload arrays + losses, diagnostics,
                                                                       FLOPs (+ accuracies when asked to evaluate)
    evaluate  server -> node   download arrays (or none) + run config  reply: personalised accuracies

A round is one message wave: on an evaluation round every sampled client evaluates inside its training
message (after training, as the local engine evaluates it) and every other client gets an evaluate-only
message in the same wave, as long as the method's evaluation does not read the new server state
(`Algorithm.evaluation_reads_download`; otherwise the evaluation is a second wave after the aggregation).

The run config (the resolved recipe as TOML, the state directory, accelerator and precision) travels in
every message, so a node needs nothing but its partition id and the data set. A deployed node keeps its
clients' private states in its own `state-dir` (node config) and reads data only from its own `data-dir`
or the data set's default place; it uses the paths the server names only where it allows that
(`allow-server-paths=true`: a loopback deployment, whose nodes share the server's disk) and in a
simulation. Every reply is decoded by pfl.flower.replies.
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
from pfl.errors import PflUserError, RunFailed
from pfl.federation.client import ClientResult, ClientWorker
from pfl.federation.engine import NotSent, Outcome
from pfl.federation.store import DiskStore
from pfl.flower.replies import BadReply, Expected, decode_eval, decode_node, decode_train, failure
from pfl.schema import Config

log = logging.getLogger("pfl")

NODE_WAIT_SECONDS = 120.0  # how long the server waits for the expected SuperNodes to connect
REDISCOVERY_SECONDS = 30.0  # at most this long a round waits for nodes that (re)joined to say who they are
POLL_SECONDS = 0.2


# ---------------------------------------------------------------- tensors and records

def to_record(tensors: Tensors) -> ArrayRecord:
    """Tensors as Flower arrays (exact: numpy's bytes of the same dtype and shape)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    """A download as tensors (on a node: what its SuperLink sent)."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def _run_record(cfg: Config, state_dir: str, accelerator: str, precision: str, client_id: int,
                round_idx: int, evaluate: tuple[str, ...] = ()) -> ConfigRecord:
    import tomli_w

    return ConfigRecord({"config": tomli_w.dumps(cfg.as_nested()), "state_dir": state_dir,
                         "accelerator": accelerator, "precision": precision, "client_id": client_id,
                         "round": round_idx, "evaluate": ",".join(evaluate)})


# ---------------------------------------------------------------- client side

_WORKERS: dict[tuple, ClientWorker] = {}


def _node_paths(run: ConfigRecord, context: Context, server_paths: bool) -> tuple[str, str | None]:
    """(state directory, data directory or None for the recipe's) of this node for this run. A node's own
    `state-dir` is shared by every run it serves: each run keeps its clients under its run id, so a new `flwr
    run` never picks up the states an earlier run left there."""
    config = context.node_config
    allowed = server_paths or str(config.get("allow-server-paths", "")).lower() == "true"
    node_dir = str(config.get("state-dir", ""))
    if node_dir:
        state_dir = str(Path(node_dir) / f"run-{int(context.run_id)}")
    elif allowed:
        state_dir = str(run["state_dir"])
    else:
        raise PflUserError("this SuperNode has no state-dir in its node config and does not allow the server to "
                           "name one (allow-server-paths=true)")
    data_dir = str(config.get("data-dir", "")) or None
    if data_dir is None and not allowed:
        data_dir = ""  # the data set's default place on this node, never a path the server names
    return state_dir, data_dir


def _worker_for(run: ConfigRecord, context: Context, server_paths: bool) -> tuple[ClientWorker, int]:
    """The node's worker for this run (built once per process: data, partition, method, runner)."""
    from pfl import config as config_mod
    from pfl.build import build
    from pfl.federation import DiskStore, make_runner

    state_dir, data_dir = _node_paths(run, context, server_paths)
    # A warm ClientApp process (pfl/flower/warm.py) serves many messages: the cache lives as long as the run
    # and the node; a new `flwr run` (run id) rebuilds it even for the same recipe.
    key = (context.run_id, context.node_id, run["config"], state_dir, run["accelerator"], run["precision"])
    if key not in _WORKERS:
        _WORKERS.clear()  # one run at a time per process
        cfg = config_mod.from_toml(str(run["config"]))
        if data_dir is not None and data_dir != cfg.data_dir:
            cfg = config_mod.resolve(cfg.as_flat(), {"data_dir": data_dir})
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


def _splits(run: ConfigRecord) -> list[str]:
    splits = [s for s in str(run["evaluate"]).split(",") if s]
    if not set(splits) <= {"test", "val"}:
        raise ValueError(f"unknown evaluation splits {splits}")
    return splits


def handle_query(msg: Message, context: Context) -> Message:
    node = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})
    return Message(RecordDict({"node": node}), reply_to=msg)


def _handle_train(msg: Message, context: Context, server_paths: bool) -> Message:
    started = time.perf_counter()
    run = msg.content["run"]
    worker, k = _worker_for(run, context, server_paths)
    download = from_record(msg.content["download"])
    result = worker.train(int(run["round"]), k, download)
    metrics = {"num_samples": result.upload.num_samples, "flops": result.flops}
    metrics.update({f"loss.{name}": float(v) for name, v in result.losses.items()})
    metrics.update({f"diag.{name}": float(v) for name, v in result.diagnostics.items()})
    # evaluated along (the evaluation reads no new server state): the model as it just trained
    metrics.update({f"eval.{split}": float(worker.evaluate(k, download, split)) for split in _splits(run)})
    metrics["seconds"] = time.perf_counter() - started
    return Message(RecordDict({"upload": to_record(result.upload.tensors), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def _handle_evaluate(msg: Message, context: Context, server_paths: bool) -> Message:
    started = time.perf_counter()
    run = msg.content["run"]
    worker, k = _worker_for(run, context, server_paths)
    download = from_record(msg.content["download"])
    metrics = {f"eval.{split}": float(worker.evaluate(k, download, split)) for split in _splits(run)}
    metrics["seconds"] = time.perf_counter() - started
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(mods: list | None = None, server_paths: bool = False) -> ClientApp:
    """pfl's ClientApp; `mods` are Flower client mods (middleware), e.g. for fault-injection tests.
    `server_paths`: use the state and data directories the server names (a simulation, whose nodes are this
    machine) unless the node's config names its own."""
    app = ClientApp(mods=mods or [])
    app.query()(handle_query)
    app.train()(lambda msg, context: _handle_train(msg, context, server_paths))
    app.evaluate()(lambda msg, context: _handle_evaluate(msg, context, server_paths))
    return app


client_app = make_client_app()  # what a deployment's SuperNodes load


# ---------------------------------------------------------------- server side

class FlowerWorkers:
    """The `flower` engine's dispatcher (the round loop's `Workers`): one Flower message per client and round,
    replies decoded by pfl.flower.replies.

    A client whose node is offline, whose reply is an error (it crashed), that has not answered within
    `flower.round_timeout` seconds, or whose reply does not follow the protocol gets a reason instead of a
    result; the round loop drops it (and rejects updates that are non-finite or mis-shaped). Nodes are
    discovered at the start and again in any round in which a partition's node is offline and a new node has
    connected (a node that lost its link and came back under a new id)."""

    def __init__(self, grid: Grid, setup, state_dir: str, accelerator: str = "cpu", precision: str = "32-true",
                 expected_nodes: int = 0, shared_states: bool = False):
        cfg = setup.cfg
        self.grid, self.cfg, self.clients = grid, cfg, setup.clients
        self.state_dir, self.accelerator, self.precision = state_dir, accelerator, precision
        # a simulation's nodes keep client states in this machine's `state_dir`, which the server can read
        # (checkpoints) and write (resume); a deployment's nodes keep them on their own disks
        self.shared_states = shared_states
        self.expected_nodes = expected_nodes or cfg["flower.num_supernodes"] or cfg.num_clients
        self.timeout = cfg["flower.round_timeout"]
        # what a reply may contain is the server's to decide: the method's phases (one loss each) and a cap
        self.loss_names = tuple(p.name for p in setup.algorithm.make_client(setup.architectures[0]).phases())
        self.max_upload_bytes = int(cfg["flower.max_upload_mb"] * 2**20)
        self.partitions = 0
        self.node_of_partition: dict[int, int] = {}
        self.known_nodes: set[int] = set()
        self._evaluated: dict[str, dict[int, float]] = {}  # accuracies that travelled with this round's training
        # per message wave of the current round ("train", "train + evaluate", "evaluate test"): (wall seconds
        # from push to the last reply, seconds the busiest node's ClientApp spent handling its messages); the
        # difference is Flower's own messaging latency (its polling) plus transfers
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
        self.partitions = self.expected_nodes
        if self.partitions > self.cfg.num_clients:
            raise RunFailed(f"{self.partitions} SuperNode partitions for {self.cfg.num_clients} clients: "
                            f"some nodes would serve nobody")
        self.node_of_partition, self.known_nodes = {}, set()
        self._query(sorted(nodes), NODE_WAIT_SECONDS)
        if not self.node_of_partition:
            raise RunFailed("no SuperNode answered the discovery query with a valid partition-id")
        missing = sorted(set(range(self.partitions)) - set(self.node_of_partition))
        if missing:
            log.warning("flower: no SuperNode serves partition-id %s yet: its clients are dropped until one does",
                        missing)
        log.info("flower: %d SuperNodes, node p serves the clients k with k mod %d = p",
                 self.partitions, self.partitions)

    def _query(self, nodes: list[int], timeout: float) -> None:
        """Ask `nodes` which partition they serve. A node that does not answer properly or names another
        num-partitions than the run's is ignored (logged); so is every node that claims a partition another
        node claims in the same discovery or serves while online: which one is honest cannot be told, so
        none is used."""
        messages = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in nodes]
        replies = self._push_and_pull(messages, timeout, None)
        online = set(self.grid.get_node_ids())
        claims: dict[int, list[int]] = {}
        for node, reply in zip(nodes, replies):
            self.known_nodes.add(node)
            why = failure(reply, timeout)
            if why is None:
                try:
                    partition, partitions = decode_node(reply)
                    if partitions != self.partitions:
                        why = f"it reports num-partitions={partitions}, the run has {self.partitions}"
                    else:
                        claims.setdefault(partition, []).append(node)
                except BadReply as exc:
                    why = str(exc)
            if why:
                log.warning("flower: SuperNode %d ignored: %s", node, why)
        for partition, claimants in sorted(claims.items()):
            current = self.node_of_partition.get(partition)
            if len(claimants) > 1 or (current is not None and current not in claimants and current in online):
                serving = sorted(set(claimants) | ({current} if current in online else set()))
                log.warning("flower: SuperNodes %s all claim partition-id %d: none of them is used; its clients are "
                            "dropped", serving, partition)
                self.node_of_partition.pop(partition, None)
            else:
                self.node_of_partition[partition] = claimants[0]

    def _refresh_nodes(self) -> set[int]:
        """The online nodes; new ones are asked who they are when a partition's node is offline."""
        online = set(self.grid.get_node_ids())
        new = sorted(online - self.known_nodes)
        if new and any(self.node_of_partition.get(p) not in online for p in range(self.partitions)):
            self._query(new, min(self.timeout, REDISCOVERY_SECONDS))
            online = set(self.grid.get_node_ids())
        return online

    def _push_and_pull(self, messages: list[Message], timeout: float, on_reply) -> list[Message | None]:
        """Push messages, pull replies until all are in or `timeout` passes; the reply to messages[i] at
        position i (None: none came). `on_reply(i)` is called as each arrives."""
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
                        on_reply(position[mid])
            if pending:
                time.sleep(POLL_SECONDS)
        return replies

    def _expected(self, k: int, splits: tuple[str, ...]) -> Expected:
        return Expected(num_train=self.clients[k].num_train,
                        eval_sizes={s: len(self.clients[k].split(s)[1]) for s in splits},
                        loss_names=self.loss_names, max_upload_bytes=self.max_upload_bytes)

    def _wave(self, wave: str, round_idx: int, sends: list[tuple[int, str, Tensors]], splits: tuple[str, ...],
              on_reply=None) -> tuple[dict[tuple[int, str], object], dict[int, NotSent]]:
        """One message wave: `sends` = (client, message type, download). Returns each sent message's decoded
        reply (TrainReply / EvalReply) or why there is none, and the clients not sent (node offline). Records
        the wave's timing."""
        online = self._refresh_nodes()
        order, messages, offline = [], [], {}
        for k, kind, download in sends:
            node = self.node_of_partition.get(k % self.partitions)
            if node not in online:
                offline[k] = NotSent("its SuperNode is offline" if node is not None else
                                     f"no SuperNode serves its partition-id {k % self.partitions}")
                continue
            content = RecordDict({"run": _run_record(self.cfg, self.state_dir, self.accelerator, self.precision,
                                                     k, round_idx, splits),
                                  "download": to_record(download)})
            order.append((k, kind, node))
            messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=str(round_idx)))
        started = time.perf_counter()
        replies = self._push_and_pull(messages, self.timeout,
                                      None if on_reply is None else lambda i: on_reply(*order[i][:2]))
        decoded: dict[tuple[int, str], object] = {}
        busy: dict[int, float] = {}
        for (k, kind, node), reply in zip(order, replies):
            result = failure(reply, self.timeout)
            if result is None:
                try:
                    decode = decode_train if kind == "train" else decode_eval
                    result = decode(reply, self._expected(k, splits))
                    busy[node] = busy.get(node, 0.0) + result.seconds
                except BadReply as exc:
                    result = f"malformed reply: {exc}"
            decoded[(k, kind)] = result
        self.round_timing[wave] = (time.perf_counter() - started, max(busy.values(), default=0.0))
        return decoded, offline

    # -- rounds -------------------------------------------------------------------------------
    def train(self, round_idx: int, downloads: dict[int, Tensors], on_done, evaluate: tuple[str, ...] = ()
              ) -> dict[int, Outcome]:
        """The round's one wave: a train message per sampled client, and, when the round's evaluation
        travels along (`evaluate`), an evaluate-only message (no download: the evaluation does not read it)
        to every other client."""
        self.round_timing, self._evaluated = {}, {}
        sends = [(k, "train", d) for k, d in downloads.items()]
        if evaluate:
            sends += [(k, "evaluate", {}) for k in range(self.cfg.num_clients) if k not in downloads]
        decoded, outcomes = self._wave("train + evaluate" if evaluate else "train", round_idx, sends, evaluate,
                                       lambda k, kind: on_done(k) if kind == "train" else None)
        accuracies: dict[str, dict[int, float]] = {split: {} for split in evaluate}
        for (k, kind), result in decoded.items():
            if isinstance(result, str):
                if kind == "train":
                    outcomes[k] = result
                elif evaluate:
                    log.warning("evaluation: client %d has no accuracy (%s)", k, result)
                continue
            for split, acc in result.accuracies.items():
                accuracies[split][k] = acc
            if kind == "train":
                outcomes[k] = ClientResult(Upload(k, result.num_samples, result.tensors), result.losses,
                                           result.diagnostics, result.flops)
        self._evaluated = accuracies
        return outcomes

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
        """Every client's accuracy on `split`: what travelled with this round's training, else a wave of
        evaluate messages carrying the new downloads."""
        if split in self._evaluated:
            return self._evaluated.pop(split)
        decoded, offline = self._wave(f"evaluate {split}", -1, [(k, "evaluate", d) for k, d in downloads.items()],
                                      (split,))
        accs: dict[int, float] = {}
        for (k, _), result in decoded.items():
            if isinstance(result, str):
                log.warning("evaluation: client %d has no accuracy (%s)", k, result)
            else:
                accs[k] = result.accuracies[split]
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


def simulate(make_run, setup, state_dir: str, accelerator: str, precision: str,
             client_mods: list | None = None, verbose: bool = False, resume_from: dict | None = None):
    """Run the rounds through Flower's simulation runtime (Ray): the ServerApp runs the round loop, built by
    `make_run(workers)` around this simulation's `FlowerWorkers`, in a thread of this process; ClientApps
    run in Ray actors with the recipe's resources. `resume_from`: a checkpoint (pfl.checkpoint.load) to
    continue from. Returns the finished FederatedRun."""
    quiet_flower()
    from flwr.simulation import run_simulation

    cfg = setup.cfg
    num_nodes = cfg["flower.num_supernodes"] or cfg.num_clients
    app = ServerApp()
    runs = []

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run = make_run(FlowerWorkers(grid, setup, state_dir, accelerator, precision, num_nodes,
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
        run_simulation(app, make_client_app(client_mods, server_paths=True), num_supernodes=num_nodes,
                       backend_config=backend_config, verbose_logging=verbose)
    finally:  # an interrupt can leave Ray's local cluster (raylet, GCS, actors) running: stop it
        import ray

        if ray.is_initialized():
            ray.shutdown()
    done = runs[0].state.round if runs else 0
    if done < cfg.rounds:
        raise RunFailed(f"the Flower simulation ended after {done} of {cfg.rounds} rounds")
    return runs[0]
