"""Options that several `pfl` commands take, declared once: `recipe: Recipe` in a command's signature is
`--recipe/-r` with its help. Defaults stay in the signatures (Typer reads them there)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

LOGGER_HELP = ("also send runs to an experiment tracker: tensorboard, mlflow, csv or wandb (repeatable; extras "
               "'.\\[tensorboard]', '.\\[mlflow]', '.\\[wandb]')")  # "\\[" is not rich markup

Recipe = Annotated[str, typer.Option("--recipe", "-r", help="bundled recipe name or a .toml path")]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a recipe key: key=value")]
Seed = Annotated[int | None, typer.Option("--seed", help="overrides the recipe's seed")]
NewRunDir = Annotated[Path | None, typer.Option("--out", "-o", help="run directory to create (must not exist)")]
Loggers = Annotated[list[str] | None, typer.Option("--logger", help=LOGGER_HELP)]

# where a run computes: pfl eval, compare, tune (train documents its own)
Precision = Annotated[str, typer.Option("--precision")]
Accelerator = Annotated[str, typer.Option("--accelerator")]
Devices = Annotated[str, typer.Option("--devices")]

# many runs at once (pfl compare, pfl tune): pfl.parallel.check_resources
Jobs = Annotated[int, typer.Option("--jobs", "-j", help="runs at once (Ray tasks when > 1); results do not depend "
                                   "on it")]
CpusPerRun = Annotated[float | None, typer.Option("--cpus-per-run", help="CPUs (= torch threads) per run; default: "
                                                  "this machine's cores / --jobs")]
GpusPerRun = Annotated[float, typer.Option("--gpus-per-run", help="share of a GPU per run, e.g. 0.25 for four runs "
                                           "per GPU (needs --accelerator gpu)")]
RayAddress = Annotated[str | None, typer.Option("--ray-address", help="an existing Ray cluster to run on (default: "
                                                "$RAY_ADDRESS, else a local one started and stopped here)")]

# a Flower deployment's clients and the machines that join it (cli/flower.py)
ClientPrecision = Annotated[str, typer.Option("--precision", help="clients' Lightning precision")]
ClientAccelerator = Annotated[str, typer.Option("--accelerator", help="clients' accelerator: cpu or gpu")]
SuperLink = Annotated[str, typer.Option("--superlink", help="the SuperLink's HOST:PORT")]
RootCertificates = Annotated[Path | None, typer.Option("--root-certificates", help="the CA file (ca.crt) that "
                                                       "signed the SuperLink's certificate")]


@dataclass(frozen=True)
class ManyRuns:
    """Where and how many runs go at once (pfl compare, pfl tune): pfl.parallel.check_resources."""

    jobs: Jobs = 1
    cpus_per_run: CpusPerRun = None
    gpus_per_run: GpusPerRun = 0.0
    ray_address: RayAddress = None
    precision: Precision = "32-true"
    accelerator: Accelerator = "cpu"
    devices: Devices = "1"


def many_runs(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the `ManyRuns` options (declared once, above), placed before its `--logger`, and hand them
    to it as one `runs: ManyRuns` argument. Typer reads the options from the signature this sets."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "runs"]
    hints = inspect.get_annotations(ManyRuns, eval_str=True)
    added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
             for f in dataclasses.fields(ManyRuns)]
    at = next((i for i, p in enumerate(own) if p.name == "logger"), len(own))
    names = [f.name for f in dataclasses.fields(ManyRuns)]

    @functools.wraps(command)
    def with_runs(**kwargs: Any) -> Any:
        runs = ManyRuns(**{name: kwargs.pop(name) for name in names})
        return command(**kwargs, runs=runs)

    with_runs.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[:at]] + added
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]])
    return with_runs
