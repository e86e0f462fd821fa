"""The server's robust aggregation, written once for every method whose server step takes a mean.

Recipe keys (top level, the same for every method): `aggregation` = "mean" | "median" | "trimmed_mean",
`aggregation_trim` (trimmed_mean: the share dropped from each end) and `clip_update_norm` (0: off).

- **mean** is each method's own mean, exactly as before (the sample-weighted `weighted_mean`, FedProto's
  count-weighted class mean, FD's and FedSSA's unweighted class means): the same arithmetic, bit for bit.
- **median** is the coordinate-wise median over the n values of a coordinate, *unweighted* (every upload,
  or every sender of a class, counts once, whatever it reports as its sample count: a client cannot buy
  influence by claiming more samples). For an even n it is the mean of the two middle values.
- **trimmed_mean** is coordinate-wise and unweighted too: sort the n values of a coordinate, drop the
  k = floor(aggregation_trim * n) smallest and the k largest, average the n - 2k left (k = 0, e.g. n < 10 at
  trim 0.1, is the plain unweighted mean).
- **clipping** (`clip_update_norm` = B > 0) acts on each upload before any rule, the mean included: the
  update is the upload minus the server's current value of the same tensor (a tensor the server has no
  value for counts from zero), its L2 norm is taken over all the upload's floating tensors together, and
  when it exceeds B the update is scaled by B / norm: upload' = reference + (upload - reference) * B / norm.
  Integer tensors (class labels, counts, BN batch counters) are never changed. For a per-class table a
  row's reference is the server's current row of that class where there is one, else zero (the row itself).

Computed in float64 and returned in the input's dtype, as `weighted_mean` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pfl.schema import Tensors

RULES = ("mean", "median", "trimmed_mean")
# coordinates combined at once (x uploads, in float64): bounds the sort's memory for large models
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Rule:
    """The recipe's aggregation: `name` (one of RULES), `trim` (trimmed_mean) and `clip` (0: no clipping)."""

    name: str = "mean"
    trim: float = 0.0
    clip: float = 0.0

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"aggregation must be one of {', '.join(RULES)}, got {self.name!r}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"aggregation_trim must be in [0, 0.5), got {self.trim}")
        if not self.clip >= 0.0:
            raise ValueError(f"clip_update_norm must be >= 0, got {self.clip}")

    @classmethod
    def from_config(cls, cfg) -> Rule:
        return cls(cfg["aggregation"], cfg["aggregation_trim"], cfg["clip_update_norm"])

    @property
    def is_mean(self) -> bool:
        return self.name == "mean"

    def describe(self) -> dict:
        """What summary.json records."""
        return {"rule": self.name, "trim": self.trim if self.name == "trimmed_mean" else None,
                "clip_update_norm": self.clip}


def trimmed_count(trim: float, n: int) -> int:
    """k = floor(trim * n), the values dropped from each end (the 1e-9 absorbs 0.29 * 100 = 28.999...)."""
    return math.floor(trim * n + 1e-9)


def combine(values: torch.Tensor, rule: Rule) -> torch.Tensor:
    """The unweighted coordinate-wise median or trimmed mean of `values` [n, *shape] over its first dimension,
    in float64 (the `mean` rule is each method's own arithmetic and never comes here)."""
    if rule.is_mean:
        raise ValueError("combine() is the median and trimmed mean; a method's mean is its own arithmetic")
    n = values.shape[0]
    if n == 0:
        raise ValueError("no values to aggregate")
    flat = values.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=torch.float64)
    step = max(1, _CHUNK // n)
    for start in range(0, flat.shape[1], step):
        part = flat[:, start:start + step].to(torch.float64).sort(dim=0).values
        if rule.name == "median":
            out[start:start + step] = (part[(n - 1) // 2] + part[n // 2]) / 2
        else:
            k = trimmed_count(rule.trim, n)
            out[start:start + step] = part[k:n - k].mean(dim=0)
    return out.reshape(values.shape[1:])


def clip_update(tensors: Tensors, bound: float, reference: Tensors | None = None) -> Tensors:
    """`tensors` with its update (tensors - reference, over all floating tensors together) scaled to an L2
    norm of at most `bound`; unchanged (the same dict) when already within it or `bound` is 0."""
    if bound <= 0:
        return tensors
    reference = reference or {}
    floats = [name for name, t in tensors.items() if t.is_floating_point()]
    deltas = {}
    for name in floats:
        ref = reference.get(name)
        delta = tensors[name].to(torch.float64)
        if ref is not None:
            delta = delta - ref.to(torch.float64)
        deltas[name] = delta
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    if norm <= bound:
        return tensors
    scale = bound / norm
    out = dict(tensors)
    for name in floats:
        ref = reference.get(name)
        clipped = deltas[name] * scale
        if ref is not None:
            clipped = clipped + ref.to(torch.float64)
        out[name] = clipped.to(tensors[name].dtype)
    return out


def clip_uploads(uploads: list, bound: float, reference: Tensors | Callable | None = None) -> list:
    """Every upload clipped by `clip_update`; `reference` is the server's tensors by name, or a function
    giving an upload's reference (per-class tables), or None (the update is the upload itself)."""
    from pfl.algorithms.base import Upload

    if bound <= 0:
        return uploads
    out = []
    for u in uploads:
        ref = reference(u) if callable(reference) else reference
        out.append(Upload(u.client_id, u.num_samples, clip_update(u.tensors, bound, ref)))
    return out


def class_reference(labels: torch.Tensor, known: torch.Tensor, rows: Tensors, num_classes: int) -> Tensors:
    """An upload's reference for a per-class table: for each name in `rows` (the server's rows of the classes
    `known`), the server's row of each of `labels` where it has one, else zeros."""
    where = torch.full((num_classes,), -1, dtype=torch.int64)
    where[known] = torch.arange(len(known))
    at = where[labels]
    have = at >= 0
    out = {}
    for name, table in rows.items():
        ref = torch.zeros((len(labels), *table.shape[1:]), dtype=table.dtype)
        ref[have] = table[at[have]]
        out[name] = ref
    return out


def robust_mean(uploads: list, rule: Rule, reference: Tensors | None = None) -> Tensors:
    """The server step of every method that averages whole tensors: each upload clipped against
    `reference` (the server's current tensors), then combined by the rule. `mean` is `weighted_mean`
    itself (sum_k n_k x_k / sum_k n_k, float64), so its results are unchanged bit for bit."""
    from pfl.algorithms.base import weighted_mean

    uploads = clip_uploads(uploads, rule.clip, reference)
    if rule.is_mean:
        return weighted_mean(uploads)
    if not uploads:
        raise ValueError("no uploads to aggregate")
    out = {}
    for name, first in uploads[0].tensors.items():
        stacked = torch.stack([u.tensors[name] for u in uploads])
        out[name] = combine(stacked, rule).to(first.dtype)
    return out


def class_means(tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], num_classes: int,
                rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class aggregate of per-class tables (FedProto, FD, FedTGP): `tables` holds one (labels [m],
    rows [m, *shape], weights [m] or None) per upload. Returns (values [C, *shape] float64, sent [C] bool);
    a class nobody sent has value 0 and sent False.

    mean: sum of weight * row over the senders of a class / sum of their weights (weights None: 1 each), the
    arithmetic FedProto and FD always used; median, trimmed_mean: unweighted, over the rows sent for the class."""
    shape = tables[0][1].shape[1:] if tables else ()
    sums = torch.zeros((num_classes, *shape), dtype=torch.float64)
    weight_sums = torch.zeros(num_classes, dtype=torch.float64)
    for labels, rows, weights in tables:
        w = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
        sums.index_add_(0, labels, rows.double() * w.reshape(-1, *([1] * len(shape))))
        weight_sums.index_add_(0, labels, w)
    sent = weight_sums > 0
    if rule.is_mean:
        sums[sent] = sums[sent] / weight_sums[sent].reshape(-1, *([1] * len(shape)))
        return sums, sent
    values = torch.zeros((num_classes, *shape), dtype=torch.float64)
    for c in torch.nonzero(sent).flatten().tolist():
        rows = torch.cat([r[labels == c] for labels, r, _ in tables])
        values[c] = combine(rows, rule)
    return values, sent


def dense_class_means(values: torch.Tensor, owns: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Per-class aggregate of a dense table (FedSSA: every client's latest rows): `values` [N, C, *shape],
    `owns` [N, C] bool. Returns [C, *shape] float64 for the classes some client owns (others 0).
    mean: the unweighted mean over the owners, FedSSA's arithmetic; median, trimmed_mean: over the owners."""
    owners = owns.sum(0)
    sent = owners > 0
    extra = [1] * (values.ndim - 2)
    mask = owns.double().reshape(*owns.shape, *extra)
    out = torch.zeros(values.shape[1:], dtype=torch.float64)
    if rule.is_mean:
        total = (values.double() * mask).sum(0)
        out[sent] = total[sent] / owners[sent].reshape(-1, *extra)
        return out
    for c in torch.nonzero(sent).flatten().tolist():
        out[c] = combine(values[owns[:, c], c], rule)
    return out
