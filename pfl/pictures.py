"""Pictures a user checks before trusting a result: the partition (clients x classes heatmaps of training and
test sample counts, each client labelled with its architecture and size) and the numbers behind it (per
client: samples, classes held, label entropy); each client's accuracy (clients.png), and a comparison's
methods side by side per client (per_client.png).

The counts are computed here from the clients' labels and drawn exactly as computed, so what the picture
shows is the partition the run trains on (tests read the drawn arrays back from the figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _arch_colours(architectures: list[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10")
    return {arch: palette(i % 10) for i, arch in enumerate(dict.fromkeys(architectures))}


def plot_clients(architectures: list[str], accuracies: list[float], curves: list[dict[str, Any]],
                 path: Path | None, title: str):
    """clients.png: each client's final personalised accuracy as a bar coloured by its architecture, and,
    when `curves` is given (runs of at most 20 clients), each client's accuracy per evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = _arch_colours(architectures)
    n = len(accuracies)
    panels = 2 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(min(4.0 + 0.3 * n, 14.0) + 5.0 * (panels - 1), 4.2), dpi=110,
                             squeeze=False)
    bars = axes[0][0]
    values = [100 * a if not math.isnan(a) else 0.0 for a in accuracies]
    bars.bar(range(n), values, color=[colours[a] for a in architectures], width=0.8)
    for k, a in enumerate(accuracies):
        if math.isnan(a):
            bars.text(k, 1, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    bars.set_xlabel("client")
    bars.set_ylabel("final personalised test accuracy (%)")
    bars.set_ylim(0, 100)
    if n <= 50:
        bars.set_xticks(range(n))
        bars.tick_params(axis="x", labelsize=7)
    bars.grid(axis="y", alpha=0.3)
    bars.legend(handles=[Patch(color=c, label=a) for a, c in colours.items()], fontsize=7, loc="lower right")
    if curves:
        lines = axes[0][1]
        rounds = [c["round"] for c in curves]
        for k in range(n):
            lines.plot(rounds, [100 * c["accuracies"][k] for c in curves], color=colours[architectures[k]],
                       lw=1.0, marker="o", ms=2)
        from matplotlib.ticker import MaxNLocator

        lines.xaxis.set_major_locator(MaxNLocator(integer=True))
        lines.set_xlabel("round")
        lines.set_ylabel("test accuracy per client (%), coloured by architecture")
        lines.set_ylim(0, 100)
        lines.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def plot_client_comparison(per_method: dict[str, list[list[float]]], path: Path | None, title: str):
    """A comparison's per_client.png: for every client, each method's final accuracy (mean over seeds, the
    whisker spans the seeds) side by side. Past 40 clients the bars would not be readable: each method's
    per-client accuracies sorted instead (a client-accuracy profile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(per_method)
    n = len(next(iter(per_method.values()))[0])
    fig, ax = plt.subplots(figsize=(min(5.0 + 0.25 * n * len(methods) / 2, 16.0) if n <= 40 else 8.0, 4.8),
                           dpi=110)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        seeds = np.array(per_method[method], dtype=np.float64) * 100  # [seeds, clients]
        mean = np.nanmean(seeds, axis=0)
        if n <= 40:
            x = np.arange(n) + (i - (len(methods) - 1) / 2) * width
            lo, hi = mean - np.nanmin(seeds, axis=0), np.nanmax(seeds, axis=0) - mean
            ax.bar(x, mean, width=width, label=method, yerr=[lo, hi] if len(seeds) > 1 else None,
                   error_kw={"lw": 0.6})
        else:
            ax.plot(np.linspace(0, 100, n), np.sort(mean), label=method)
    if n <= 40:
        ax.set_xticks(range(n))
        ax.set_xlabel("client")
    else:
        ax.set_xlabel("clients, sorted by accuracy (percentile)")
    ax.set_ylabel("final personalised test accuracy (%), mean over seeds")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
