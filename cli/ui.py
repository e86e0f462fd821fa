"""What every `pfl` command shares: the consoles, the one mapping of errors to exit codes, progress displays
and the tables of a run and a tune."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from cli.options import ManyRuns

console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One line on stderr, printed as it is (no markup, no wrapping)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """One line on stderr naming the problem, exit code 2."""
    say(f"error: {message}")
    raise typer.Exit(code=2)


@contextmanager
def exits(failed: str | None = None, interrupted: str | Callable[[], str] | None = None) -> Iterator[None]:
    """The one place errors become exit codes: a PflUserError is the user's to fix (`error: ...`, 2); a RunFailed
    prints `failed` with `{}` its reason (1); Ctrl-C or SIGTERM prints `interrupted` (130). A RunFailed or an
    interrupt propagates where the command names no message for it."""
    from pfl.errors import PflUserError, RunFailed

    try:
        yield
    except PflUserError as exc:
        fail(str(exc))
    except RunFailed as exc:
        if failed is None:
            raise
        say(failed.format(exc))
        raise typer.Exit(code=1) from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns an interrupt inside fit into exit(1)
        if interrupted is None:
            raise
        say(interrupted() if callable(interrupted) else interrupted)
        raise typer.Exit(code=130) from None


RUN_FAILED = "run failed: {}; nothing was written"  # a run that could not go on (not the user's input)


def interrupt_on_sigterm() -> None:
    """`kill` (SIGTERM, as sent by timeout and job schedulers) cleans up like Ctrl-C instead of leaving a
    half-written staging directory behind."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def parse_devices(text: str) -> Any:
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.startswith("[") and text.endswith("]"):
        try:
            return [int(p) for p in text[1:-1].split(",") if p.strip()]
        except ValueError:
            pass
    fail(f"--devices: must be a count (1) or one device index in brackets ([0]), got {text!r}")


def hardware(accelerator: str, devices: str, precision: str, *more: Any):
    from pfl.run import Hardware

    return Hardware(accelerator, parse_devices(devices), precision, *more)


def runs_hardware(runs: ManyRuns):
    """(Hardware, Resources) of many runs at once (pfl compare, pfl tune), checked."""
    import os

    from pfl.parallel import check_resources

    hw = hardware(runs.accelerator, runs.devices, runs.precision)
    return hw, check_resources(runs.jobs, runs.cpus_per_run, runs.gpus_per_run,
                               runs.ray_address or os.environ.get("RAY_ADDRESS"), hw)


def progress() -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("mean acc {task.fields[acc]}"), TimeElapsedColumn(), console=console,
                    transient=False)


def wide_console(width: int) -> Console:
    """Logs and pipes get rich's 80 columns, which would wrap every cell of a wide table: give it room there."""
    return console if console.is_terminal else Console(width=max(console.width, width))


class ProgressCallbacks:
    """One rich progress display for the whole run: rounds, clients in the current round, latest accuracy."""

    def __init__(self, progress: Progress, rounds: int, label: str = "rounds", overall: Any = None):
        self.progress = progress
        self.label = label
        self.overall = overall  # a task counting the rounds of several runs (pfl compare)
        self.rounds = rounds
        self.rounds_task = progress.add_task(label, total=rounds, acc="-")
        self.clients_task = progress.add_task("clients", total=1, acc="")
        self.latest = "-"

    def on_run_start(self, run) -> None: ...

    def on_round_start(self, round_idx: int, sampled: list[int]) -> None:
        self.progress.reset(self.clients_task, total=len(sampled), description=f"round {round_idx} clients")

    def on_client_done(self, round_idx: int, client_id: int, done: int, total: int) -> None:
        self.progress.update(self.clients_task, completed=done)

    def on_evaluate_start(self, round_idx: int) -> None:
        self.progress.update(self.clients_task, description=f"round {round_idx} evaluating")

    def on_round_end(self, record: dict[str, Any]) -> None:
        if not math.isnan(record["acc_mean"]):
            self.latest = f"{100 * record['acc_mean']:.2f}%"
        self.progress.update(self.rounds_task, advance=1, acc=self.latest)
        if self.overall is not None:
            self.progress.update(self.overall, advance=1)
        if record["round"] == self.rounds:
            self.progress.remove_task(self.clients_task)
        if not console.is_terminal:  # logs and CI: no live display, so one plain line per round
            prefix = "" if self.label == "rounds" else f"{self.label}: "
            console.print(f"{prefix}round {record['round']}/{self.rounds}: "
                          f"mean acc {self.latest}, "
                          f"train loss {record['train_loss']:.4f}, {record['train_seconds']:.2f} s training, "
                          f"{record['eval_seconds']:.2f} s evaluating", highlight=False, soft_wrap=True)


class RunsProgress:
    """The progress display of many runs (compare, tune): runs done overall, and one line per active run
    (its label, round, latest accuracy). In logs (no terminal): one plain line per round and per run."""

    def __init__(self, progress: Progress, total: int, title: str = "runs done"):
        self.progress = progress
        self.overall = progress.add_task(title, total=total, acc="")
        self.tasks: dict[str, Any] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        label = event["label"]
        if event["event"] == "start":
            if label not in self.tasks:
                self.tasks[label] = self.progress.add_task(escape(label), total=event["rounds"], acc="-")
            self.progress.update(self.tasks[label], completed=event["round"])
            return
        acc, val = event.get("acc"), event.get("val_acc")
        shown = "-" if acc is None or math.isnan(acc) else f"{100 * acc:.2f}%"
        if val is not None and not math.isnan(val):
            shown = f"{shown} (val {100 * val:.2f}%)" if shown != "-" else f"val {100 * val:.2f}%"
        if label in self.tasks:
            self.progress.update(self.tasks[label], completed=event["round"], acc=shown)
        if not console.is_terminal:
            console.print(f"{escape(label)}: round {event['round']}: mean acc {shown}", highlight=False, soft_wrap=True)

    def on_outcome(self, outcome) -> None:
        task = self.tasks.pop(outcome.label, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.update(self.overall, advance=1)
        if outcome.status != "trained":
            words = {"reused": "reusing finished run", "resumed": f"resumed {outcome.detail}",
                     "stopped": outcome.detail, "failed": f"FAILED: {outcome.detail}"}[outcome.status]
            self.progress.console.print(f"{outcome.label}: {words} ({outcome.run_dir})", markup=False,
                                        highlight=False, soft_wrap=True)


def print_run(run_dir, summary: dict[str, Any]) -> None:
    from pfl.report import describe_best
    from pfl.rundir import read_per_client

    table = Table(title=f"personalised accuracy per client (round {summary['final']['round']})")
    for col in ("client", "arch", "train", "test", "accuracy"):
        table.add_column(col, justify="right" if col != "arch" else "left")
    for row in read_per_client(run_dir):
        acc = float(row["accuracy"]) if row["accuracy"] not in ("", "nan") else math.nan
        table.add_row(row["client_id"], row["arch"], row["num_train"], row["num_test"],
                      "-" if math.isnan(acc) else f"{100 * acc:.2f}%")
    console.print(table)
    final, best = summary["final"], summary["best"]
    totals = Table(title="run summary", show_header=False)
    totals.add_column("", style="bold")
    totals.add_column("")
    totals.add_row("final mean accuracy",
                   f"{100 * final['acc_mean']:.2f}% (weighted {100 * final['acc_weighted']:.2f}%, "
                   f"std {100 * final['acc_std']:.2f}, min {100 * final['acc_min']:.2f}%)")
    totals.add_row("best mean accuracy", describe_best(final, best))
    totals.add_row("evaluation", summary["evaluation"])
    rounds = max(summary["rounds"], 1)
    totals.add_row("bytes per round", f"up {summary['bytes_up_total'] / rounds:,.0f}, "
                   f"down {summary['bytes_down_total'] / rounds:,.0f}")
    totals.add_row("FLOPs per round", f"clients {summary['flops_client_total'] / rounds:.4g}, "
                   f"server {summary['flops_server_total'] / rounds:.4g} (FlopCounterMode)")
    if summary["target_accuracy"] > 0:
        reached = summary["to_target"]
        totals.add_row(f"to {100 * summary['target_accuracy']:g}% mean accuracy",
                       "not reached" if reached is None else
                       f"round {reached['round']}, {reached['bytes']:,} bytes, {reached['flops']:.4g} FLOPs")
    totals.add_row("time", f"{summary['wall_seconds']:.1f} s in all, {summary['train_seconds_per_round']:.2f} s "
                   f"training per round")
    totals.add_row("run directory", str(run_dir))
    console.print(totals)


def print_tune(result) -> None:
    plan = result.plan
    table = Table(title=f"pfl tune {escape(plan.label)}: {len(result.rows)} trials, objective = validation accuracy")
    for col in ("trial", "state", "objective", *plan.space, "rounds run"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in result.rows:
        shown = "-" if math.isnan(r["objective"]) else f"{100 * r['objective']:.2f}%"
        if r["trial"] == result.best_trial:
            shown += " (best)"
        table.add_row(str(r["trial"]), r["state"], shown,
                      *[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in plan.space],
                      str(r["rounds_run"]))
    wide_console(160).print(table)
    console.print(f"best: trial {result.best_trial}, validation accuracy {100 * result.best_objective:.2f}%: "
                  + ", ".join(f"{k}={v}" for k, v in result.best_values.items()), highlight=False, soft_wrap=True)

