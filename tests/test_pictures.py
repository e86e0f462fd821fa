"""Pictures of the set-up: the partition heatmaps show exactly the partition the run uses (read back from
the drawn arrays, not pixels), and `pfl partition` writes nothing but its picture."""

import numpy as np
import pytest

from pfl import config
from pfl.build import Hardware, build
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.pictures import (
    PartitionCounts,
    client_labels,
    partition_counts,
    plot_client_comparison,
    plot_clients,
    plot_partition,
)
from pfl.run import train
from pfl.rundir import read_per_client


def test_heatmaps_draw_the_partitions_counts():
    cfg = config.resolve({**config.read_recipe_file("smoke")[0], "partition": "dirichlet", "dirichlet_alpha": 0.5,
                          "num_clients": 6})
    setup = build(cfg)
    counts = partition_counts(setup.clients, setup.architectures, cfg.num_classes)
    figure = plot_partition(counts, None, "t")
    train_drawn = np.asarray(figure.axes[0].images[0].get_array())
    test_drawn = np.asarray(figure.axes[1].images[0].get_array())
    for k, client in enumerate(setup.clients):  # by hand: each client's labels, class by class
        for c in range(cfg.num_classes):
            assert train_drawn[k, c] == int((client.y_train == c).sum())
            assert test_drawn[k, c] == int((client.y_test == c).sum())
    assert train_drawn.sum() + test_drawn.sum() == cfg["synthetic.num_samples"]  # a partition of the data set
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert ticks == client_labels(counts) and ticks[1] == f"1 {setup.architectures[1]} (n={setup.clients[1].num_train})"


def test_label_entropy_in_bits():
    counts = PartitionCounts(np.array([[2, 2, 0, 0], [5, 0, 0, 0], [1, 1, 1, 1]]), np.zeros((3, 4), dtype=int),
                             ["a", "b", "c"])
    assert counts.entropy() == pytest.approx([1.0, 0.0, 2.0])


def test_partition_command_writes_only_its_picture(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["partition", "--recipe", "smoke", "--set", "num_clients=3"], terminal_width=200)
    assert res.exit_code == 0, res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke-partition.png"]
    assert (tmp_path / "smoke-partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "entropy" in res.stdout and "total" in res.stdout


def test_clients_picture_draws_each_clients_accuracy_and_curves(tmp_path):
    """A run's clients.png: bar k is client k's final accuracy in per_client.csv, coloured by architecture;
    one curve per client through every evaluated round (the last point is the bar)."""
    cfg = config.resolve({**config.read_recipe_file("smoke")[0], "rounds": 3, "eval_every": 1})
    summary = train(cfg, tmp_path / "run", Hardware())
    assert (tmp_path / "run" / "clients.png").is_file()
    rows = read_per_client(tmp_path / "run")
    archs, accs = [r["arch"] for r in rows], [float(r["accuracy"]) for r in rows]
    assert summary["rounds"] == 3
    # the curves a run keeps: every evaluated round's per-client accuracies, the last = per_client.csv
    setup = build(cfg)
    run = FederatedRun.local(cfg, setup.clients, setup.architectures, setup.algorithm, MemoryStore(), make_runner())
    run.initialise()
    run.run()
    curves = run.state.client_curves
    assert [c["round"] for c in curves] == [1, 2, 3] and curves[-1]["accuracies"] == run.state.last_accuracies
    figure = plot_clients(archs, accs, [*curves[:-1], {"round": 3, "accuracies": accs}], None, "t")
    heights = [p.get_height() for p in figure.axes[0].patches]
    assert heights == pytest.approx([100 * a for a in accs])
    colours = [p.get_facecolor() for p in figure.axes[0].patches]
    assert (colours[0] == colours[1]) == (archs[0] == archs[1])
    curves = figure.axes[1].get_lines()
    assert len(curves) == 4 and [line.get_ydata()[-1] for line in curves] == pytest.approx([100 * a for a in accs])


def test_client_comparison_puts_methods_side_by_side():
    per_method = {"a": [[0.5, 1.0, 0.25], [0.7, 1.0, 0.75]], "b": [[0.1, 0.2, 0.3]]}
    figure = plot_client_comparison(per_method, None, "t")
    bars = figure.axes[0].patches
    assert [round(p.get_height(), 6) for p in bars] == [60.0, 100.0, 50.0, 10.0, 20.0, 30.0]
    assert bars[0].get_x() < bars[3].get_x() < bars[1].get_x()  # client 0: a then b, before client 1


# ------------------------------------------------------------------ what a user reads on them

def _history(means: list[float]) -> list[dict]:
    return [{"round": t, "acc_mean": m, "acc_weighted": m, "acc_std": 0.0, "acc_min": m, "acc_max": m}
            for t, m in enumerate(means, start=1)]


def test_the_best_round_is_called_not_final_only_when_it_is_not_the_final_round():
    from pfl.report import BEST_IS_FINAL_NOTE, BEST_NOTE, describe_best, final_and_best

    final, best = final_and_best(_history([0.5, 0.7, 0.9]))  # best at the final round
    assert best["round"] == final["round"] == 3 and best["note"] == BEST_IS_FINAL_NOTE
    assert describe_best(final, best) == "90.00% at round 3 (the final round)"
    assert "not the final result" not in describe_best(final, best) + best["note"]

    final, best = final_and_best(_history([0.5, 0.9, 0.7]))  # best before the final round
    assert (best["round"], final["round"]) == (2, 3) and best["note"] == BEST_NOTE
    assert describe_best(final, best) == "90.00% at round 2 (not the final result)"


def test_partition_title_names_the_recipe_and_dataset_once_each():
    from pfl.pictures import partition_title

    fmnist = config.load("fmnist", ["num_clients=10"])[0]
    assert partition_title(fmnist) == "samples per client and class: fmnist, pathological partition, N=10, seed 0"
    smoke = config.load("smoke", ["partition=dirichlet", "dirichlet_alpha=0.5"])[0]
    assert partition_title(smoke) == ("samples per client and class: recipe smoke (synthetic), dirichlet partition, "
                                      "alpha=0.5, N=4, seed 0")


def test_clients_picture_labels_do_not_run_into_the_titles():
    archs, accs = ["cnn1", "cnn2", "cnn3", "cnn4"], [1.0, 1.0, 0.5, 0.0]
    curves = [{"round": t, "accuracies": accs} for t in (1, 2, 3)]
    figure = plot_clients(archs, accs, curves, None, "pfedlora on synthetic (N=4, C=1.0, seed 0)")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = figure._suptitle.get_window_extent(renderer).expanded(1.0, 1.5)  # and a margin above and below
    for ax in figure.axes:
        label, panel_title = ax.yaxis.label.get_window_extent(renderer), ax.title.get_window_extent(renderer)
        assert not label.overlaps(title) and not label.overlaps(panel_title) and not panel_title.overlaps(title)
        panel = ax.get_window_extent(renderer)
        assert panel.y0 <= label.y0 and label.y1 <= panel.y1  # no label longer than its panel
