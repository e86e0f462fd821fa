"""`pfl`: the command line. Thin: parses options, calls the library, shows progress and tables; cli.ui.exits turns
errors into exit codes. Shared options: cli/options.py; the Flower deployment commands: cli/flower.py."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cli import flower, ui
from cli.options import (
    LOGGER_HELP,
    Accelerator,
    Devices,
    Loggers,
    ManyRuns,
    NewRunDir,
    Precision,
    Recipe,
    Seed,
    Sets,
    many_runs,
)
from cli.ui import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Model-heterogeneous personalized federated learning: pFedLoRA and baselines.")


def _engine_text(cfg) -> str:
    if cfg.engine == "local":
        return "local engine"
    return (f"Flower simulation ({cfg['flower.num_supernodes'] or cfg.num_clients} SuperNodes, "
            f"{cfg['flower.client_cpus']:g} CPU + {cfg['flower.client_gpus']:g} GPU per client)")


@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", "-r",
                                         help="bundled recipe name (see `pfl recipes`) or a .toml path"),
    set_: Sets = None,
    out: NewRunDir = None,
    seed: Seed = None,
    precision: str = typer.Option("32-true", "--precision", help="32-true, bf16-mixed, 16-mixed (GPU), ..."),
    accelerator: str = typer.Option("cpu", "--accelerator", help="cpu, gpu, cuda, mps, auto"),
    devices: str = typer.Option("1", "--devices", help="1, or one device index such as [1]"),
    engine: str | None = typer.Option(None, "--engine", help="local (in this process) or flower (Flower "
                                         "simulation with Ray); overrides the recipe's `engine`"),
    resume: Path | None = typer.Option(None, "--resume", help="continue the interrupted run that was "
                                          "writing this directory, from its newest checkpoint"),
    threads: int = typer.Option(0, "--threads", help="torch threads of this run (0: torch's default, all "
                                "cores); set it when several runs share a machine"),
    resident: str = typer.Option("auto", "--resident", help="keep client data and private states on the "
                                 "device for the whole run: auto (on a GPU when they fit), on, off"),
    logger: Loggers = None,
) -> None:
    """Run a recipe and write a run directory (config, metrics.csv, summary.json, plot, final state)."""
    ui.interrupt_on_sigterm()
    from pfl import config, rundir
    from pfl import run as run_mod
    from pfl.errors import PflUserError

    if resume is not None:
        if threads > 0:  # the rest of the hardware is the interrupted run's own
            import torch

            torch.set_num_threads(threads)
        _resume(resume, recipe, set_, out, seed, engine)
        return
    target = None
    with ui.exits(ui.RUN_FAILED, lambda: _interrupted(target)):
        if recipe is None:
            raise PflUserError("--recipe: required (a bundled recipe name or a .toml path), or --resume RUN_DIR")
        cfg, source = config.load(recipe, (set_ or []) + ([f"engine={engine}"] if engine else []), seed)
        target = out or Path("runs") / f"{cfg.name}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"
        rundir.prepare_output(target)
        hw = ui.hardware(accelerator, devices, precision, threads, resident)
        console.print(f"[bold]pfl train[/] {cfg.method} on {cfg.dataset}: N={cfg.num_clients}, "
                      f"C={cfg.participation}, T={cfg.rounds}, {cfg.partition} partition, {cfg.model_setting} "
                      f"models, seed {cfg.seed}, {_engine_text(cfg)} -> {target}")
        with ui.progress() as progress:
            summary = run_mod.train(cfg, target, hw, ui.ProgressCallbacks(progress, cfg.rounds), source,
                                    trackers=tuple(logger or ()))
    ui.print_run(Path(target).expanduser().absolute(), summary)


def _interrupted(target) -> str:
    """What an interrupted `pfl train` says: how to continue it, when a checkpoint was written."""
    from pfl import rundir

    found = rundir.resumable(target) if target is not None else None
    if found is not None and found[1] is not None:
        return f"interrupted after round {found[1]} was checkpointed; continue with: pfl train --resume {target}"
    return "interrupted: nothing was written"


def _resume(run_dir: Path, recipe, set_, out, seed, engine) -> None:
    from pfl import run as run_mod

    given = [name for name, value in (("--recipe", recipe), ("--set", set_), ("--out", out), ("--seed", seed),
                                      ("--engine", engine)) if value]
    if given:
        ui.fail(f"--resume: continues the run exactly as it was configured; drop {', '.join(given)}")
    with ui.exits(ui.RUN_FAILED, lambda: _interrupted(run_dir)), ui.progress() as progress:
        def make_callbacks(cfg, start_round):
            console.print(f"[bold]pfl train --resume[/] {cfg.method} on {cfg.dataset}: from round "
                          f"{start_round} of {cfg.rounds} -> {run_dir}")
            callbacks = ui.ProgressCallbacks(progress, cfg.rounds)
            progress.update(callbacks.rounds_task, completed=start_round)
            return callbacks

        _cfg, summary, _ = run_mod.resume(run_dir, make_callbacks)
    ui.print_run(Path(run_dir).expanduser().absolute(), summary)


for _command in flower.COMMANDS:  # here: `pfl --help` lists commands in the order they are registered
    app.command()(_command)


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="a run directory written by `pfl train`"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="where the data set is, if it moved"),
    precision: Precision = "32-true",
    accelerator: Accelerator = "cpu",
    devices: Devices = "1",
    as_json: bool = typer.Option(False, "--json", help="print per-client accuracies as JSON"),
) -> None:
    """Reload a run's saved state and recompute every client's personalised test accuracy."""
    from pfl.report import version_differences
    from pfl.run import evaluate_run
    from pfl.rundir import read_per_client

    with ui.exits():
        _cfg, rows = evaluate_run(run_dir, ui.hardware(accelerator, devices, precision), data_dir)
        differences = version_differences(run_dir)
        if differences:  # results may differ in the last bits; say why before anyone compares them
            ui.say(f"warning: this run was made with other versions: {'; '.join(differences)}")
        recorded = {r["client_id"]: r["accuracy"] for r in read_per_client(run_dir)} \
            if (run_dir / "per_client.csv").is_file() else {}
    if as_json:
        print(json.dumps([{**r, "accuracy": None if math.isnan(r["accuracy"]) else r["accuracy"]} for r in rows]))
        return
    table = Table(title=f"re-evaluated {run_dir}")
    for col in ("client", "arch", "test", "accuracy", "recorded at train"):
        table.add_column(col, justify="left" if col == "arch" else "right")
    accs = []
    for r in rows:
        rec = recorded.get(str(r["client_id"]), "")
        accs.append(r["accuracy"])
        table.add_row(str(r["client_id"]), r["arch"], str(r["num_test"]),
                      "-" if math.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.2f}%",
                      f"{100 * float(rec):.2f}%" if rec not in ("", "nan") else "-")
    console.print(table)
    valid = [a for a in accs if not math.isnan(a)]
    console.print(f"mean accuracy {100 * sum(valid) / max(len(valid), 1):.2f}% over {len(valid)} clients")


class _CompareDisplay:
    """pfl.compare.Display on the terminal: a progress display per batch of runs, each tune's table."""

    def message(self, text: str) -> None:
        console.print(f"[bold]pfl compare[/] {escape(text)}")

    @contextmanager
    def runs(self, title: str, total: int) -> Iterator[tuple]:
        with ui.progress() as progress:
            shown = ui.RunsProgress(progress, total, title)
            yield shown.on_event, shown.on_outcome

    def tuned(self, result) -> None:
        ui.print_tune(result)


@app.command()
@many_runs
def compare(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="recipe to run every method on"),
    methods: str | None = typer.Option(None, "--methods", "-m",
                                          help="comma-separated methods or groups: paper (default: pFedLoRA and "
                                          "the six baselines), later (FD, FedTGP, FedMRL, pFedES, FedSSA, pFedAFM, "
                                          "FedGen, FedL2G), all; an entry may fix the method's own settings, "
                                          "e.g. \"pfedlora, pfedlora(rank=4, mu=0.5)\" (an ablation; the first "
                                          "entry is the reference); with --from: which finished entries, in which "
                                          "order"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key for all runs: key=value"),
    seeds: int = typer.Option(1, "--seeds", help="number of seeds: the recipe's seed, seed+1, ..."),
    seed: int | None = typer.Option(None, "--seed", help="first seed (default: the recipe's)"),
    from_: list[Path] | None = typer.Option(None, "--from", help="build the comparison from existing run or "
                                               "comparison directories instead of running"),
    more: list[Path] | None = typer.Argument(None, help="more directories for --from", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="comparison directory; finished runs in it are "
                                       "reused, interrupted ones resumed"),
    tune_trials: int = typer.Option(0, "--tune-trials", help="tune every method first with this many trials "
                                    "(same budget, pruner and rounds for all) on validation data, then run the "
                                    "seeds with each method's best values; 0: every method at its defaults"),
    tune_rounds: int | None = typer.Option(None, "--tune-rounds", help="rounds per tuning trial (default: the "
                                              "recipe's rounds)"),
    runs: ManyRuns = ManyRuns(),
    logger: Loggers = None,
) -> None:
    """Run several methods on the same recipe, partitions and seeds; print and write a table and plots."""
    ui.interrupt_on_sigterm()
    from pfl import compare as cmp
    from pfl.errors import PflUserError

    with ui.exits("run failed: {}; finished runs are kept and will be reused",
                  "interrupted: every worker was stopped; finished runs are kept and will be reused, "
                  "checkpointed ones resumed, when the same command is run again"):
        if (recipe is None) == (not from_):
            raise PflUserError("give either --recipe (run the methods) or --from RUN_DIR ... (use finished runs)")
        if more and not from_:
            raise PflUserError(f"unexpected argument '{more[0]}': directories are read only with --from")
        done = cmp.compare(recipe, [*(from_ or []), *(more or [])], methods, set_ or [], seeds, seed, out,
                           tune_trials, tune_rounds, tuple(logger or ()),
                           lambda: ui.runs_hardware(runs), _CompareDisplay())
    table = Table(title="comparison", caption=escape(cmp.describe(done.records, done.order)))
    for col in cmp.table_columns(done.reference):
        table.add_column(escape(col), justify="left" if col in ("method", "tuned") else "right",
                         no_wrap=col == "method", overflow="fold")  # an entry's label stays whole
    for cells in cmp.table_rows([r for r in done.rows if r["seeds"]], done.reference):
        table.add_row(*map(escape, cells))  # an entry's value may hold brackets
    ui.wide_console(200).print(table)
    console.print(f"ratios in brackets: method / {escape(done.reference)}; * : the 95% interval of the paired "
                  f"difference excludes 0; written: " + ", ".join(str(p) for p in done.written), highlight=False,
                  soft_wrap=True)
    if done.failures:
        for method, seed_, why in done.failures:
            ui.say(f"failed: {method} seed {seed_}: {why}")
        ui.say(f"{len(done.failures)} run(s) failed and are not in the table; rerun the same command to retry them "
               f"(interrupted ones resume from their newest checkpoint)")
        raise typer.Exit(code=1)


@app.command()
@many_runs
def tune(
    recipe: Recipe,
    method: str = typer.Option(..., "--method", "-m", help="the method to tune"),
    space: list[str] | None = typer.Option(None, "--space", help="a tuned key: KEY=SPEC with SPEC LOW:HIGH, "
                                              "log:LOW:HIGH, int:LOW:HIGH, int:log:LOW:HIGH or V1,V2,...; "
                                              "default: the method's own search space"),
    trials: int = typer.Option(12, "--trials", "-t", help="trials in the study (a rerun continues it up to this)"),
    seeds: int = typer.Option(1, "--seeds", help="seeds per trial; the objective is their mean"),
    seed: int | None = typer.Option(None, "--seed", help="first seed, and the sampler's (default: the recipe's)"),
    rounds: int | None = typer.Option(None, "--rounds", help="rounds per trial (default: the recipe's)"),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="share of each client's training "
                                                 "data held out for validation (default: the recipe's, else 0.2)"),
    set_: Sets = None,
    out: Path | None = typer.Option(None, "--out", "-o", help="tune directory; the same command continues it"),
    runs: ManyRuns = ManyRuns(),
    logger: list[str] | None = typer.Option(None, "--logger", help=LOGGER_HELP + "; every trial run"),
) -> None:
    """Tune a method's hyperparameters on validation data (Optuna: TPE sampler, median pruner); the test
    split is never read. Writes best.toml (a complete recipe), trials.csv and two plots."""
    ui.interrupt_on_sigterm()
    from pfl import tune as tune_mod

    with ui.exits("tune failed: {}", "interrupted: every worker was stopped; the same command continues the study "
                  "(interrupted trials resume from their newest checkpoint)"):
        hw, resources = ui.runs_hardware(runs)
        plan = tune_mod.plan_tune(recipe, set_ or [], method, space, trials, seeds, seed, rounds, val_fraction,
                                  out or Path("runs") / f"tune-{Path(recipe).stem}-{method}", tuple(logger or ()))
        console.print(f"[bold]pfl tune[/] {method}: {trials} trials x {seeds} seed(s) x {plan.rounds} rounds, "
                      f"{resources.jobs} run(s) at once; space: "
                      + ", ".join(f"{k}={d.spec()}" for k, d in plan.space.items())
                      + f"; objective: {tune_mod.OBJECTIVE_TEXT} -> {plan.out}", highlight=False, soft_wrap=True)
        with ui.progress() as progress:
            shown = ui.RunsProgress(progress, trials * seeds, "trial runs")
            result = tune_mod.run_study(plan, hw, resources, shown.on_event, shown.on_outcome)
    ui.print_tune(result)
    console.print("written: " + ", ".join(str(p) for p in result.written), highlight=False, soft_wrap=True)


@app.command()
def recipes(
    keys: bool = typer.Option(False, "--keys", help="list every recipe key with its default"),
    resolve: str | None = typer.Option(None, "--resolve", help="print this recipe (name or path) fully "
                                          "resolved, every key with its value, as TOML"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="with --resolve: override a key"),
) -> None:
    """List the bundled recipes (or, with --keys, every recipe key; with --resolve, one recipe resolved)."""
    from pfl import config

    if resolve:
        import tomli_w

        with ui.exits():
            cfg, _ = config.load(resolve, set_ or [])
        print(tomli_w.dumps(cfg.as_nested()), end="")
        return
    if keys:
        table = Table(title="recipe keys")
        for col in ("key", "default", "allowed", "meaning"):
            table.add_column(col)
        for key, field in config.full_schema().items():
            table.add_row(key, repr(field.default), field.describe(), field.help)
        console.print(table)
        return
    table = Table(title="recipes")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, path in sorted(config.list_recipes().items()):
        raw, _ = config.read_recipe_file(str(path))
        table.add_row(name, raw.get("description", ""))
    console.print(table)


@app.command()
def models(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="size the models for this recipe's input, "
                                         "classes and representation_dim, and list its zoo (default: every image "
                                         "model, Fashion-MNIST-sized input)"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key"),
    all_: bool = typer.Option(False, "--all", help="with --recipe: every registered model that reads its data (images "
                              "or text), not only its zoo"),
) -> None:
    """List the model zoo: parameters and forward FLOPs per sample of each architecture for the recipe's input."""
    from pfl import config
    from pfl.models import MODEL_REGISTRY, ZOOS, describe_model, is_text_model

    with ui.exits():
        cfg, _ = config.load(recipe, set_ or []) if recipe else (config.resolve({"dataset": "fmnist"}, {}), "")
    readable = [n for n in MODEL_REGISTRY if is_text_model(n) == cfg.is_text]
    names = readable if all_ or not recipe else list(dict.fromkeys(cfg.model_zoo))
    shape, classes, d, vocab = cfg.image_shape, cfg.num_classes, cfg.representation_dim, _vocab_size(cfg)
    zoos = {n: [z for z, members in ZOOS.items() if n in members] for n in names}
    data = f"token ids {list(shape)} (vocabulary {vocab:,})" if vocab else f"input {list(shape)}"
    table = Table(title=f"models for {data}, {classes} classes, d={d}")
    for col, justify in (("model", "left"), ("params", "right"), ("phi", "right"), ("head", "right"),
                         ("MFLOPs", "right"), ("zoos", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "zoos")
    table.caption = "MFLOPs: forward pass of one sample (measured); zoos: the named zoos that include the model"
    ranks = _adapter_ranks(cfg) if recipe else {}
    if ranks:
        table.add_column("adapter rank", justify="right")
        table.caption += "; adapter rank: pFedLoRA's rank for the recipe's clients of that model"
    for name in names:
        info = describe_model(name, shape, classes, d, vocab)
        table.add_row(name, f"{info['params']:,}", f"{info['phi_params']:,}", f"{info['head_params']:,}",
                      f"{info['forward_flops'] / 1e6:,.1f}", ", ".join(zoos[name]),
                      *([str(ranks.get(name, "-"))] if ranks else []))
    console.print(table)


def _adapter_ranks(cfg) -> dict[str, int]:
    """Architecture -> adapter rank, for a method whose clients carry adapters of per-architecture ranks."""
    from pfl.algorithms import ALGORITHMS, TaskSpec

    spec = TaskSpec(cfg.image_shape, cfg.num_classes, cfg.representation_dim, None, _vocab_size(cfg))
    return dict(getattr(ALGORITHMS[cfg.method](cfg, spec), "arch_ranks", {}))


def _vocab_size(cfg) -> int:
    """The models' vocabulary: the recipe's `vocab_size` on a text data set, 0 (images) otherwise."""
    return cfg.vocab_size if cfg.is_text else 0


@app.command()
def partition(
    recipe: Recipe,
    set_: Sets = None,
    seed: Seed = None,
    out: Path | None = typer.Option(None, "--out", "-o", help="the picture to write (PNG; default "
                                    "<recipe>-partition.png here)"),
) -> None:
    """Show a recipe's partition without training: a table per client (architecture, samples, classes, label
    entropy) and the clients x classes heatmaps of training and test counts (the run directory's
    partition.png). Writes nothing but the picture."""
    import numpy as np

    from pfl import config
    from pfl.build import build
    from pfl.errors import PflUserError
    from pfl.pictures import partition_title, write_partition_picture

    with ui.exits():
        cfg, _ = config.load(recipe, set_ or [], seed)
        target = Path(out) if out is not None else Path(f"{cfg.name}-partition.png")
        if target.suffix.lower() != ".png":
            raise PflUserError(f"--out: must be a .png file, got {str(target)!r}")
        if target.is_dir() or not target.absolute().parent.is_dir():
            raise PflUserError(f"--out: {str(target)!r} is a directory or its directory does not exist")
        setup = build(cfg)
    counts = write_partition_picture(target, cfg, setup.clients, setup.architectures)  # written atomically
    entropy = counts.entropy()
    table = Table(title=partition_title(cfg))
    for col in ("client", "arch", "train", "test", "classes", "entropy (bits)"):
        table.add_column(col, justify="left" if col == "arch" else "right")
    shown = range(cfg.num_clients) if cfg.num_clients <= 50 else [*range(20), *range(cfg.num_clients - 5,
                                                                                     cfg.num_clients)]
    for k in shown:
        if cfg.num_clients > 50 and k == cfg.num_clients - 5:
            table.add_row("...", "", "", "", "", "")
        table.add_row(str(k), counts.architectures[k], str(int(counts.train[k].sum())),
                      str(int(counts.test[k].sum())), str(int((counts.train[k] > 0).sum())), f"{entropy[k]:.2f}")
    train_n = counts.train.sum(axis=1)
    table.add_section()
    table.add_row("total", f"{len(set(counts.architectures))} archs", f"{int(train_n.sum()):,}",
                  f"{int(counts.test.sum()):,}", f"{cfg.num_classes} in all", f"mean {entropy.mean():.2f}")
    table.caption = (f"training samples per client: min {int(train_n.min())}, median {int(np.median(train_n))}, "
                     f"max {int(train_n.max())}; entropy of a uniform client: {np.log2(cfg.num_classes):.2f} bits")
    console.print(table)
    console.print(f"partition picture -> {target}")


def main() -> None:  # pragma: no cover - entry for `python -m cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
