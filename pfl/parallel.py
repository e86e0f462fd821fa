"""Many runs at once: the runs of `pfl compare` and the trials of `pfl tune`, in this process one after
another (`jobs=1`) or as Ray tasks (`jobs>1`, or an existing cluster at `ray_address`).

Ray does the scheduling: each run is a task that declares its resources (`cpus_per_run`, a fractional
`gpus_per_run`); pfl keeps at most `jobs` of them in flight and sets each run's torch threads to its CPUs,
so a result depends on the seeds and the thread count, not on how many runs share the machine.

Every run goes through `execute_run`, wherever it runs: a finished run directory is reused (after checking
its recipe), an interrupted one (a staging directory whose process is gone, e.g. a killed worker) is
resumed from its newest checkpoint, anything else is trained. A run that fails for a reason of its own
(RunFailed, a user error, a worker that died) becomes a failed outcome; the other runs go on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pfl import config as config_mod
from pfl import rundir
from pfl.build import Hardware, check_hardware
from pfl.errors import PflUserError, RunDirError, RunFailed, RunStopped
from pfl.federation import CallbackList, Callbacks
from pfl.run import resume, train
from pfl.schema import Config

log = logging.getLogger("pfl")


@dataclass
class RunSpec:
    """One run of a plan. `label` names it in progress and tables; `extra_callbacks` (picklable, called in
    the process that runs it) adds callbacks such as a tuning trial's pruner; `extra_summary` goes into
    summary.json."""

    label: str
    cfg_flat: dict[str, Any]
    source: str
    run_dir: Path
    extra_callbacks: Callable[[], Callbacks] | None = None
    extra_summary: dict[str, Any] | None = None
    trackers: tuple[str, ...] = ()  # experiment trackers the run is sent to (pfl.trackers)

    @property
    def cfg(self) -> Config:
        return config_mod.resolve(self.cfg_flat)


@dataclass
class RunOutcome:
    """What became of one run: "trained", "reused", "resumed", "stopped" (on purpose) or "failed"."""

    label: str
    run_dir: Path
    status: str
    detail: str = ""
    resumed_from: int | None = None
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "reused", "resumed")


@dataclass
class Resources:
    """How many runs at once and what each one gets."""

    jobs: int = 1
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    ray_address: str | None = None

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_run))


def check_resources(jobs: int, cpus_per_run: float | None, gpus_per_run: float, ray_address: str | None,
                    hw: Hardware) -> Resources:
    """Validated resources (PflUserError naming the option otherwise), before anything runs or is written.
    Default CPUs per run: this machine's cores shared evenly by the jobs."""
    cores = os.cpu_count() or 1
    if jobs < 1:
        raise PflUserError(f"--jobs: must be an integer >= 1, got {jobs}")
    if cpus_per_run is None:
        cpus_per_run = float(max(1, cores // jobs))
    if not cpus_per_run >= 1 or cpus_per_run != int(cpus_per_run):
        raise PflUserError(f"--cpus-per-run: must be a whole number of CPUs >= 1 (torch's thread count), "
                           f"got {cpus_per_run:g}")
    if ray_address is None and cpus_per_run > cores:
        raise PflUserError(f"--cpus-per-run: this machine has {cores} CPUs, got {cpus_per_run:g}")
    if not 0 <= gpus_per_run <= 8:
        raise PflUserError(f"--gpus-per-run: must be between 0 and 8 (0.25: four runs share a GPU), "
                           f"got {gpus_per_run:g}")
    if gpus_per_run > 0 and hw.accelerator not in ("gpu", "cuda", "auto"):
        raise PflUserError("--gpus-per-run: runs that get a GPU share must train on it; add --accelerator gpu")
    if gpus_per_run == 0 and hw.accelerator in ("gpu", "cuda") and jobs > 1:
        raise PflUserError("--accelerator gpu with --jobs > 1: give each run its GPU share with --gpus-per-run "
                           "(e.g. 0.25: four runs per GPU)")
    if ray_address is None and gpus_per_run > 0 and not torch.cuda.is_available():
        raise PflUserError(f"--gpus-per-run: this machine has no CUDA GPU, so it must be 0, got {gpus_per_run:g}")
    if jobs > 1 or ray_address:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise PflUserError("--jobs/--ray-address: parallel runs use Ray; install the extra: "
                               "pip install '.[flower]'")
    return Resources(jobs, float(cpus_per_run), float(gpus_per_run), ray_address)


# ---------------------------------------------------------------- one run, wherever it runs

class _Events(Callbacks):
    """Turns a run's rounds into progress events for the front end: (label, kind, data)."""

    def __init__(self, label: str, emit: Callable[[dict[str, Any]], None]):
        self.label, self.emit = label, emit

    def on_run_start(self, run) -> None:
        self.emit({"label": self.label, "event": "start", "round": run.state.round, "rounds": run.cfg.rounds})

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.emit({"label": self.label, "event": "round", "round": record["round"],
                   "acc": record.get("acc_mean"), "val_acc": record.get("val_acc_mean")})


def _remove_staging(run_dir: Path) -> None:
    for staging in run_dir.parent.glob(f".{run_dir.name}.partial-*"):
        shutil.rmtree(staging, ignore_errors=True)


def execute_run(spec: RunSpec, hw: Hardware, threads: int | None, emit: Callable[[dict], None] | None = None
                ) -> RunOutcome:
    """Reuse, resume or train one run; never raises for a failure of the run itself."""
    if threads:
        torch.set_num_threads(threads)
    d, cfg = spec.run_dir, spec.cfg
    events = _Events(spec.label, emit) if emit else None
    callbacks = CallbackList(events, spec.extra_callbacks() if spec.extra_callbacks else None)
    try:
        if finished(d):
            check_same_config(d, cfg)
            return RunOutcome(spec.label, d, "reused", summary=_summary(d))
        found = rundir.resumable(d)
        if found is not None:
            staging, _round_idx = found
            check_same_config(staging, cfg)
            _, summary, resumed = resume(d, lambda _cfg, _start: callbacks, extra_summary=spec.extra_summary)
            return RunOutcome(spec.label, d, "resumed", f"from round {resumed or 0}", resumed or 0, summary)
        summary = train(cfg, d, hw, callbacks, spec.source, extra_summary=spec.extra_summary,
                        trackers=spec.trackers)
        return RunOutcome(spec.label, d, "trained", summary=summary)
    except RunStopped as exc:
        _remove_staging(d)
        return RunOutcome(spec.label, d, "stopped", str(exc))
    except (RunFailed, PflUserError) as exc:
        return RunOutcome(spec.label, d, "failed", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug or a broken environment in one run must not take the others down
        log.error("run %s failed:\n%s", spec.label, traceback.format_exc())
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return RunOutcome(spec.label, d, "failed", f"{type(exc).__name__}: {first_line}")


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "summary.json").is_file()


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """A finished or interrupted run may be reused only if it was made with exactly this resolved recipe
    (its data set may have moved: config.RELOCATABLE_KEYS)."""
    old = rundir.load_run_config(run_dir).as_flat()
    new = cfg.as_flat()
    key = config_mod.first_difference(old, new, ignore=config_mod.RELOCATABLE_KEYS)
    if key is not None:
        which = "finished" if finished(run_dir) else "interrupted"
        raise RunDirError(f"--out: the {which} run '{run_dir}' was made with {key}={old.get(key)!r}, this "
                          f"command asks for {key}={new.get(key)!r}; use a new --out directory")


def check_reusable(specs: list[RunSpec]) -> None:
    """Refuse, before any compute, run directories that hold runs made differently or foreign files."""
    for spec in specs:
        d = spec.run_dir
        if finished(d):
            check_same_config(d, spec.cfg)
        elif d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise RunDirError(f"--out: '{d}' exists but holds no finished run; remove it and run again")
        else:
            found = rundir.resumable(d)
            if found is not None:
                check_same_config(found[0], spec.cfg)
                pid = rundir.owner_alive(found[0])
                if pid is not None:
                    raise RunDirError(f"--out: the run '{d}' is being written by a running pfl (pid {pid}); "
                                      f"stop it first")


# ---------------------------------------------------------------- many runs

def run_all(specs: list[RunSpec], hw: Hardware, resources: Resources,
            on_event: Callable[[dict[str, Any]], None] | None = None,
            on_outcome: Callable[[RunOutcome], None] | None = None) -> list[RunOutcome]:
    """Execute every run (at most `resources.jobs` at once); outcomes in the order of `specs`."""
    check_hardware(hw)
    emit = on_event or (lambda event: None)
    if resources.jobs == 1 and not resources.ray_address:
        outcomes = []
        for spec in specs:
            outcome = execute_run(spec, hw, resources.threads, emit)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
        return outcomes
    return _run_on_ray(specs, hw, resources, emit, on_outcome)


def _ray_task(spec: RunSpec, hw: Hardware, threads: int, queue) -> RunOutcome:
    """The body of a Ray task: one run, its progress events sent back through a Ray queue."""
    from pfl.federation.client import quiet_lightning

    quiet_lightning()
    return execute_run(spec, hw, threads, lambda event: queue.put_nowait(event))


def _run_on_ray(specs, hw, resources: Resources, emit, on_outcome) -> list[RunOutcome]:
    import ray
    from ray.util.queue import Empty, Queue

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    started_here = not ray.is_initialized()
    if started_here:
        address = resources.ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=False)
    queue = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(_ray_task).options(num_cpus=resources.cpus_per_run, num_gpus=resources.gpus_per_run,
                                         max_retries=0)
    outcomes: dict[int, RunOutcome] = {}
    waiting = list(range(len(specs)))
    running: dict[Any, int] = {}

    def drain() -> None:
        while True:
            try:
                emit(queue.get_nowait())
            except Empty:
                return

    try:
        while waiting or running:
            while waiting and len(running) < resources.jobs:
                i = waiting.pop(0)
                running[task.remote(specs[i], hw, resources.threads, queue)] = i
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            drain()
            for ref in done:
                i = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker process died (killed, out of memory)
                    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    outcome = RunOutcome(specs[i].label, specs[i].run_dir, "failed",
                                         f"its worker died ({type(exc).__name__}: {why[:160]}); rerun the same "
                                         f"command to resume it from its newest checkpoint")
                outcomes[i] = outcome
                if on_outcome:
                    on_outcome(outcome)
        drain()
    except BaseException:  # Ctrl-C or SIGTERM: stop every worker this call started
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
        else:
            ray.kill(queue.actor)
    return [outcomes[i] for i in range(len(specs))]
