"""Every picture pfl draws (matplotlib is imported only when one is drawn):

    partition.png          a run's partition: clients x classes heatmaps of training and test sample counts,
                           each client labelled with its architecture and size (`pfl partition` draws it too)
    accuracy.png           a run's mean accuracy per round, band: min-max over clients
    clients.png            a run's final accuracy per client, and each client's accuracy per round
    accuracy_vs_round.png  a comparison's methods: mean accuracy per round (band: min-max over seeds)
    accuracy_vs_bytes.png  the same against bytes communicated so far
    per_client.png         a comparison's methods side by side per client
    tune_trials.png        a tune study's objective per trial, best so far
    tune_params.png        its objective against each tuned key

The partition counts (and the numbers behind them: per client samples, classes held, label entropy) are
computed here from the clients' labels and drawn exactly as computed, so what the picture shows is the
partition the run trains on (tests read the drawn arrays back from the figure). A function given a path
writes the picture there atomically (pfl.files) and closes the figure; every one returns its figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfl.data.partition import ClientData
from pfl.files import atomic_file

MAX_LABELLED_CLIENTS = 40  # more clients than this: tick labels for some of them only


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a picture is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path | None):
    """Write `figure` to `path` (when given) atomically, in the format its suffix names, and close it."""
    if path is not None:
        path = Path(path)
        with atomic_file(path) as tmp:
            figure.savefig(tmp, format=path.suffix[1:] or "png")
        _pyplot().close(figure)
    return figure


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
    plt = _pyplot()
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
    return _save(fig, path)


def partition_title(cfg) -> str:
    """What partition.png shows, naming the recipe and its dataset once each (once in all when the recipe
    is named after its dataset)."""
    data = cfg.dataset if cfg.name == cfg.dataset else f"recipe {cfg.name} ({cfg.dataset})"
    alpha = f", alpha={cfg.dirichlet_alpha}" if cfg.partition == "dirichlet" else ""
    return (f"samples per client and class: {data}, {cfg.partition} partition{alpha}, N={cfg.num_clients}, "
            f"seed {cfg.seed}")


def write_partition_picture(path: Path, cfg, clients: list[ClientData], architectures: list[str]) -> PartitionCounts:
    """The run's partition picture (partition.png) at `path`; returns the counts it shows."""
    counts = partition_counts(clients, architectures, cfg.num_classes)
    plot_partition(counts, path, partition_title(cfg))
    return counts


def _arch_colours(architectures: list[str]) -> dict[str, Any]:
    palette = _pyplot().get_cmap("tab10")
    return {arch: palette(i % 10) for i, arch in enumerate(dict.fromkeys(architectures))}


def plot_clients(architectures: list[str], accuracies: list[float], curves: list[dict[str, Any]],
                 path: Path | None, title: str):
    """clients.png: each client's final personalised accuracy as a bar coloured by its architecture, and,
    when `curves` is given (runs of at most 20 clients), each client's accuracy per evaluated round."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    colours = _arch_colours(architectures)
    n = len(accuracies)
    panels = 2 if curves else 1
    # constrained layout keeps the title, the panels' titles and their axis labels apart
    fig, axes = plt.subplots(1, panels, figsize=(min(4.0 + 0.3 * n, 14.0) + 5.0 * (panels - 1), 4.2), dpi=110,
                             squeeze=False, layout="constrained")
    bars = axes[0][0]
    values = [100 * a if not math.isnan(a) else 0.0 for a in accuracies]
    bars.bar(range(n), values, color=[colours[a] for a in architectures], width=0.8)
    for k, a in enumerate(accuracies):
        if math.isnan(a):
            bars.text(k, 1, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
    bars.set_title("final accuracy per client", fontsize=9)
    bars.set_xlabel("client")
    bars.set_ylabel("personalised test accuracy (%)")
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
        lines.set_title("each client per evaluated round (colour: architecture)", fontsize=9)
        lines.set_xlabel("round")
        lines.set_ylabel("personalised test accuracy (%)")
        lines.set_ylim(-2, 102)  # a client at 0% or 100% stays visible off the frame
        lines.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_client_comparison(per_method: dict[str, list[list[float]]], path: Path | None, title: str):
    """A comparison's per_client.png: for every client, each method's final accuracy (mean over seeds, the
    whisker spans the seeds) side by side. Past 40 clients the bars would not be readable: each method's
    per-client accuracies sorted instead (a client-accuracy profile)."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_accuracy(history: list[dict[str, Any]], path: Path | None, title: str):
    """accuracy.png: a run's mean test accuracy per round with the min-max band over clients, and validation
    accuracy when the run has a validation split."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    rows = [r for r in history if not math.isnan(r["acc_mean"])]
    rounds = [r["round"] for r in rows]
    if rows:
        ax.fill_between(rounds, [100 * r["acc_min"] for r in rows], [100 * r["acc_max"] for r in rows],
                        alpha=0.2, label="min-max over clients")
        ax.plot(rounds, [100 * r["acc_mean"] for r in rows], marker="o", ms=3, label="mean (unweighted)")
        ax.plot(rounds, [100 * r["acc_weighted"] for r in rows], ls="--", label="mean (sample-weighted)")
    val = [r for r in history if not math.isnan(r.get("val_acc_mean", math.nan))]
    if val:
        ax.plot([r["round"] for r in val], [100 * r["val_acc_mean"] for r in val], marker="s", ms=3, ls=":",
                label="validation mean (unweighted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("personalised accuracy (%)" if val else "personalised test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _seed_band(histories: list[list[dict[str, float]]], column: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per evaluated round of one method's seeds: x = mean over seeds of `column`; accuracy mean, min, max over
    seeds."""
    length = min(len(h) for h in histories)
    rows = [[h[i] for h in histories] for i in range(length)]
    rows = [rs for rs in rows if not any(math.isnan(x["acc_mean"]) for x in rs)]
    x = np.array([np.mean([x[column] for x in rs]) for rs in rows])
    accs = np.array([[100 * x["acc_mean"] for x in rs] for rs in rows])
    return x, accs.mean(axis=1), accs.min(axis=1), accs.max(axis=1)


def plot_comparison(histories: dict[str, list[list[dict[str, float]]]], reference: str, target: float,
                    by_round: Path, by_bytes: Path, subtitle: str) -> None:
    """A comparison's accuracy_vs_round.png and accuracy_vs_bytes.png: per method (`histories`: its seeds'
    metrics rows, methods in legend order) the mean accuracy over seeds with the min-max band, `reference`
    drawn in black, the target accuracy (when > 0) as a dashed line."""
    import textwrap

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    title = "\n".join(textwrap.wrap(subtitle, 100))
    for path, column, xlabel in ((by_round, "round", "round"),
                                 (by_bytes, "bytes_cumulative", "bytes communicated so far (up + down, log)")):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for method, runs in histories.items():
            x, mean, lo, hi = _seed_band(runs, column)
            if len(x) == 0:
                continue
            style = {"lw": 2.4, "color": "black"} if method == reference else {"lw": 1.4}
            if column == "bytes_cumulative":
                if x[-1] <= 0:  # sends nothing: a level, not a curve
                    ax.axhline(mean[-1], ls=":", label=f"{method} (sends nothing; final level)",
                               **({"color": "grey"}))
                    continue
                keep = x > 0
                x, mean, lo, hi = x[keep], mean[keep], lo[keep], hi[keep]
            line, = ax.plot(x, mean, label=method, **style)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
        if target > 0:
            ax.axhline(100 * target, color="red", ls="--", lw=0.8, label=f"target {100 * target:g}%")
        if column == "bytes_cumulative":
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("personalised test accuracy, mean over clients (%)")
        ax.set_title(title, fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        _save(fig, path)


def plot_study(out: Path, method: str, space: dict[str, Any], rows: list[dict[str, Any]], best_number: int
               ) -> list[Path]:
    """A tune study's tune_trials.png (objective per trial, pruned trials marked, best so far) and
    tune_params.png (objective against each tuned key of `space`, pfl.tune.Dimension per key), in `out`."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    paths = [out / "tune_trials.png", out / "tune_params.png"]
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r["trial"] for r in done], [100 * r["objective"] for r in done], "o", label="complete: objective")
    ax.plot([r["trial"] for r in pruned], [100 * r["last_val_acc"] for r in pruned], "x", color="red", ms=8,
            label="pruned: last validation accuracy")
    best_so_far, xs, ys = -math.inf, [], []
    for r in rows:
        if r["state"] == "complete":
            best_so_far = max(best_so_far, r["objective"])
        if best_so_far > -math.inf:
            xs.append(r["trial"])
            ys.append(100 * best_so_far)
    ax.step(xs, ys, where="post", color="black", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"pfl tune {method}: objective per trial (best: trial {best_number})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, paths[0])
    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        dim = space[key]
        for group, marker, color in ((done, "o", None), (pruned, "x", "red")):
            xs = [r[key] for r in group]
            ys = [100 * (r["objective"] if r["state"] == "complete" else r["last_val_acc"]) for r in group]
            if dim.kind == "choice":
                xs = [list(dim.choices).index(x) for x in xs]
            ax.plot(xs, ys, marker, color=color, ls="")
        if dim.kind == "choice":
            ax.set_xticks(range(len(dim.choices)), [str(c) for c in dim.choices])
        else:
            if dim.kind in ("log", "int-log"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(dim.low, dim.high)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.suptitle(f"pfl tune {method}: objective (o) or last value before pruning (x) per tuned key", fontsize=9)
    fig.tight_layout()
    _save(fig, paths[1])
    return paths
