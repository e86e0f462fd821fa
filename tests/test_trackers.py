"""Experiment trackers (`--logger`): what a run sends is read back with each library's own reader and
equals the run's metrics.csv; a missing extra or an unknown tracker is one line and exit 2."""

import csv
import importlib.util

import pytest

from pfl import config
from pfl.build import Hardware
from pfl.run import train


def acc_by_round(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["round"]): float(r["acc_mean"]) for r in csv.DictReader(f) if r["acc_mean"]}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
                    reason="needs the tensorboard and mlflow extras (installed with .[dev])")
def test_tensorboard_mlflow_and_csv_hold_the_runs_metrics_params_and_plots(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config.resolve({**config.read_recipe_file("smoke")[0], "rounds": 3})
    out = tmp_path / "run"
    train(cfg, out, Hardware(), trackers=("tensorboard", "mlflow", "csv"))
    expected = acc_by_round(out)
    assert sorted(expected) == [1, 2, 3]

    events = EventAccumulator(str(out / "trackers" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("acc_mean")} == pytest.approx(expected)
    assert {"acc_weighted", "acc_min", "train_loss", "bytes_up", "flops_client", "train_seconds"} <= \
        set(events.Tags()["scalars"])
    assert {"plots/accuracy", "plots/clients", "plots/partition"} <= set(events.Tags()["images"])

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "acc_mean")
    assert {m.step: m.value for m in history} == pytest.approx(expected)
    assert run.data.params["method"] == "pfedlora" and run.data.params["rounds"] == "3"
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= \
        {"plots/accuracy.png", "plots/clients.png", "plots/partition.png"}

    with open(out / "trackers" / "csv" / "metrics.csv", newline="") as f:
        logged = {int(r["step"]): float(r["acc_mean"]) for r in csv.DictReader(f) if r.get("acc_mean")}
    assert logged == pytest.approx(expected)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_missing_tracker_extra_is_one_line_and_exit_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    for args, message in ((["--logger", "wandb"], "--logger wandb: wandb is not installed; install the extra: "
                                                   "pip install '.[wandb]'"),
                          (["--logger", "neptune"], "--logger: must be one of csv, tensorboard, mlflow, wandb")):
        res = CliRunner().invoke(app, ["train", "--recipe", "smoke", "--out", str(tmp_path / "run"), *args])
        assert res.exit_code == 2, res.stdout
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], res.stderr
        assert list(tmp_path.iterdir()) == []
