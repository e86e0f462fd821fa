"""Pictures of the set-up: the partition heatmaps show exactly the partition the run uses (read back from
the drawn arrays, not pixels), and `pfl partition` writes nothing but its picture."""

import numpy as np
import pytest

from pfl import config
from pfl.build import build
from pfl.pictures import PartitionCounts, client_labels, partition_counts, plot_partition


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
