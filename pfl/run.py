"""A whole run: recipe -> set-up (pfl.build) -> rounds on an engine -> run directory (pfl.rundir,
pfl.report); `--resume` of an interrupted run; re-evaluation of a finished one.

Run directory layout (written to a hidden sibling and renamed into place only when complete):

    config.toml          the resolved recipe (every key, defaults included)
    run.json             where the recipe came from and the hardware
    metrics.csv          one row per round: losses, bytes/params up and down, FLOPs, accuracy summary, seconds
    per_client.csv       final personalised accuracy of every client, with its architecture and sizes
    summary.json         final and best (labelled) accuracy, cost totals and to-target costs, timings, versions
    accuracy.png         mean accuracy vs round, with the min-max band over clients
    state/               the server state and every client's private state (safetensors): what `pfl eval` reloads
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfl import checkpoint, rundir
from pfl import config as config_mod
from pfl.build import Hardware, Setup, build, check_engine, check_hardware, client_accelerator, keeps_resident
from pfl.errors import PflUserError, RunDirError
from pfl.federation import CallbackList, Callbacks, ClientRunner, DiskStore, FederatedRun, MemoryStore
from pfl.federation.engine import LocalWorkers
from pfl.pictures import write_partition_picture
from pfl.report import MetricsFlusher, write_report
from pfl.schema import Config
from pfl.trackers import Trackers, check_trackers

__all__ = ["FlowerTarget", "Hardware", "build", "check_engine", "check_hardware", "evaluate_run", "resume", "train"]


@dataclass(frozen=True)
class FlowerTarget:
    """Where a run on the `flower` engine finds its clients (the local engine ignores it): by default in a
    Ray simulation the run starts, with `client_mods` (Flower client mods: middleware around pfl's ClientApp,
    e.g. privacy or fault injection) around its ClientApps; given a deployed ServerApp's `grid`, on the
    SuperNodes connected to that grid, `expected_nodes` of them (0: the recipe's `flower.num_supernodes`, or
    one per client)."""

    grid: Any = None  # a flwr.serverapp.Grid (not imported here: flower is an optional extra)
    expected_nodes: int = 0
    client_mods: list | None = None


@dataclass
class _Job:
    """A run ready to start: its set-up, where it is written (`staging`, renamed to `out` when complete),
    its hardware and client runner (None where no client runs in this process), where its recipe came from."""

    setup: Setup
    out: Path
    staging: Path
    hw: Hardware
    runner: ClientRunner | None
    recipe_source: str


def train(cfg: Config, out: Path, hw: Hardware, callbacks: Callbacks | None = None, recipe_source: str = "",
          flower: FlowerTarget = FlowerTarget(), extra_summary: dict[str, Any] | None = None,
          trackers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the recipe and write the run directory `out`. Returns the summary.

    `cfg.engine` picks the engine: `local` runs every client in this process; `flower` runs them through
    Flower, where `flower` says (a simulation started here, or a deployment's SuperNodes).
    `extra_summary` is added to summary.json as it is. `trackers`: experiment trackers to send the run to
    (pfl.trackers)."""
    out = rundir.output_path(out)  # a symbolic link: the run goes to (and the link keeps pointing at) its target
    trackers = check_trackers(trackers)
    staging = rundir.prepare_output(out)
    check_engine(cfg, hw, simulated=flower.grid is None)
    if hw.resident == "on" and (cfg.engine != "local" or cfg.store == "disk"):
        raise PflUserError("--resident on: needs the local engine with store = \"memory\" (client states in "
                           f"this process), got engine {cfg.engine!r}, store {cfg.store!r}")
    runner = check_hardware(hw, cfg.grad_clip) if cfg.engine == "local" or flower.grid is None else None
    setup = build(cfg)  # data problems surface here, before anything is written
    rundir.start_staging(staging, cfg, hw, recipe_source)
    return _execute(_Job(setup, out, staging, hw, runner, recipe_source), callbacks, flower,
                    extra_summary=extra_summary, trackers=trackers)


def _execute(job: _Job, callbacks, flower: FlowerTarget = FlowerTarget(), resume_from: dict | None = None,
             extra_summary: dict[str, Any] | None = None, trackers: tuple[str, ...] = ()):
    """Rounds into `job.staging`, then the run directory renamed to `job.out`. On failure the staging
    directory is deleted, unless it holds a checkpoint (then `pfl train --resume` continues from it) or the
    run is complete (summary.json written: it is renamed to `out`, or beside it, and never deleted)."""
    setup, out, staging, hw, runner = job.setup, job.out, job.staging, job.hw, job.runner
    cfg = setup.cfg
    state_dir = staging / "state" / "clients"
    tracking = None
    all_callbacks = CallbackList(MetricsFlusher(staging), rundir.Checkpointer(staging), callbacks)

    def make_run(workers) -> FederatedRun:
        return FederatedRun(cfg, setup.clients, setup.algorithm, workers, all_callbacks)

    try:
        if trackers:
            tracking = Trackers(trackers, staging, cfg)
            all_callbacks.callbacks.append(tracking)
        write_partition_picture(staging / "partition.png", cfg, setup.clients, setup.architectures)
        started = time.perf_counter()
        if cfg.engine == "flower":
            # Clients keep their private state on their node's disk; on one machine that is the run directory.
            state_dir.mkdir(parents=True, exist_ok=True)  # exists when a simulation resumes
            if flower.grid is None:
                from pfl.flower.app import simulate

                run = simulate(make_run, setup, str(state_dir), client_accelerator(cfg),
                               hw.precision, flower.client_mods, resume_from=resume_from)
            else:
                from pfl.flower.app import FlowerWorkers

                run = make_run(FlowerWorkers(flower.grid, setup, str(state_dir), hw.accelerator,
                                             hw.precision, flower.expected_nodes))
                run.initialise()
                run.run()
        else:
            resident = keeps_resident(setup, hw, runner.device)
            clients = [c.to(runner.device) for c in setup.clients] if resident else setup.clients
            store = DiskStore(state_dir) if cfg.store == "disk" else MemoryStore(runner.device if resident else "cpu")
            run = make_run(LocalWorkers(cfg, clients, setup.architectures, setup.algorithm, store, runner))
            if resume_from is None:
                run.initialise()
            else:
                run.restore(resume_from)
            run.run()
        wall = time.perf_counter() - started
        summary = write_report(staging, setup, run, wall, hw, job.recipe_source,
                               resumed_from=resume_from["round"] if resume_from else None, extra=extra_summary)
        if tracking is not None:
            tracking.finish(staging)
        rundir.finish(staging, out)
    except BaseException:
        if tracking is not None:
            with contextlib.suppress(Exception):  # a tracker's own error must not hide why the run failed
                tracking.finish(staging, "failed")
        if (staging / "summary.json").is_file():  # written last: the run is complete, never delete it
            rundir.keep_finished(staging, out)
        else:
            rundir.discard_unless_resumable(staging)
        raise
    return summary


def resume(out: Path, make_callbacks: Callable[[Config, int], Callbacks] | None = None,
           extra_summary: dict[str, Any] | None = None) -> tuple[Config, dict[str, Any], int | None]:
    """Continue the interrupted run that was writing `out`, from its newest checkpoint (or from round 0
    when it had none yet). `make_callbacks(cfg, start_round)` may build the progress display. Returns the
    config, the summary and the round it resumed from."""
    out = rundir.output_path(out)
    if out.exists() and (out / "summary.json").is_file():
        raise RunDirError(f"--resume: '{out}' is a finished run; there is nothing to resume")
    found = rundir.resumable(out)
    if found is None:
        raise RunDirError(f"--resume: no interrupted run of '{out}' was found (looked for "
                          f"'{out.parent / ('.' + out.name + '.partial-*')}')")
    staging, _ = found
    pid = rundir.owner_alive(staging)
    if pid is not None:
        raise RunDirError(f"--resume: the run of '{out}' is still running (pid {pid}); stop it first")
    cfg, hw, recipe_source = rundir.read_staging(staging)
    has_checkpoint = (staging / checkpoint.POINTER).exists()
    if cfg.engine == "flower" and not has_checkpoint:
        raise RunDirError("--resume: this Flower run has no checkpoint to continue from (a simulation writes one "
                          "every checkpoint_every rounds; a deployment's client states live on its SuperNodes); "
                          "rerun it")
    if cfg.engine == "flower":
        check_engine(cfg, hw, simulated=True)
    runner = check_hardware(hw, cfg.grad_clip)
    setup = build(cfg)
    # a pointer that exists but cannot be read is an error to report, not a reason to start over
    state = checkpoint.load(staging, cfg.num_clients) if has_checkpoint else None
    staging = rundir.claim(staging, out)
    round_idx = state["round"] if state else None
    callbacks = make_callbacks(cfg, round_idx or 0) if make_callbacks else None
    summary = _execute(_Job(setup, out, staging, hw, runner, recipe_source), callbacks, resume_from=state,
                       extra_summary=extra_summary)
    return cfg, summary, round_idx


def evaluate_run(run_dir: Path, hw: Hardware, data_dir: str | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Reload a run's saved state and recompute every client's personalised test accuracy."""
    run_dir = Path(run_dir)
    cfg = rundir.load_run_config(run_dir)
    if data_dir:
        cfg = config_mod.resolve(cfg.as_flat(), {"data_dir": data_dir})
    runner = check_hardware(hw)
    setup = build(cfg)
    global_state = rundir.load_global_state(run_dir)
    store = MemoryStore()
    for k in range(cfg.num_clients):
        store.put(k, rundir.load_tensors(rundir.client_state_path(run_dir, k)))
    workers = LocalWorkers(cfg, setup.clients, setup.architectures, setup.algorithm, store, runner)
    run = FederatedRun(cfg, setup.clients, setup.algorithm, workers)
    run.state.global_state = global_state
    try:
        accs = run.evaluate_all("test")
    except RuntimeError as exc:  # e.g. a state file whose tensors do not fit the architecture
        raise RunDirError(f"run state in '{run_dir / 'state'}' does not match config.toml: "
                          f"{str(exc).splitlines()[0]}") from None
    rows = [{"client_id": c.client_id, "arch": a, "num_test": len(c.y_test), "accuracy": acc}
            for c, a, acc in zip(setup.clients, setup.architectures, accs)]
    return cfg, rows
