"""A bare Flower app with the message pattern of a pfl round and no pfl in it: the reference that
benchmarks/deploy.py runs on the same SuperLink and SuperNodes right after pfl's run.

Each round the ServerApp pushes one `train` message per client (a config record of the size of pfl's run
record, an array of the download's size) and pulls the replies (an array of the upload's size and a few
metrics) with the same 0.2 s polling pfl's ServerApp uses (Flower's own `send_and_receive` sleeps 3 s between
pulls, which would flatter pfl). Every payload holds fresh random values, as pfl's do (Flower stores
objects by content hash: identical payloads would not travel again). The ClientApp answers at once.
Seconds per round go to the JSON file the run config names.

    flwr run APP_DIR --run-config "rounds=5 clients=4 nodes=2 down-floats=4064 up-floats=4064 config-bytes=1200
                                   out='/tmp/bare.json'"
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

POLL_SECONDS = 0.2  # as pfl.flower.app

server_app = ServerApp()
client_app = ClientApp()


def _exchange(grid: Grid, messages: list[Message], timeout: float = 600) -> list[Message]:
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies, deadline = [], time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending:
            time.sleep(POLL_SECONDS)
    if pending:
        raise RuntimeError(f"{len(pending)} replies missing after {timeout} s")
    return replies


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run = context.run_config
    nodes_wanted = int(run["nodes"])
    while len(nodes := sorted(grid.get_node_ids())) < nodes_wanted:
        time.sleep(POLL_SECONDS)
    replies = _exchange(grid, [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in nodes])
    node_of = {int(r.content["node"]["partition-id"]): r.metadata.src_node_id for r in replies}
    rng = np.random.default_rng(0)
    seconds = []
    for round_idx in range(1, int(run["rounds"]) + 1):
        started = time.perf_counter()
        # fresh values in every message, as pfl's are: Flower stores objects by content hash, and identical
        # payloads would be found already on the node instead of travelling
        messages = []
        for k in range(int(run["clients"])):
            record = ConfigRecord({"config": f"{round_idx} {k} ".ljust(int(run["config-bytes"]), "x"),
                                   "client_id": k, "round": round_idx})
            download = ArrayRecord({"w": Array(rng.random(int(run["down-floats"]), dtype=np.float32))})
            messages.append(Message(RecordDict({"run": record, "download": download}),
                                    dst_node_id=node_of[k % nodes_wanted], message_type="train",
                                    group_id=str(round_idx)))
        _exchange(grid, messages)
        seconds.append(time.perf_counter() - started)
    with open(str(run["out"]), "w", encoding="utf-8") as f:
        json.dump({"seconds_per_round": seconds}, f)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    node = ConfigRecord({"partition-id": int(context.node_config["partition-id"]),
                         "num-partitions": int(context.node_config["num-partitions"])})
    return Message(RecordDict({"node": node}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    floats = int(context.run_config["up-floats"])
    upload = ArrayRecord({"w": Array(np.random.default_rng().random(floats, dtype=np.float32))})
    metrics = MetricRecord({"num_samples": 1, "flops": 1, "seconds": 0.0, "loss.a": 0.0, "loss.b": 0.0})
    return Message(RecordDict({"upload": upload, "metrics": metrics}), reply_to=msg)


APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "bare-flower"
version = "1.0.0"
description = "pfl's message pattern without pfl"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pfl"

[tool.flwr.app.components]
serverapp = "bare_app:server_app"
clientapp = "bare_app:client_app"

[tool.flwr.app.config]
rounds = 5
clients = 4
nodes = 2
down-floats = 1
up-floats = 1
config-bytes = 1
out = ""
"""


def write_app(directory) -> None:
    """The app project `flwr run` submits: this file as `bare_app.py` and its pyproject.toml."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    (directory / "bare_app.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
