"""Partitioners: pooled labels -> per-client sample indices, then a per-client train/test split.

All are deterministic functions of (labels, settings, seed). Definitions (docs/algorithms.md):
- pathological: each client holds `classes_per_client` distinct classes. Classes are dealt so that holders
  are as balanced as possible (each client takes the least-held classes, ties broken by the seed). A class
  is shared among its holders in proportions drawn from U(0.4, 0.6), normalised. A class nobody holds
  (only when N * classes_per_client < number of classes) is left unused.
- dirichlet: for each class, proportions over clients ~ Dir(alpha); redrawn (up to 100 times) until every
  client holds at least `min_samples` samples.
- iid: a seeded permutation cut into N near-equal parts.
The train/test split is stratified per client and class, so both share the client's label distribution;
a class with a single sample goes to the training side, so every client always has something to train on.
With `val_fraction` > 0 the training side is split again the same way (its own seeded stream, so the
partition and the test split do not change): the validation share is never trained on.
With `data_fraction` < 1 the partition is that of a seeded, class-stratified subset of the pooled data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pfl.errors import ConfigError
from pfl.schema import Config


@dataclass
class ClientData:
    """One client's private data, uint8 images and int64 labels; the validation split is empty unless the
    recipe asks for one (`val_fraction`)."""

    client_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __post_init__(self):
        if self.y_val is None:
            self.x_val = self.x_train[:0]
            self.y_val = self.y_train[:0]

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    def to(self, device: torch.device | str) -> ClientData:
        """This client's data on `device` (a run that keeps client data resident on its GPU)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self) if f.name != "client_id"})

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the "test" or "val" split."""
        if name == "test":
            return self.x_test, self.y_test
        if name == "val":
            return self.x_val, self.y_val
        raise ValueError(f"unknown evaluation split {name!r}: 'test' or 'val'")


def pathological(labels: np.ndarray, num_clients: int, classes_per_client: int, num_classes: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    if classes_per_client > num_classes:
        raise ConfigError(f"recipe key 'classes_per_client': must be <= {num_classes}, got {classes_per_client}")
    held = np.zeros(num_classes, dtype=np.int64)
    client_classes: list[np.ndarray] = []
    for _ in range(num_clients):
        tiebreak = rng.random(num_classes)
        order = np.lexsort((tiebreak, held))  # least-held classes first, random among equals
        chosen = np.sort(order[:classes_per_client])
        held[chosen] += 1
        client_classes.append(chosen)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        holders = [k for k in range(num_clients) if c in client_classes[k]]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.uniform(0.4, 0.6, size=len(holders))
        cuts = _cuts(len(idx), shares / shares.sum())
        for k, piece in zip(holders, np.split(idx, cuts)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int,
              rng: np.random.Generator, min_samples: int = 10) -> list[np.ndarray]:
    need = min(min_samples, len(labels) // num_clients)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(idx) == 0:
                continue
            props = rng.dirichlet(np.full(num_clients, alpha))
            for k, piece in enumerate(np.split(idx, _cuts(len(idx), props))):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= max(need, 1):
            return out
    raise ConfigError(f"recipe key 'dirichlet_alpha': with alpha={alpha} and {num_clients} clients some client "
                      f"got fewer than {need} samples in 100 draws; raise dirichlet_alpha, lower num_clients or "
                      f"lower min_client_samples")


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(num_samples), num_clients)]


def _cuts(n: int, proportions: np.ndarray) -> np.ndarray:
    """Cut points splitting n items by proportions (largest-remainder rounding, sums to n)."""
    raw = proportions * n
    counts = np.floor(raw).astype(np.int64)
    remainder = n - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:remainder]] += 1
    return np.cumsum(counts)[:-1]


def split_train_test(indices: np.ndarray, labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified per class: round(test_fraction * n_c) test samples per class, at least one left to train."""
    train, test = [], []
    for c in np.unique(labels[indices]):
        idx = rng.permutation(indices[labels[indices] == c])
        n_test = min(round(test_fraction * len(idx)), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition_indices(labels: np.ndarray, cfg, num_classes: int
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per client (train, validation, test) indices into the pooled data set, from the recipe's settings."""
    fraction = getattr(cfg, "data_fraction", 1.0)
    if fraction < 1.0:  # partition a subset, then map its positions back to pooled indices
        keep = stratified_subset(labels, fraction, np.random.default_rng([cfg.seed, 4]))
        whole = Config({**cfg.as_flat(), "data_fraction": 1.0})
        return [tuple(keep[part] for part in client) for client in partition_indices(labels[keep], whole, num_classes)]
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.num_clients
    if n > len(labels):
        raise ConfigError(f"recipe key 'num_clients': must be <= the {len(labels)} samples of the data set, "
                          f"got {n}")
    if cfg.partition == "pathological":
        parts = pathological(labels, n, cfg.classes_per_client, num_classes, rng)
    elif cfg.partition == "dirichlet":
        parts = dirichlet(labels, n, cfg.dirichlet_alpha, num_classes, rng, getattr(cfg, "min_client_samples", 10))
    else:
        parts = iid(len(labels), n, rng)
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"recipe key 'num_clients': {len(empty)} clients got no samples with this partition; "
                          f"lower num_clients or use more data")
    splits = [split_train_test(p, labels, cfg.test_fraction, rng) for p in parts]
    val_fraction = getattr(cfg, "val_fraction", 0.0)
    out = []
    for k, (train, test) in enumerate(splits):
        val = np.empty(0, dtype=np.int64)
        if val_fraction > 0:  # its own stream: the partition and the test split are those of val_fraction = 0
            train, val = split_train_test(train, labels, val_fraction, np.random.default_rng([cfg.seed, 3, k]))
        out.append((train, val, test))
    return out


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) samples of every class c (at least one of each)."""
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep.append(rng.choice(members, max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(keep))


def build_clients(dataset, cfg) -> list[ClientData]:
    labels = dataset.y.numpy()
    clients = []
    for k, (tr, va, te) in enumerate(partition_indices(labels, cfg, dataset.num_classes)):
        tr_t, va_t, te_t = torch.from_numpy(tr), torch.from_numpy(va), torch.from_numpy(te)
        clients.append(ClientData(k, dataset.x[tr_t], dataset.y[tr_t], dataset.x[te_t], dataset.y[te_t],
                                  dataset.x[va_t], dataset.y[va_t]))
    return clients
