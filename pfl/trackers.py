"""Experiment trackers: a run's resolved recipe, its per-round metrics and its plots, sent through
Lightning's logger classes (`--logger tensorboard|mlflow|csv|wandb`, repeatable).

- csv: Lightning's CSVLogger under `<run>/trackers/csv/` (no extra needed).
- tensorboard: events under `<run>/trackers/tensorboard/` (extra `.[tensorboard]`); the plots as images.
- mlflow: a run in the experiment named after the recipe, in `$MLFLOW_TRACKING_URI` or else the local file
  store `./mlruns` (extra `.[mlflow]`); the plots as artifacts.
- wandb: a run in project `pfl`, offline unless `WANDB_API_KEY` or `WANDB_MODE` is set (extra `.[wandb]`);
  the plots as images.

The recipe goes in as hyper-parameters (flat dotted keys; a list or table value as one string), every numeric
column of a round's metrics.csv row that has a value as a metric at step = round.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from pfl.errors import PflUserError
from pfl.federation import Callbacks

TRACKERS = ("csv", "tensorboard", "mlflow", "wandb")
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
PLOTS = ("accuracy.png", "clients.png", "partition.png")


def check_trackers(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The tracker names, checked: known, not repeated, their library installed; PflUserError otherwise."""
    for name in names:
        if name not in TRACKERS:
            raise PflUserError(f"--logger: must be one of {', '.join(TRACKERS)}, got {name!r}")
        if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
            raise PflUserError(f"--logger {name}: {NEEDS[name][0]} is not installed; install the extra: "
                               f"pip install '.[{NEEDS[name][1]}]'")
    if len(set(names)) != len(names):
        raise PflUserError(f"--logger: each tracker once, got {', '.join(names)}")
    return tuple(names)


def mlflow_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, or the local file store ./mlruns (MLflow 3 keeps it in maintenance mode and asks
    for an explicit opt-in, given here only for that default)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path("mlruns").absolute().as_uri()


def _make(name: str, run_dir: Path, cfg):
    from lightning.pytorch import loggers

    label = f"{cfg.method}-seed{cfg.seed}"
    if name == "csv":
        return loggers.CSVLogger(save_dir=run_dir / "trackers", name="csv", version="")
    if name == "tensorboard":
        return loggers.TensorBoardLogger(save_dir=run_dir / "trackers", name="tensorboard", version="",
                                         default_hp_metric=False)
    if name == "mlflow":
        return loggers.MLFlowLogger(experiment_name=cfg.name, run_name=label, tracking_uri=mlflow_tracking_uri(),
                                    tags={"method": cfg.method, "seed": str(cfg.seed), "run_dir": str(run_dir)})
    offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
    return loggers.WandbLogger(project="pfl", name=f"{cfg.name}-{label}", save_dir=str(run_dir / "trackers"),
                               offline=offline)


def _param(value: Any) -> Any:
    """One recipe value as one hyper-parameter: a list as 'a, b', a table as '{a = 1, b = 2}' (the loggers would
    split a dict into one key per entry and drop an empty one)."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
    return value


class Trackers(Callbacks):
    """Sends one run to its trackers: hyper-parameters when it starts, metrics every round, plots when it
    ends (`finish`). The run directory is the staging directory while the run is written."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, cfg):
        self.names, self.cfg = names, cfg
        self.loggers = {name: _make(name, Path(run_dir), cfg) for name in names}

    def on_run_start(self, run) -> None:
        params = {k: _param(v) for k, v in self.cfg.as_flat().items()}
        for logger in self.loggers.values():
            logger.log_hyperparams(params)

    def on_round_end(self, record: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in record.items()
                   if k != "round" and isinstance(v, (int, float)) and not math.isnan(float(v))}
        for logger in self.loggers.values():
            logger.log_metrics(metrics, step=record["round"])

    def finish(self, run_dir: Path, status: str = "success") -> None:
        """Attach the run directory's plots and close every tracker."""
        plots = [Path(run_dir) / p for p in PLOTS if (Path(run_dir) / p).is_file()] if status == "success" else []
        for name, logger in self.loggers.items():
            if name == "tensorboard" and plots:
                import matplotlib.image

                for path in plots:
                    logger.experiment.add_image(f"plots/{path.stem}", matplotlib.image.imread(path)[..., :3],
                                                dataformats="HWC")
            elif name == "mlflow":
                for path in plots:
                    logger.experiment.log_artifact(logger.run_id, str(path), "plots")
            elif name == "wandb" and plots:
                import wandb

                logger.experiment.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
            logger.save()
            logger.finalize(status)
