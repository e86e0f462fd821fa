"""`pfl`: the command line. Thin: parses, shows progress and tables, and turns user errors into exit 2."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

MAX_LOOPBACK_SUPERNODES = 64  # pfl deploy: SuperNodes on this one machine

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Model-heterogeneous personalized federated learning: pFedLoRA and baselines.")
console = Console()
err_console = Console(stderr=True)


def _interrupt_on_sigterm() -> None:
    """`kill` (SIGTERM, as sent by timeout and job schedulers) cleans up like Ctrl-C instead of leaving a
    half-written staging directory behind."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


LOGGER_HELP = ("also send runs to an experiment tracker: tensorboard, mlflow, csv or wandb (repeatable; extras "
               "'.\\[tensorboard]', '.\\[mlflow]', '.\\[wandb]')")  # "\\[" is not rich markup


def _fail(message: str) -> None:
    """One line on stderr naming the problem, exit code 2."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _run_failed(exc: Exception) -> None:
    """A run that could not go on (not the user's input): one line, exit code 1, nothing written."""
    err_console.print(f"run failed: {exc}; nothing was written", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _engine_text(cfg) -> str:
    if cfg.engine == "local":
        return "local engine"
    return (f"Flower simulation ({cfg['flower.num_supernodes'] or cfg.num_clients} SuperNodes, "
            f"{cfg['flower.client_cpus']:g} CPU + {cfg['flower.client_gpus']:g} GPU per client)")


def _parse_devices(text: str) -> Any:
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.startswith("[") and text.endswith("]"):
        try:
            return [int(p) for p in text[1:-1].split(",") if p.strip()]
        except ValueError:
            pass
    _fail(f"--devices: must be a count (1) or one device index in brackets ([0]), got {text!r}")


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


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("mean acc {task.fields[acc]}"), TimeElapsedColumn(), console=console,
                    transient=False)


@app.command()
def train(
    recipe: str | None = typer.Option(None, "--recipe", "-r",
                                         help="bundled recipe name (see `pfl recipes`) or a .toml path"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key: key=value"),
    out: Path | None = typer.Option(None, "--out", "-o", help="run directory to create (must not exist)"),
    seed: int | None = typer.Option(None, "--seed", help="overrides the recipe's seed"),
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
    logger: list[str] | None = typer.Option(None, "--logger", help=LOGGER_HELP),
) -> None:
    """Run a recipe and write a run directory (config, metrics.csv, summary.json, plot, final state)."""
    _interrupt_on_sigterm()
    from pfl import config, rundir
    from pfl import run as run_mod
    from pfl.errors import PflUserError, RunFailed

    if resume is not None:
        if threads > 0:  # the rest of the hardware is the interrupted run's own
            import torch

            torch.set_num_threads(threads)
        _resume(resume, recipe, set_, out, seed, engine)
        return
    target = None
    try:
        if recipe is None:
            raise PflUserError("--recipe: required (a bundled recipe name or a .toml path), or --resume RUN_DIR")
        cfg, source = config.load(recipe, (set_ or []) + ([f"engine={engine}"] if engine else []), seed)
        target = out or Path("runs") / f"{cfg.name}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"
        rundir.prepare_output(target)
        hw = run_mod.Hardware(accelerator, _parse_devices(devices), precision, threads, resident)
        console.print(f"[bold]pfl train[/] {cfg.method} on {cfg.dataset}: N={cfg.num_clients}, "
                      f"C={cfg.participation}, T={cfg.rounds}, {cfg.partition} partition, {cfg.model_setting} "
                      f"models, seed {cfg.seed}, {_engine_text(cfg)} -> {target}")
        with _progress() as progress:
            summary = run_mod.train(cfg, target, hw, ProgressCallbacks(progress, cfg.rounds), source,
                                    trackers=tuple(logger or ()))
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        _run_failed(exc)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns an interrupt inside fit into exit(1)
        _interrupted(target)
    _print_run(Path(target).expanduser().absolute(), summary)


def _interrupted(target) -> None:
    from pfl import rundir

    found = rundir.resumable(target) if target is not None else None
    if found is not None and found[1] is not None:
        err_console.print(f"interrupted after round {found[1]} was checkpointed; continue with: "
                          f"pfl train --resume {target}", markup=False, highlight=False, soft_wrap=True)
    else:
        err_console.print("interrupted: nothing was written")
    raise typer.Exit(code=130) from None


def _resume(run_dir: Path, recipe, set_, out, seed, engine) -> None:
    from pfl import run as run_mod
    from pfl.errors import PflUserError, RunFailed

    given = [name for name, value in (("--recipe", recipe), ("--set", set_), ("--out", out), ("--seed", seed),
                                      ("--engine", engine)) if value]
    if given:
        _fail(f"--resume: continues the run exactly as it was configured; drop {', '.join(given)}")
    try:
        with _progress() as progress:
            def make_callbacks(cfg, start_round):
                console.print(f"[bold]pfl train --resume[/] {cfg.method} on {cfg.dataset}: from round "
                              f"{start_round} of {cfg.rounds} -> {run_dir}")
                callbacks = ProgressCallbacks(progress, cfg.rounds)
                progress.update(callbacks.rounds_task, completed=start_round)
                return callbacks

            _cfg, summary, _ = run_mod.resume(run_dir, make_callbacks)
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        _run_failed(exc)
    except (KeyboardInterrupt, SystemExit):
        _interrupted(run_dir)
    _print_run(Path(run_dir).expanduser().absolute(), summary)


def _print_run(run_dir: Path, summary: dict[str, Any]) -> None:
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
    totals.add_row("best mean accuracy",
                   f"{100 * best['acc_mean']:.2f}% at round {best['round']} (not the final result)")
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


@app.command()
def deploy(
    recipe: str = typer.Option(..., "--recipe", "-r", help="bundled recipe name or a .toml path"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key: key=value"),
    supernodes: int = typer.Option(3, "--supernodes", "-n", help="SuperNodes to start; node p serves the "
                                   "clients k with k mod SUPERNODES = p"),
    out: Path | None = typer.Option(None, "--out", "-o", help="run directory to create (must not exist)"),
    seed: int | None = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    precision: str = typer.Option("32-true", "--precision", help="clients' Lightning precision"),
    accelerator: str = typer.Option("cpu", "--accelerator", help="clients' accelerator: cpu or gpu"),
    warm: bool = typer.Option(True, "--warm/--per-message", help="one long-running ClientApp process per "
                              "SuperNode (keeps torch, data and models loaded), or Flower's default: a fresh "
                              "ClientApp process per message"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP and any SuperNode accepted (a loopback "
                                  "demo only); default: TLS, registered SuperNode keys and a runtime secret"),
    certificates: Path | None = typer.Option(None, "--certificates", help="directory with your ca.crt, "
                                             "server.crt (valid for 127.0.0.1) and server.key, instead of a "
                                             "throwaway CA"),
) -> None:
    """Run a recipe on a real Flower deployment on this machine: a SuperLink, SUPERNODES SuperNodes and
    `flwr run` of pfl's Flower app, each its own process over loopback; all of them stopped at the end.
    Secure by default: TLS (a throwaway CA, or --certificates), SuperNode keys registered with the
    SuperLink, a runtime secret between each SuperNode and its ClientApp; the keys are removed at the end."""
    _interrupt_on_sigterm()
    from pfl import config, rundir
    from pfl import run as run_mod
    from pfl.errors import PflUserError, RunFailed

    try:
        cfg, _source = config.load(recipe, (set_ or []) + ["engine=flower"], seed)
        if not 1 <= supernodes <= MAX_LOOPBACK_SUPERNODES:
            raise PflUserError(f"--supernodes: must be 1..{MAX_LOOPBACK_SUPERNODES} (each SuperNode is two processes "
                               f"on this machine; more nodes: `pfl supernode` on other hosts), got {supernodes}")
        target = out or Path("runs") / f"{cfg.name}-{cfg.method}-deploy-{datetime.now():%Y%m%d-%H%M%S}"
        rundir.prepare_output(target)
        run_mod.check_engine(cfg, run_mod.Hardware(accelerator, 1, precision), simulated=False)
        if supernodes > cfg.num_clients:
            raise PflUserError(f"--supernodes: must be <= num_clients ({cfg.num_clients}), got {supernodes}")
        if insecure and certificates is not None:
            raise PflUserError("--certificates: not with --insecure (TLS is off), give one or the other")
        if certificates is not None:
            from pfl.flower.security import certificate_files

            certificate_files(certificates)
        run_mod.build(cfg)  # a missing data set or an unfit model is reported here, before any process starts
        from pfl.flower.deploy import deploy as deploy_run

        console.print(f"[bold]pfl deploy[/] {cfg.method} on {cfg.dataset}: N={cfg.num_clients}, T={cfg.rounds}, "
                      f"seed {cfg.seed}; a SuperLink and {supernodes} SuperNodes on 127.0.0.1 "
                      f"({'insecure: no TLS, any SuperNode' if insecure else 'TLS, registered SuperNode keys'})"
                      f" -> {target}")

        def show(line: str) -> None:
            if "pfl:" in line or "ERROR" in line or "dropped" in line:
                console.print(line, markup=False, highlight=False, soft_wrap=True)

        run_dir = deploy_run(cfg, Path(target), supernodes, accelerator, precision, on_line=show, warm=warm,
                             insecure=insecure, certificates=certificates)
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        _run_failed(exc)
    except (KeyboardInterrupt, SystemExit):
        err_console.print("interrupted: every Flower process was stopped; nothing was written")
        raise typer.Exit(code=130) from None
    _print_run(run_dir, json.loads((run_dir / "summary.json").read_text()))


def _flower_security(insecure: bool, root_certificates: Path | None, key: Path | None = None):
    """The Security of a SuperNode or a submitting machine: TLS against `root_certificates` (a CA file)."""
    from pfl.errors import PflUserError
    from pfl.flower.security import Security, check_node_key

    if insecure:
        if root_certificates is not None or key is not None:
            raise PflUserError("--insecure: not with --root-certificates or --key (TLS is off), give one or the other")
        return Security.insecure()
    if root_certificates is None:
        raise PflUserError("--root-certificates: required (the SuperLink's ca.crt from `pfl certificates`), or "
                           "--insecure for a loopback demo")
    if not root_certificates.expanduser().is_file():
        raise PflUserError(f"--root-certificates: {str(root_certificates)!r} is not a file")
    if key is not None:
        check_node_key(key)
    ca = root_certificates.expanduser().absolute()
    return Security(directory=ca.parent, ca=ca, node_auth=True)


@app.command()
def certificates(
    out: Path = typer.Option(..., "--out", "-o", help="directory to create (must not exist), mode 0700"),
    address: list[str] = typer.Option(..., "--address", "-a", help="an IP address or host name the SuperNodes "
                                      "dial to reach the SuperLink (repeatable); 127.0.0.1 and localhost are "
                                      "always included"),
    nodes: int = typer.Option(0, "--nodes", "-n", help="also make this many SuperNode key pairs, "
                              "node-<i>.key / node-<i>.pub"),
) -> None:
    """Make a deployment's keys: a CA (ca.crt, ca.key), the SuperLink's certificate for ADDRESS (server.crt,
    server.key) and NODES SuperNode key pairs (P-384, OpenSSH). Copy ca.crt and node-<i>.key to SuperNode i;
    ca.key and the .key files never leave the machine they are for."""
    from pfl.errors import PflUserError
    from pfl.flower.security import make_certificates, make_node_key

    try:
        if out.exists():
            raise PflUserError(f"--out: {str(out)!r} already exists")
        if nodes < 0:
            raise PflUserError(f"--nodes: must be >= 0, got {nodes}")
        if not all(a.strip() and " " not in a for a in address):
            raise PflUserError(f"--address: an IP address or host name without spaces, got {address}")
        out.mkdir(parents=True, mode=0o700)
        out.chmod(0o700)
        make_certificates(out, address)
        for i in range(nodes):
            make_node_key(out, f"node-{i}")
    except PflUserError as exc:
        _fail(str(exc))
    from pfl.flower.security import certificate_names

    console.print(f"wrote {out}: ca.crt, ca.key, server.crt, server.key (valid for "
                  f"{', '.join(certificate_names(out / 'server.crt'))})"
                  f"{f', node-0..{nodes - 1}.key/.pub' if nodes else ''}", markup=False)


@app.command()
def superlink(
    certificates_dir: Path | None = typer.Option(None, "--certificates", help="directory with ca.crt, server.crt "
                                                 "and server.key (`pfl certificates`)"),
    host: str = typer.Option(..., "--host", help="address to serve on (one the certificate names; the SuperNodes "
                             "dial it)"),
    port: int = typer.Option(9092, "--port", help="port of every SuperLink API (fleet, control, runtime)"),
    register: list[Path] | None = typer.Option(None, "--register", help="a SuperNode public key (node-<i>.pub) to "
                                               "register once the SuperLink is up (repeatable)"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP and any SuperNode accepted (a loopback "
                                  "demo only)"),
) -> None:
    """Run the SuperLink of a deployment on this machine, with TLS and SuperNode authentication (only
    registered node keys may join), until Ctrl-C or SIGTERM; prints what the other machines need."""
    from pfl.errors import PflUserError, RunFailed
    from pfl.flower import deploy as dep
    from pfl.flower.security import Security, certificate_files, certificate_names

    try:
        if not 0 < port < 65536:
            raise PflUserError(f"--port: must be 1..65535, got {port}")
        if insecure:
            if certificates_dir is not None or register:
                raise PflUserError("--insecure: not with --certificates or --register (no TLS, no node keys)")
            security = Security.insecure()
        else:
            if certificates_dir is None:
                raise PflUserError("--certificates: required (a directory made by `pfl certificates`), or --insecure")
            ca, cert, key = certificate_files(certificates_dir)
            names = certificate_names(cert)
            if host not in ("0.0.0.0", "::") and host not in names:
                raise PflUserError(f"--host: {host!r} is not among the names server.crt is valid for "
                                   f"({', '.join(names)})")
            security = Security(directory=ca.parent, ca=ca, server_cert=cert, server_key=key, node_auth=True)
        for public in register or []:
            if not public.is_file():
                raise PflUserError(f"--register: {str(public)!r} is not a file")
    except PflUserError as exc:
        _fail(str(exc))
    address = f"{host}:{port}"

    def ready() -> None:
        tls = "" if insecure else f" --root-certificates {security.ca.name}"
        err_console.print(
            f"pfl: SuperLink serving on {address} ({'INSECURE' if insecure else 'TLS, SuperNode authentication'}"
            f"); {len(register or [])} node keys registered.\n"
            f"  each SuperNode host i of K: pfl supernode --superlink {address}{tls}"
            f"{'' if insecure else ' --key node-<i>.key'} --partition-id i --num-partitions K --state-dir DIR\n"
            f"  more node keys: pfl register --superlink {address}{tls} node-<i>.pub\n"
            f"  submit a run: pfl submit --recipe R --superlink {address}{tls} --supernodes K --out DIR-ON-THIS-HOST",
            markup=False, highlight=False, soft_wrap=True)

    try:
        code = dep.run_superlink(host, port, security, [p.absolute() for p in register or []], on_ready=ready)
    except RunFailed as exc:
        err_console.print(f"superlink failed: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    raise typer.Exit(code=1 if code else 0)


@app.command()
def register(
    public_keys: list[Path] = typer.Argument(..., help="SuperNode public keys (node-<i>.pub)"),
    superlink_address: str = typer.Option(..., "--superlink", help="the SuperLink's HOST:PORT"),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help="the CA file (ca.crt) that "
                                                  "signed the SuperLink's certificate"),
) -> None:
    """Register SuperNode public keys with a running SuperLink (`flwr supernode register`), so that the
    SuperNodes holding the private keys may join."""
    from pfl.errors import PflUserError, RunFailed
    from pfl.flower import deploy as dep
    from pfl.flower.security import private_directory

    try:
        dep.split_address(superlink_address, "--superlink")
        security = _flower_security(False, root_certificates)
        for public in public_keys:
            if not public.is_file():
                raise PflUserError(f"PUBLIC_KEYS: {str(public)!r} is not a file")
    except PflUserError as exc:
        _fail(str(exc))
    home = private_directory("pfl-flwr-home-")
    try:
        env = dep.flower_env(dep.flwr_home(home, superlink_address, security))
        for public in public_keys:
            dep.register_node(public.absolute(), "pfl", env)
            console.print(f"registered {public}", markup=False)
    except RunFailed as exc:
        err_console.print(f"register failed: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


@app.command()
def supernode(
    superlink_address: str = typer.Option(..., "--superlink", help="the SuperLink's HOST:PORT"),
    partition_id: int = typer.Option(..., "--partition-id", help="this node's partition i: it serves the clients "
                                     "k with k mod NUM_PARTITIONS = i"),
    num_partitions: int = typer.Option(..., "--num-partitions", help="K, the number of SuperNodes"),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help="the CA file (ca.crt) that "
                                                  "signed the SuperLink's certificate"),
    key: Path | None = typer.Option(None, "--key", help="this node's private key (node-<i>.key), whose public key "
                                    "is registered with the SuperLink"),
    state_dir: Path = typer.Option(Path("pfl-node-state"), "--state-dir", help="where this node keeps its "
                                   "clients' states (and Flower's app files); it writes nowhere else"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="where this node keeps the data set (default: "
                                         "the recipe's data_dir)"),
    warm: bool = typer.Option(True, "--warm/--per-message", help="one long-running ClientApp process, or "
                              "Flower's default: a ClientApp process per message"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP, no node key (a loopback demo only)"),
) -> None:
    """Run a SuperNode of a deployment on this machine (with pfl's warm ClientApp process) until Ctrl-C or
    SIGTERM."""
    from pfl.errors import PflUserError
    from pfl.flower import deploy as dep

    try:
        dep.split_address(superlink_address, "--superlink")
        if num_partitions < 1:
            raise PflUserError(f"--num-partitions: must be >= 1, got {num_partitions}")
        if not 0 <= partition_id < num_partitions:
            raise PflUserError(f"--partition-id: must be 0..{num_partitions - 1} (--num-partitions "
                               f"{num_partitions}), got {partition_id}")
        if not insecure and key is None:
            raise PflUserError("--key: required (this node's node-<i>.key from `pfl certificates`), or --insecure")
        security = _flower_security(insecure, root_certificates, key)
        if state_dir.exists() and not state_dir.is_dir():
            raise PflUserError(f"--state-dir: {str(state_dir)!r} exists and is not a directory")
        if data_dir is not None and not data_dir.is_dir():
            raise PflUserError(f"--data-dir: {str(data_dir)!r} is not a directory")
        for text in (str(state_dir.absolute()), str(data_dir.absolute()) if data_dir else ""):
            if "'" in text or "\n" in text:
                raise PflUserError(f"--state-dir/--data-dir: {text!r} contains a quote or newline")
    except PflUserError as exc:
        _fail(str(exc))
    err_console.print(f"pfl: SuperNode {partition_id} of {num_partitions} -> {superlink_address} "
                      f"({'INSECURE' if insecure else 'TLS, node key ' + str(key)}), states in {state_dir}",
                      markup=False, highlight=False, soft_wrap=True)
    code = dep.run_supernode(superlink_address, partition_id, num_partitions, security,
                             key.expanduser().absolute() if key else None, state_dir.absolute(),
                             data_dir.absolute() if data_dir else None, warm=warm)
    raise typer.Exit(code=1 if code else 0)


@app.command()
def submit(
    recipe: str = typer.Option(..., "--recipe", "-r", help="bundled recipe name or a .toml path (on this machine)"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key: key=value"),
    seed: int | None = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    superlink_address: str = typer.Option(..., "--superlink", help="the SuperLink's HOST:PORT"),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help="the CA file (ca.crt) that "
                                                  "signed the SuperLink's certificate"),
    supernodes: int = typer.Option(..., "--supernodes", "-n", help="K, the SuperNodes the run waits for"),
    out: str = typer.Option(..., "--out", "-o", help="run directory to create ON THE SUPERLINK'S MACHINE"),
    precision: str = typer.Option("32-true", "--precision", help="clients' Lightning precision"),
    accelerator: str = typer.Option("cpu", "--accelerator", help="clients' accelerator: cpu or gpu"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP (a loopback demo only)"),
) -> None:
    """Submit a recipe to a running deployment (`flwr run` of pfl's app with the resolved recipe in the run
    config); streams the run's progress and exits 0 when it finished, 1 when it did not."""
    from pfl import config
    from pfl.errors import PflUserError, RunFailed
    from pfl.flower import deploy as dep

    try:
        cfg, _source = config.load(recipe, (set_ or []) + ["engine=flower"], seed)
        dep.split_address(superlink_address, "--superlink")
        if supernodes < 1 or supernodes > cfg.num_clients:
            raise PflUserError(f"--supernodes: must be 1..num_clients ({cfg.num_clients}), got {supernodes}")
        if not out.startswith("/") or "'" in out or "\n" in out:
            raise PflUserError(f"--out: an absolute path on the SuperLink's machine without quotes, got {out!r}")
        security = _flower_security(insecure, root_certificates)
        security.node_auth = not insecure  # `pfl superlink` requires registered node keys unless --insecure

        def show(line: str) -> None:
            if "pfl:" in line or "ERROR" in line or "dropped" in line:
                console.print(line, markup=False, highlight=False, soft_wrap=True)

        dep.submit(cfg, superlink_address, security, supernodes, out, accelerator, precision, on_line=show)
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        _run_failed(exc)
    except (KeyboardInterrupt, SystemExit):
        err_console.print("interrupted: `flwr run` was stopped (the run goes on on the SuperLink: `flwr stop`)")
        raise typer.Exit(code=130) from None


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="a run directory written by `pfl train`"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="where the data set is, if it moved"),
    precision: str = typer.Option("32-true", "--precision"),
    accelerator: str = typer.Option("cpu", "--accelerator"),
    devices: str = typer.Option("1", "--devices"),
    as_json: bool = typer.Option(False, "--json", help="print per-client accuracies as JSON"),
) -> None:
    """Reload a run's saved state and recompute every client's personalised test accuracy."""
    from pfl.errors import PflUserError
    from pfl.report import version_differences
    from pfl.run import Hardware, evaluate_run
    from pfl.rundir import read_per_client

    try:
        _cfg, rows = evaluate_run(run_dir, Hardware(accelerator, _parse_devices(devices), precision), data_dir)
        differences = version_differences(run_dir)
        if differences:  # results may differ in the last bits; say why before anyone compares them
            err_console.print(f"warning: this run was made with other versions: {'; '.join(differences)}",
                              markup=False, highlight=False, soft_wrap=True)
        recorded = {r["client_id"]: r["accuracy"] for r in read_per_client(run_dir)} \
            if (run_dir / "per_client.csv").is_file() else {}
    except PflUserError as exc:
        _fail(str(exc))
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
                self.tasks[label] = self.progress.add_task(label, total=event["rounds"], acc="-")
            self.progress.update(self.tasks[label], completed=event["round"])
            return
        acc, val = event.get("acc"), event.get("val_acc")
        shown = "-" if acc is None or math.isnan(acc) else f"{100 * acc:.2f}%"
        if val is not None and not math.isnan(val):
            shown = f"{shown} (val {100 * val:.2f}%)" if shown != "-" else f"val {100 * val:.2f}%"
        if label in self.tasks:
            self.progress.update(self.tasks[label], completed=event["round"], acc=shown)
        if not console.is_terminal:
            console.print(f"{label}: round {event['round']}: mean acc {shown}", highlight=False, soft_wrap=True)

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


def _resources(jobs: int, cpus_per_run: float | None, gpus_per_run: float, ray_address: str | None, hw):
    import os

    from pfl.parallel import check_resources

    return check_resources(jobs, cpus_per_run, gpus_per_run, ray_address or os.environ.get("RAY_ADDRESS"), hw)


JOBS_HELP = "runs at once (Ray tasks when > 1); results do not depend on it"
CPUS_HELP = "CPUs (= torch threads) per run; default: this machine's cores / --jobs"
GPUS_HELP = "share of a GPU per run, e.g. 0.25 for four runs per GPU (needs --accelerator gpu)"
RAY_HELP = "an existing Ray cluster to run on (default: $RAY_ADDRESS, else a local one started and stopped here)"


@app.command()
def compare(
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="recipe to run every method on"),
    methods: str | None = typer.Option(None, "--methods", "-m",
                                          help="comma-separated methods or groups: paper (default: pFedLoRA and "
                                          "the six baselines), later (FD, FedTGP, FedMRL, pFedES, FedSSA, pFedAFM), "
                                          "all"),
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
    jobs: int = typer.Option(1, "--jobs", "-j", help=JOBS_HELP),
    cpus_per_run: float | None = typer.Option(None, "--cpus-per-run", help=CPUS_HELP),
    gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help=GPUS_HELP),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_HELP),
    precision: str = typer.Option("32-true", "--precision"),
    accelerator: str = typer.Option("cpu", "--accelerator"),
    devices: str = typer.Option("1", "--devices"),
    logger: list[str] | None = typer.Option(None, "--logger", help=LOGGER_HELP),
) -> None:
    """Run several methods on the same recipe, partitions and seeds; print and write a table and plots."""
    _interrupt_on_sigterm()
    from pfl import compare as cmp
    from pfl.errors import PflUserError, RunFailed
    from pfl.run import Hardware

    failures: list = []
    try:
        if (recipe is None) == (not from_):
            raise PflUserError("give either --recipe (run the methods) or --from RUN_DIR ... (use finished runs)")
        if more and not from_:
            raise PflUserError(f"unexpected argument '{more[0]}': directories are read only with --from")
        from_ = list(from_ or []) + list(more or [])
        if seeds < 1:
            raise PflUserError(f"--seeds: must be an integer >= 1, got {seeds}")
        if tune_trials < 0:
            raise PflUserError(f"--tune-trials: must be an integer >= 0, got {tune_trials}")
        if tune_rounds is not None and (tune_rounds < 1 or not tune_trials):
            raise PflUserError(f"--tune-rounds: must be an integer >= 1 and goes with --tune-trials, got {tune_rounds}")
        if from_:
            if methods or set_ or seed is not None or seeds != 1 or tune_trials or logger:
                raise PflUserError("--from: --methods, --set, --seed, --seeds, --tune-trials and --logger apply only "
                                   "with --recipe")
            records = cmp.collect_runs(from_)
            if out is None:
                out = from_[0] if len(from_) == 1 and (from_[0] / "runs").is_dir() else \
                    Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
        else:
            from pfl.trackers import check_trackers

            trackers = check_trackers(tuple(logger or ()))
            names = cmp.method_names(methods)
            if not names:
                raise PflUserError("--methods: give at least one method, e.g. --methods pfedlora,standalone")
            hw = Hardware(accelerator, _parse_devices(devices), precision)
            resources = _resources(jobs, cpus_per_run, gpus_per_run, ray_address, hw)
            runs = cmp.plan(recipe, set_ or [], names, seeds, seed)
            base = runs[0][2]
            if base.engine == "flower" and (resources.jobs > 1 or resources.ray_address):
                raise PflUserError("--jobs: runs on the flower engine use Ray themselves; run them with --jobs 1 "
                                   "or use engine=local for parallel runs")
            out = out or Path("runs") / f"compare-{base.name}-{datetime.now():%Y%m%d-%H%M%S}"
            tuned = None
            if tune_trials:
                from pfl import tune as tune_mod

                studies = tune_mod.plan_comparison(recipe, set_ or [], names, seed, tune_trials, tune_rounds,
                                                   out.expanduser().absolute())
                console.print(f"[bold]pfl compare[/] tuning {', '.join(names)}: {tune_trials} trials each, "
                              f"{studies[0].rounds} rounds per trial, objective: {tune_mod.OBJECTIVE_TEXT}")
                tuned = {}
                for study in studies:
                    with _progress() as progress:
                        display = RunsProgress(progress, tune_trials, f"tuning {study.method}")
                        result = tune_mod.run_study(study, hw, resources, display.on_event, display.on_outcome)
                    _print_tune(result)
                    tuned[study.method] = {"values": result.best_values, "from": str(study.out)}
                runs = cmp.plan(recipe, set_ or [], names, seeds, seed, tuned_values=
                                {m: t["values"] for m, t in tuned.items()})
            cmp.check_reuse(out, runs)
            console.print(f"[bold]pfl compare[/] {', '.join(names)} on {base.dataset}: N={base.num_clients}, "
                          f"C={base.participation}, T={base.rounds}, {base.partition} partition, "
                          f"{len(runs) // len(names)} seed(s), {resources.jobs} at once "
                          f"({resources.threads} thread(s) each) -> {out}")
            with _progress() as progress:
                display = RunsProgress(progress, len(runs))
                records, failures = cmp.run_comparison(out, runs, hw, resources, display.on_event,
                                                       display.on_outcome, tuned, trackers)
            if not records:
                raise RunFailed("every run failed: " + "; ".join(f"{m} seed {s}: {why}" for m, s, why in failures))
        rows = cmp.summarise(records, failures)
        written = cmp.write_outputs(out.expanduser().absolute(), records, rows)
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        err_console.print(f"run failed: {exc}; finished runs are kept and will be reused", markup=False,
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except (KeyboardInterrupt, SystemExit):  # Lightning turns an interrupt inside fit into exit(1)
        err_console.print("interrupted: every worker was stopped; finished runs are kept and will be reused, "
                          "checkpointed ones resumed, when the same command is run again")
        raise typer.Exit(code=130) from None
    table = Table(title="comparison", caption=cmp.describe(records))
    for col in cmp.TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "tuned") else "right")
    for cells in cmp.table_rows([r for r in rows if r["seeds"]]):
        table.add_row(*cells)
    # logs and pipes get rich's 80 columns, which would wrap every cell: give the table room there
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(table)
    console.print(f"ratios in brackets: method / {cmp.REFERENCE}; * : the 95% interval of the paired difference "
                  f"excludes 0; written: " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)
    if failures:
        for method, seed_, why in failures:
            err_console.print(f"failed: {method} seed {seed_}: {why}", markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"{len(failures)} run(s) failed and are not in the table; rerun the same command to "
                          f"retry them (interrupted ones resume from their newest checkpoint)", markup=False,
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@app.command()
def tune(
    recipe: str = typer.Option(..., "--recipe", "-r", help="bundled recipe name or a .toml path"),
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
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key: key=value"),
    out: Path | None = typer.Option(None, "--out", "-o", help="tune directory; the same command continues it"),
    jobs: int = typer.Option(1, "--jobs", "-j", help=JOBS_HELP),
    cpus_per_run: float | None = typer.Option(None, "--cpus-per-run", help=CPUS_HELP),
    gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help=GPUS_HELP),
    ray_address: str | None = typer.Option(None, "--ray-address", help=RAY_HELP),
    precision: str = typer.Option("32-true", "--precision"),
    accelerator: str = typer.Option("cpu", "--accelerator"),
    devices: str = typer.Option("1", "--devices"),
    logger: list[str] | None = typer.Option(None, "--logger", help=LOGGER_HELP + "; every trial run"),
) -> None:
    """Tune a method's hyperparameters on validation data (Optuna: TPE sampler, median pruner); the test
    split is never read. Writes best.toml (a complete recipe), trials.csv and two plots."""
    _interrupt_on_sigterm()
    from pfl import tune as tune_mod
    from pfl.errors import PflUserError, RunFailed
    from pfl.run import Hardware

    try:
        hw = Hardware(accelerator, _parse_devices(devices), precision)
        resources = _resources(jobs, cpus_per_run, gpus_per_run, ray_address, hw)
        base_name = Path(recipe).stem
        target = out or Path("runs") / f"tune-{base_name}-{method}"
        import dataclasses

        from pfl.trackers import check_trackers

        plan = tune_mod.plan_tune(recipe, set_ or [], method, space, trials, seeds, seed, rounds, val_fraction,
                                  target)
        plan = dataclasses.replace(plan, trackers=check_trackers(tuple(logger or ())))
        console.print(f"[bold]pfl tune[/] {method}: {trials} trials x {seeds} seed(s) x {plan.rounds} rounds, "
                      f"{resources.jobs} run(s) at once; space: "
                      + ", ".join(f"{k}={d.spec()}" for k, d in plan.space.items())
                      + f"; objective: {tune_mod.OBJECTIVE_TEXT} -> {plan.out}", highlight=False, soft_wrap=True)
        with _progress() as progress:
            display = RunsProgress(progress, trials * seeds, "trial runs")
            result = tune_mod.run_study(plan, hw, resources, display.on_event, display.on_outcome)
    except PflUserError as exc:
        _fail(str(exc))
    except RunFailed as exc:
        err_console.print(f"tune failed: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except (KeyboardInterrupt, SystemExit):
        err_console.print("interrupted: every worker was stopped; the same command continues the study "
                          "(interrupted trials resume from their newest checkpoint)")
        raise typer.Exit(code=130) from None
    _print_tune(result)
    console.print("written: " + ", ".join(str(p) for p in result.written), highlight=False, soft_wrap=True)


def _print_tune(result) -> None:
    plan = result.plan
    table = Table(title=f"pfl tune {plan.method}: {len(result.rows)} trials, objective = validation accuracy")
    for col in ("trial", "state", "objective", *plan.space, "rounds run"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in result.rows:
        shown = "-" if math.isnan(r["objective"]) else f"{100 * r['objective']:.2f}%"
        if r["trial"] == result.best_trial:
            shown += " (best)"
        table.add_row(str(r["trial"]), r["state"], shown,
                      *[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in plan.space],
                      str(r["rounds_run"]))
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)
    console.print(f"best: trial {result.best_trial}, validation accuracy {100 * result.best_objective:.2f}%: "
                  + ", ".join(f"{k}={v}" for k, v in result.best_values.items()), highlight=False, soft_wrap=True)


@app.command()
def recipes(
    keys: bool = typer.Option(False, "--keys", help="list every recipe key with its default"),
    resolve: str | None = typer.Option(None, "--resolve", help="print this recipe (name or path) fully "
                                          "resolved, every key with its value, as TOML"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="with --resolve: override a key"),
) -> None:
    """List the bundled recipes (or, with --keys, every recipe key; with --resolve, one recipe resolved)."""
    from pfl import config
    from pfl.errors import PflUserError

    if resolve:
        import tomli_w

        try:
            cfg, _ = config.load(resolve, set_ or [])
        except PflUserError as exc:
            _fail(str(exc))
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
                                         "classes and representation_dim, and list its zoo (default: every model, "
                                         "Fashion-MNIST-sized input)"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key"),
    all_: bool = typer.Option(False, "--all", help="with --recipe: every registered model, not only its zoo"),
) -> None:
    """List the model zoo: parameters and forward FLOPs per sample of each architecture for the recipe's input."""
    from pfl import config
    from pfl.errors import PflUserError
    from pfl.models import MODEL_REGISTRY, ZOOS, describe_model

    try:
        cfg, _ = config.load(recipe, set_ or []) if recipe else (config.resolve({"dataset": "fmnist"}, {}), "")
    except PflUserError as exc:
        _fail(str(exc))
    names = list(MODEL_REGISTRY) if all_ or not recipe else list(dict.fromkeys(cfg.model_zoo))
    shape, classes, d = cfg.image_shape, cfg.num_classes, cfg.representation_dim
    zoos = {n: [z for z, members in ZOOS.items() if n in members] for n in names}
    table = Table(title=f"models for input {list(shape)}, {classes} classes, d={d}")
    for col, justify in (("model", "left"), ("params", "right"), ("phi", "right"), ("head", "right"),
                         ("MFLOPs", "right"), ("zoos", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "zoos")
    table.caption = "MFLOPs: forward pass of one sample (measured); zoos: the named zoos that include the model"
    for name in names:
        info = describe_model(name, shape, classes, d)
        table.add_row(name, f"{info['params']:,}", f"{info['phi_params']:,}", f"{info['head_params']:,}",
                      f"{info['forward_flops'] / 1e6:,.1f}", ", ".join(zoos[name]))
    console.print(table)


@app.command()
def partition(
    recipe: str = typer.Option(..., "--recipe", "-r", help="bundled recipe name or a .toml path"),
    set_: list[str] | None = typer.Option(None, "--set", "-s", help="override a recipe key: key=value"),
    seed: int | None = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    out: Path | None = typer.Option(None, "--out", "-o", help="the picture to write (PNG; default "
                                    "<recipe>-partition.png here)"),
) -> None:
    """Show a recipe's partition without training: a table per client (architecture, samples, classes, label
    entropy) and the clients x classes heatmaps of training and test counts (the run directory's
    partition.png). Writes nothing but the picture."""
    import os

    import numpy as np

    from pfl import config
    from pfl.build import build
    from pfl.errors import PflUserError
    from pfl.pictures import write_partition_picture

    try:
        cfg, _ = config.load(recipe, set_ or [], seed)
        target = Path(out) if out is not None else Path(f"{cfg.name}-partition.png")
        if target.suffix.lower() != ".png":
            raise PflUserError(f"--out: must be a .png file, got {str(target)!r}")
        if target.is_dir() or not target.absolute().parent.is_dir():
            raise PflUserError(f"--out: {str(target)!r} is a directory or its directory does not exist")
        setup = build(cfg)
    except PflUserError as exc:
        _fail(str(exc))
    tmp = target.with_name(f".{target.name}.tmp.png")  # renamed into place: never a half-written picture
    counts = write_partition_picture(tmp, cfg, setup.clients, setup.architectures)
    entropy = counts.entropy()
    table = Table(title=f"{cfg.name}: {cfg.partition} partition of {cfg.dataset}, N={cfg.num_clients}, "
                        f"seed {cfg.seed}")
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
    os.replace(tmp, target)
    console.print(f"partition picture -> {target}")


def main() -> None:  # pragma: no cover - entry for `python -m cli.main`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
