"""Hostile or broken replies through the real reply path: a Flower simulation whose ClientApp is wrapped by a
client mod that rewrites what some nodes send. Every bad reply costs its client that round, with the reason
in the log and the round's `clients_dropped`; the run completes with the honest clients."""

import csv
import functools
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install '.[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pfl import config
from pfl.flower.app import from_record, to_record
from pfl.flower.replies import BadReply, Expected, decode_arrays, decode_eval, decode_node, decode_train
from pfl.run import FlowerTarget, Hardware, train
from tests.conftest import SMOKE

pytestmark = pytest.mark.flower

# (client, what it does in round 2, the reason the server must log)
HOSTILE = [
    (1, "no metrics", "records must be ['metrics', 'upload']"),
    (2, "metrics of the wrong type", "metric 'num_samples' is a float, expected an integer"),
    (3, "extra keys", "unexpected ['loss.extra']"),
    (4, "float64 arrays", "'protos' has dtype float64; updates carry float32"),
    (5, "1e300 values", "metric 'loss.local' = 1e+300 is not a finite number"),
    (6, "NaN", "'protos' has non-finite values"),
    (7, "an upload over the cap", "the upload is larger than flower.max_upload_mb (0.25 MB)"),
    (8, "counts larger than the client's data", "'counts' add up to"),
]
HONEST = (10, 11)
ROGUE_PARTITION, CLAIMED = 9, 0  # at discovery the node of partition 9 claims partition 0


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hostile_mod(msg: Message, context, call_next) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type == "query" and int(context.node_config["partition-id"]) == ROGUE_PARTITION:
        node = ConfigRecord({"partition-id": CLAIMED, "num-partitions": int(context.node_config["num-partitions"])})
        return Message(RecordDict({"node": node}), reply_to=msg)
    if msg.metadata.message_type != "train" or int(msg.content["run"]["round"]) != 2:
        return reply
    fault = dict((k, f) for k, f, _ in HOSTILE).get(int(msg.content["run"]["client_id"]))
    if fault is None:
        return reply
    upload, metrics = from_record(reply.content["upload"]), dict(reply.content["metrics"])
    if fault == "no metrics":
        return Message(RecordDict({"upload": to_record(upload)}), reply_to=msg)
    if fault == "metrics of the wrong type":
        metrics["num_samples"] = float(metrics["num_samples"])
    elif fault == "extra keys":
        metrics["loss.extra"] = 1.0
    elif fault == "float64 arrays":
        upload["protos"] = upload["protos"].double()
    elif fault == "1e300 values":
        metrics["loss.local"] = 1e300
    elif fault == "NaN":
        upload["protos"][0, 0] = math.nan
    elif fault == "an upload over the cap":
        upload["protos"] = torch.zeros(len(upload["labels"]), 70_000)  # > 0.25 MB, decoded never
    elif fault == "counts larger than the client's data":
        upload["counts"] = upload["counts"] * 1000
    return Message(RecordDict({"upload": to_record(upload), "metrics": MetricRecord(metrics)}), reply_to=msg)


def test_hostile_replies_each_drop_their_client_and_the_run_completes(tmp_path, caplog, no_ray_left):
    cfg = config.resolve({**SMOKE, "method": "fedproto", "num_clients": 12, "engine": "flower",
                          "synthetic.num_samples": 720, "flower.client_cpus": 1.0, "flower.max_upload_mb": 0.25})
    summary = train(cfg, tmp_path / "run", Hardware(),
                    flower=FlowerTarget(client_mods=[functools.partial(hostile_mod)]))
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    # clients 0 and 9 have no node (two nodes claimed partition 0: neither is used); round 2 drops 8 more
    assert [int(r["clients_dropped"]) for r in rows] == [2, 2 + len(HOSTILE)]
    assert summary["clients_dropped_total"] == 4 + len(HOSTILE)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"all claim partition-id {CLAIMED}: none of them is used" in m for m in messages), messages
    dropped = {int(m.group(1)): m.group(2) for m in
               (re.search(r"round 2: client (\d+) dropped from the aggregate: (.*)", line) for line in messages) if m}
    for k, fault, reason in HOSTILE:
        assert k in dropped and reason in dropped[k], (fault, dropped.get(k))
    assert set(dropped) == {k for k, _, _ in HOSTILE} | {CLAIMED, ROGUE_PARTITION}
    assert dropped[CLAIMED].endswith(f"no SuperNode serves its partition-id {CLAIMED}")
    assert dropped[ROGUE_PARTITION].endswith(f"no SuperNode serves its partition-id {ROGUE_PARTITION}")
    # the honest clients were aggregated and evaluated
    per_client = {int(r["client_id"]): r["accuracy"] for r in read_rows(tmp_path / "run" / "per_client.csv")}
    assert all(float(per_client[k]) > 0.5 for k in HONEST)


# ---------------------------------------------------------------- the decoder, case by case

def _reply(records: dict) -> SimpleNamespace:
    """What the decoders read of a reply: its content (real Flower records; a Message needs a running run)."""
    return SimpleNamespace(content=RecordDict(records))


EXPECTED = Expected(num_train=10, eval_sizes={"test": 3}, loss_names=("local",), max_upload_bytes=1000)
GOOD_METRICS = {"num_samples": 10, "flops": 5, "seconds": 0.1, "loss.local": 0.5, "eval.test": 2 / 3}


def _train_reply(metrics=None, arrays=None):
    arrays = {"w": torch.ones(2, 3)} if arrays is None else arrays
    return _reply({"upload": ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()}),
                   "metrics": MetricRecord(GOOD_METRICS if metrics is None else metrics)})


def test_a_good_train_reply_decodes():
    decoded = decode_train(_train_reply(), EXPECTED)
    assert torch.equal(decoded.tensors["w"], torch.ones(2, 3)) and decoded.tensors["w"].dtype == torch.float32
    assert decoded.losses == {"local": 0.5} and decoded.accuracies == {"test": 2 / 3} and decoded.flops == 5


BAD_METRICS = [
    ({**GOOD_METRICS, "seconds": -1.0}, "metric 'seconds' = -1"),
    ({**GOOD_METRICS, "seconds": math.nan}, "metric 'seconds' = nan"),
    ({**GOOD_METRICS, "flops": -3}, "metric 'flops' = -3 is out of range"),
    ({**GOOD_METRICS, "num_samples": 11}, "it reports 11 training samples, its partition has 10"),
    ({**GOOD_METRICS, "eval.test": 1.5}, "not an accuracy in [0, 1]"),
    ({**GOOD_METRICS, "loss.local": math.inf}, "metric 'loss.local' = inf is not a finite number"),
    ({k: v for k, v in GOOD_METRICS.items() if k != "loss.local"}, "missing ['loss.local']"),
    ({**GOOD_METRICS, "diag.x-y": 1.0}, "diagnostics must be at most"),
]


@pytest.mark.parametrize("metrics, reason", BAD_METRICS, ids=[r for _, r in BAD_METRICS])
def test_bad_metrics_are_refused_with_their_reason(metrics, reason):
    with pytest.raises(BadReply, match=re.escape(reason)):
        decode_train(_train_reply(metrics), EXPECTED)


def test_arrays_are_checked_before_they_are_decoded():
    with pytest.raises(BadReply, match=r"larger than flower.max_upload_mb"):
        decode_train(_train_reply(arrays={"w": torch.zeros(300)}), EXPECTED)  # 1200 bytes > 1000
    lying = Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=b"\x00" * 8)  # claims 40 bytes
    with pytest.raises(BadReply, match=r"holds 8 bytes for a declared float32 \[10\]"):
        decode_arrays(ArrayRecord({"w": lying}), 0)
    pickled = Array(np.zeros(2, dtype=np.float32))
    pickled.stype = "pickle"
    with pytest.raises(BadReply, match="serialised as 'pickle'"):
        decode_arrays(ArrayRecord({"w": pickled}), 0)
    with pytest.raises(BadReply, match="dtype object"):
        decode_arrays(ArrayRecord({"w": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"x")}), 0)


def test_evaluation_and_discovery_replies():
    ok = _reply({"metrics": MetricRecord({"eval.test": 1.0, "seconds": 0.2})})
    assert decode_eval(ok, EXPECTED).accuracies == {"test": 1.0}
    no_test = Expected(num_train=10, eval_sizes={"test": 0})
    assert math.isnan(decode_eval(_reply({"metrics": MetricRecord({"eval.test": math.nan, "seconds": 0.1})}),
                                  no_test).accuracies["test"])
    with pytest.raises(BadReply, match="without test samples"):
        decode_eval(_reply({"metrics": MetricRecord({"eval.test": 1.0, "seconds": 0.1})}), no_test)
    assert decode_node(_reply({"node": ConfigRecord({"partition-id": 1, "num-partitions": 3})})) == (1, 3)
    for node, reason in [({"partition-id": 3, "num-partitions": 3}, "out of range"),
                         ({"partition-id": "1", "num-partitions": 3}, "must be integers"),
                         ({"partition-id": 1}, "exactly partition-id and num-partitions")]:
        with pytest.raises(BadReply, match=reason):
            decode_node(_reply({"node": ConfigRecord(node)}))
