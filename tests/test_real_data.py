"""Proof that the system learns on real data: pFedLoRA on Fashion-MNIST (Debian's package, installed by CI)."""

import json

import pytest

from pfl import config
from pfl.data.datasets import DEBIAN_FMNIST_DIR
from pfl.run import Hardware, evaluate_run, train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")]


def test_pfedlora_on_fashion_mnist_is_far_above_chance_after_two_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("PFL_DATA_DIR", str(tmp_path / "data"))
    cfg, _ = config.load("fmnist", ["rounds=2", "data_fraction=0.25"])
    summary = train(cfg, tmp_path / "run", Hardware())
    # 2 classes per client: chance is 50%; a model that learnt nothing stays near it
    assert summary["final"]["acc_mean"] > 0.85, summary["final"]
    assert summary["final"]["acc_min"] > 0.6
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"] == summary["final"]
    _, rows = evaluate_run(tmp_path / "run", Hardware())
    assert abs(sum(r["accuracy"] for r in rows) / len(rows) - summary["final"]["acc_mean"]) < 1e-9
