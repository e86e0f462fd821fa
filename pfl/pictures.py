"""Pictures of a run's set-up that a user checks before trusting a result: the partition (clients x classes
heatmaps of training and test sample counts, each client labelled with its architecture and size) and the
numbers behind it (per client: samples, classes held, label entropy).

The counts are computed here from the clients' labels and drawn exactly as computed, so what the picture
shows is the partition the run trains on (tests read the drawn arrays back from the figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfl.data.partition import ClientData

MAX_LABELLED_CLIENTS = 40  # more clients than this: tick labels for some of them only


@dataclass(frozen=True)
class PartitionCounts:
    """Samples per (client, class) of the training and test splits, and each client's architecture."""

    train: np.ndarray  # [N, C] int64
    test: np.ndarray  # [N, C] int64
    architectures: list[str]

    @property
    def num_clients(self) -> int:
        return self.train.shape[0]

    def entropy(self) -> np.ndarray:
        """Label entropy of each client's training data, in bits (log2 C = a uniform client)."""
        totals = self.train.sum(axis=1, keepdims=True)
        p = np.divide(self.train, totals, out=np.zeros(self.train.shape, dtype=np.float64), where=totals > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log2(p), 0.0)
        return terms.sum(axis=1)


def partition_counts(clients: list[ClientData], architectures: list[str], num_classes: int) -> PartitionCounts:
    def counts(labels) -> np.ndarray:
        return np.bincount(labels.cpu().numpy(), minlength=num_classes).astype(np.int64)

    return PartitionCounts(np.stack([counts(c.y_train) for c in clients]),
                           np.stack([counts(c.y_test) for c in clients]), list(architectures))


def client_labels(counts: PartitionCounts) -> list[str]:
    return [f"{k} {arch} (n={n})" for k, (arch, n) in
            enumerate(zip(counts.architectures, counts.train.sum(axis=1).tolist()))]


def plot_partition(counts: PartitionCounts, path: Path | None, title: str):
    """Two heatmaps side by side (training, test), clients as rows, classes as columns, the count in each
    cell when the grid is small enough to read. Saved to `path` when given; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c = counts.train.shape
    height = min(2.0 + 0.28 * n, 14.0)
    width = min(4.0 + 0.9 * c, 16.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), dpi=110, sharey=True)
    labels = client_labels(counts)
    step = max(1, math.ceil(n / MAX_LABELLED_CLIENTS))
    for ax, data, name in ((axes[0], counts.train, "training"), (axes[1], counts.test, "test")):
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name} samples ({int(data.sum()):,})", fontsize=9)
        ax.set_xlabel("class")
        ax.set_xticks(range(c) if c <= 20 else range(0, c, math.ceil(c / 20)))
        if n * c <= 400:
            limit = data.max() / 2 if data.size else 0
            for (i, j), value in np.ndenumerate(data):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=6,
                        color="black" if value > limit else "white")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    axes[0].set_yticks(range(0, n, step))
    axes[0].set_yticklabels(labels[::step], fontsize=7 if n <= MAX_LABELLED_CLIENTS else 6)
    axes[0].set_ylabel("client (architecture, training samples)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def write_partition_picture(path: Path, cfg, clients: list[ClientData], architectures: list[str]) -> PartitionCounts:
    """The run's partition picture (partition.png) at `path`; returns the counts it shows."""
    import matplotlib.pyplot as plt

    counts = partition_counts(clients, architectures, cfg.num_classes)
    alpha = f", alpha={cfg.dirichlet_alpha}" if cfg.partition == "dirichlet" else ""
    figure = plot_partition(counts, path, f"{cfg.name}: {cfg.dataset}, {cfg.partition} partition{alpha}, "
                                          f"N={cfg.num_clients}, seed {cfg.seed}")
    plt.close(figure)
    return counts
