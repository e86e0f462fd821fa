"""Every reply a Flower node sends the server is decoded here, and only here: node discovery, training and
evaluation replies. A node is a peer, not a part of the server: whatever it sends (no metrics, metrics of
the wrong type or out of range, extra keys, float64 arrays, an upload larger than `flower.max_upload_mb`,
a duplicate partition-id) costs that node's client its round, with the reason in the log and the round's
`clients_dropped` count, and never ends the run.

Uploads are checked before they are decoded: each array's declared dtype, shape and byte size, against the
cap, and only then turned into tensors (numpy's `.npy` reader, never pickle). What the method itself checks
(names, shapes, per-class tables, finiteness: `Algorithm.upload_problem`) follows in the round loop, for
every engine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from pfl.algorithms.base import Tensors

# Arrays an update may carry (floats travel as float32 whatever precision the client computed in; class
# labels and counts as int64), by the dtype name Flower's Array declares.
WIRE_DTYPES = {"float32": torch.float32, "int64": torch.int64}
NPY_HEADER_MAX = 4096  # bytes of a .npy header beyond the array's data (numpy writes 64-128)
METRIC_LIMIT = 1e12  # |loss| and |diagnostic| above this are not a measurement but a hostile or broken client
FLOPS_LIMIT = 1e21
SECONDS_LIMIT = 1e7
MAX_DIAGNOSTICS = 64
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class BadReply(Exception):
    """A reply that does not follow pfl's protocol; its message is the reason logged for the dropped client."""


@dataclass
class TrainReply:
    tensors: Tensors
    num_samples: int
    losses: dict[str, float]
    diagnostics: dict[str, float]
    flops: int
    seconds: float
    accuracies: dict[str, float] = field(default_factory=dict)  # split -> accuracy, when evaluated along


@dataclass
class EvalReply:
    accuracies: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class Expected:
    """What the server expects of one client's reply, decided by the server alone."""

    num_train: int
    eval_sizes: dict[str, int]  # split -> the client's number of samples in it (0: its accuracy is NaN)
    loss_names: tuple[str, ...] = ()  # the method's phases, one `loss.<phase>` each
    max_upload_bytes: int = 0


def failure(reply: Message | None, timeout: float) -> str | None:
    """Why there is no usable reply at all (none came, or Flower carries the client's error), or None."""
    if reply is None:
        return f"no reply within {timeout:g} s (flower.round_timeout)"
    if reply.has_error():
        reason = (reply.error.reason or "").strip().splitlines()
        return f"the client failed (Flower error {reply.error.code}: {reason[-1][-300:] if reason else 'no reason'})"
    return None


def decode_train(reply: Message, expected: Expected) -> TrainReply:
    """A training reply: an 'upload' ArrayRecord and a 'metrics' MetricRecord with exactly the protocol's keys."""
    content = _records(reply, {"upload", "metrics"})
    metrics = _metrics(content["metrics"], {"num_samples", "flops", "seconds"}
                       | {f"loss.{p}" for p in expected.loss_names} | {f"eval.{s}" for s in expected.eval_sizes},
                       optional_prefix="diag.")
    num_samples = _integer(metrics, "num_samples", 0, 2**62)
    if num_samples != expected.num_train:
        raise BadReply(f"it reports {num_samples} training samples, its partition has {expected.num_train}")
    diagnostics = {k[5:]: _bounded(metrics, k) for k in metrics if k.startswith("diag.")}
    if len(diagnostics) > MAX_DIAGNOSTICS or not all(NAME.match(k) for k in diagnostics):
        raise BadReply(f"diagnostics must be at most {MAX_DIAGNOSTICS} names of letters, digits and '_'")
    return TrainReply(tensors=decode_arrays(content["upload"], expected.max_upload_bytes), num_samples=num_samples,
                      losses={p: _bounded(metrics, f"loss.{p}") for p in expected.loss_names},
                      diagnostics=diagnostics, flops=_integer(metrics, "flops", 0, FLOPS_LIMIT),
                      seconds=_seconds(metrics), accuracies=_accuracies(metrics, expected.eval_sizes))


def decode_eval(reply: Message, expected: Expected) -> EvalReply:
    """An evaluation reply: a 'metrics' MetricRecord with `eval.<split>` per asked split and `seconds`."""
    content = _records(reply, {"metrics"})
    metrics = _metrics(content["metrics"], {"seconds"} | {f"eval.{s}" for s in expected.eval_sizes})
    return EvalReply(_accuracies(metrics, expected.eval_sizes), _seconds(metrics))


def decode_node(reply: Message) -> tuple[int, int]:
    """A discovery reply: (partition-id, num-partitions)."""
    content = _records(reply, {"node"})
    node = content["node"]
    if not isinstance(node, ConfigRecord) or set(node) != {"partition-id", "num-partitions"}:
        raise BadReply("'node' must be a config record with exactly partition-id and num-partitions")
    partitions = node["num-partitions"]
    partition = node["partition-id"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (partition, partitions)):
        raise BadReply("partition-id and num-partitions must be integers")
    if not 1 <= partitions <= 1_000_000 or not 0 <= partition < partitions:
        raise BadReply(f"partition-id {partition} of num-partitions {partitions} is out of range")
    return partition, partitions


def decode_arrays(record, max_bytes: int) -> Tensors:
    """An ArrayRecord as tensors, checked before anything is decoded: numpy serialisation, a wire dtype, the
    declared shape's size matching the bytes, and all of it within `max_bytes` (0: no cap)."""
    if not isinstance(record, ArrayRecord):
        raise BadReply("'upload' is not an array record")
    declared = 0
    for name, array in record.items():
        if array.stype != "numpy.ndarray":
            raise BadReply(f"'{name}' is serialised as {str(array.stype)[:40]!r}, expected numpy.ndarray")
        if array.dtype not in WIRE_DTYPES:
            raise BadReply(f"'{name}' has dtype {str(array.dtype)[:20]}; updates carry float32 (int64 for labels "
                           f"and counts)")
        shape = tuple(array.shape)
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise BadReply(f"'{name}' has an invalid shape")
        size = math.prod(shape) * WIRE_DTYPES[array.dtype].itemsize
        declared += size
        if max_bytes and declared > max_bytes:
            raise BadReply(f"the upload is larger than flower.max_upload_mb ({max_bytes / 2**20:g} MB)")
        if not size <= len(array.data) <= size + NPY_HEADER_MAX:
            raise BadReply(f"'{name}' holds {len(array.data)} bytes for a declared {array.dtype} {list(shape)}")
    tensors = {}
    for name, array in record.items():
        try:
            values = array.numpy()  # np.load(allow_pickle=False)
        except Exception as exc:
            raise BadReply(f"'{name}' cannot be decoded ({type(exc).__name__})") from None
        if values.dtype != np.dtype(array.dtype) or values.shape != tuple(array.shape):
            raise BadReply(f"'{name}' decodes to {values.dtype} {list(values.shape)}, not the declared "
                           f"{array.dtype} {list(array.shape)}")
        tensors[name] = torch.from_numpy(values.copy())  # numpy's reader returns a read-only view of the bytes
    return tensors


# ---------------------------------------------------------------- pieces

def _records(reply: Message, names: set[str]) -> dict:
    try:
        content = reply.content
        present = set(content.keys())
    except Exception as exc:  # a reply whose content Flower cannot read
        raise BadReply(f"unreadable content ({type(exc).__name__})") from None
    if present != names:
        raise BadReply(f"records must be {sorted(names)}, got {sorted(present)[:5]}")
    return {name: content[name] for name in names}


def _metrics(record, required: set[str], optional_prefix: str = "") -> dict:
    if not isinstance(record, MetricRecord):
        raise BadReply("'metrics' is not a metric record")
    keys = set(record.keys())
    missing = sorted(required - keys)
    extra = sorted(k for k in keys - required if not (optional_prefix and k.startswith(optional_prefix)))
    if missing or extra:
        raise BadReply(f"metric keys differ from the protocol (missing {missing[:3]}, unexpected {extra[:3]})")
    return dict(record)


def _number(metrics: dict, key: str) -> float:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadReply(f"metric '{key}' is a {type(value).__name__}, expected a number")
    return float(value)


def _integer(metrics: dict, key: str, low: float, high: float) -> int:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadReply(f"metric '{key}' is a {type(value).__name__}, expected an integer")
    if not low <= value <= high:
        raise BadReply(f"metric '{key}' = {value} is out of range [{low:g}, {high:g}]")
    return value


def _bounded(metrics: dict, key: str) -> float:
    value = _number(metrics, key)
    if not math.isfinite(value) or abs(value) > METRIC_LIMIT:
        raise BadReply(f"metric '{key}' = {value:g} is not a finite number within +-{METRIC_LIMIT:g}")
    return value


def _seconds(metrics: dict) -> float:
    value = _number(metrics, "seconds")
    if not 0 <= value <= SECONDS_LIMIT:  # also false for NaN
        raise BadReply(f"metric 'seconds' = {value:g} is out of range [0, {SECONDS_LIMIT:g}]")
    return value


def _accuracies(metrics: dict, sizes: dict[str, int]) -> dict[str, float]:
    out = {}
    for split, size in sizes.items():
        value = _number(metrics, f"eval.{split}")
        if size == 0:
            if not math.isnan(value):
                raise BadReply(f"metric 'eval.{split}' = {value:g} for a client without {split} samples")
        elif not 0.0 <= value <= 1.0:
            raise BadReply(f"metric 'eval.{split}' = {value:g} is not an accuracy in [0, 1]")
        out[split] = value
    return out
