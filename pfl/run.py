"""A whole run: recipe -> data -> partition -> method -> rounds -> run directory; and re-evaluation of one.

Run directory layout (written to a hidden sibling and renamed into place only when complete, so a failed
or interrupted run leaves nothing half-written under the requested name):

    config.toml          the resolved recipe (every key, defaults included)
    metrics.csv          one row per round: losses, bytes/params up and down, FLOPs, accuracy summary, seconds
    per_client.csv       final personalised accuracy of every client, with its architecture and sizes
    summary.json         final and best (labelled) accuracy, cost totals and to-target costs, timings, versions
    accuracy.png         mean accuracy vs round, with the min-max band over clients
    state/global.safetensors, state/clients/client_NNNNN.safetensors   what `pfl eval` reloads
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import pfl
from pfl import checkpoint
from pfl import config as config_mod
from pfl.algorithms import ALGORITHMS, Algorithm, TaskSpec
from pfl.config import Config
from pfl.data import BatchTransform, build_clients, load_dataset
from pfl.data.partition import ClientData
from pfl.errors import PflUserError, RunDirError
from pfl.federation import Callbacks, CallbackList, ClientRunner, DiskStore, FederatedRun, MemoryStore, make_trainer
from pfl.federation.costs import first_reaching
from pfl.models import assign_architectures


@dataclass
class Hardware:
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"


@dataclass
class Setup:
    cfg: Config
    clients: list[ClientData]
    architectures: list[str]
    algorithm: Algorithm


def check_hardware(hw: Hardware, grad_clip: float = 0.0):
    """The run's Trainer, or a PflUserError before any data or output when the hardware cannot be had."""
    count = hw.devices if isinstance(hw.devices, int) else None
    if count is not None and count > 1:
        raise PflUserError(f"--devices: the local engine trains one client at a time on one device; use 1 "
                           f"(or one device index such as [1]), got {hw.devices}")
    if isinstance(hw.devices, list) and len(hw.devices) != 1:
        raise PflUserError(f"--devices: the local engine uses exactly one device, got {hw.devices}")
    return make_trainer(hw.accelerator, hw.devices, hw.precision, grad_clip)


def build(cfg: Config) -> Setup:
    """Data, partition, architectures and the method object for a validated recipe."""
    dataset = load_dataset(cfg)
    clients = build_clients(dataset, cfg)
    architectures = assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
    spec = TaskSpec(dataset.image_shape, dataset.num_classes, cfg.representation_dim,
                    BatchTransform(dataset.mean, dataset.std, augment=cfg.augment))
    _check_models_fit(architectures, spec)
    return Setup(cfg, clients, architectures, ALGORITHMS[cfg.method](cfg, spec))


def _check_models_fit(architectures: list[str], spec: TaskSpec) -> None:
    from pfl.models import build_model

    for arch in sorted(set(architectures)):
        try:
            build_model(arch, spec.image_shape, spec.num_classes, spec.representation_dim)
        except ValueError as exc:
            raise PflUserError(f"recipe key 'model_zoo': {exc}") from None


def prepare_output(out: Path) -> Path:
    """Check that `out` can be created and is not an existing non-empty directory; return the staging dir."""
    out = out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out: '{out}' already exists and is not empty; choose a new directory")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:  # os.access lies for root and for special file systems: really try
        if not ancestor.is_dir():
            raise OSError("not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".pfl-probe-", dir=ancestor))
    except OSError:
        raise RunDirError(f"--out: cannot create '{out}': '{ancestor}' is not a writable directory") from None
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def check_engine(cfg: Config, hw: Hardware, simulated: bool) -> None:
    """Problems with the flower engine that are the user's to fix, before any data or output."""
    if cfg.engine != "flower":
        return
    import importlib.util

    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise PflUserError("--engine flower: Flower is not installed; install the extra: pip install '.[flower]' "
                           "(flwr[simulation])")
    if hw.devices not in (1, "1", "auto") and not (isinstance(hw.devices, list) and len(hw.devices) == 1):
        raise PflUserError(f"--devices: the flower engine places clients on GPUs itself; share GPUs with "
                           f"--set flower.client_gpus=0.25 (four clients per GPU), got --devices {hw.devices}")
    if simulated and cfg["flower.client_gpus"] > 0 and not torch.cuda.is_available():
        raise PflUserError(f"recipe key 'flower.client_gpus': this machine has no CUDA GPU, so it must be 0, "
                           f"got {cfg['flower.client_gpus']}")
    if simulated and cfg["flower.client_gpus"] > 0 and hw.accelerator not in ("gpu", "cuda", "auto"):
        raise PflUserError("--accelerator: flower.client_gpus > 0 reserves GPUs for clients; use --accelerator gpu")
    if simulated and cfg["flower.client_gpus"] == 0 and hw.accelerator in ("gpu", "cuda"):
        raise PflUserError("--accelerator: in a Flower simulation clients get GPUs through Ray; also set "
                           "flower.client_gpus, the share of a GPU per client (e.g. 0.25), got 0")


def train(cfg: Config, out: Path, hw: Hardware, callbacks: Callbacks | None = None,
          recipe_source: str = "", grid=None, expected_nodes: int = 0, client_mods: list | None = None
          ) -> dict[str, Any]:
    """Run the recipe and write the run directory `out`. Returns the summary.

    `cfg.engine` picks the engine: `local` runs every client in this process; `flower` runs them through
    Flower, in a simulation (Ray) started here, or, when `grid` is given (a deployed ServerApp), on the
    SuperNodes connected to that grid (`expected_nodes` of them). `client_mods`: Flower client mods
    (middleware around pfl's ClientApp, e.g. privacy or fault injection) for a simulation."""
    out = out.expanduser().absolute()
    staging = prepare_output(out)
    check_engine(cfg, hw, simulated=grid is None)
    trainer = check_hardware(hw, cfg.grad_clip) if cfg.engine == "local" or grid is None else None
    setup = build(cfg)  # data problems surface here, before anything is written
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)  # metrics.csv there is updated every round; renamed to `out` at the end
    try:
        # what `--resume` needs to rebuild this run: the resolved recipe and the hardware
        (staging / "config.toml").write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
        (staging / RUN_FILE).write_text(json.dumps({"recipe_source": recipe_source, "accelerator": hw.accelerator,
                                                    "devices": hw.devices, "precision": hw.precision}),
                                        encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _execute(setup, out, staging, hw, trainer, callbacks, recipe_source, grid, expected_nodes, client_mods)


def _execute(setup: Setup, out: Path, staging: Path, hw: Hardware, trainer, callbacks, recipe_source: str,
             grid=None, expected_nodes: int = 0, client_mods=None, resume_from: dict | None = None):
    """Rounds into `staging`, then the run directory renamed to `out`. On failure the staging directory
    is deleted, unless it holds a checkpoint (then `pfl train --resume` continues from it)."""
    cfg = setup.cfg
    state_dir = staging / "state" / "clients"
    try:
        if cfg.engine == "flower":
            # Clients keep their private state on their node's disk; on one machine that is the run directory.
            state_dir.mkdir(parents=True)
            run = FederatedRun(cfg, setup.clients, setup.architectures, setup.algorithm)
        else:
            store = DiskStore(state_dir) if cfg.store == "disk" else MemoryStore()
            run = FederatedRun(cfg, setup.clients, setup.architectures, setup.algorithm, store, ClientRunner(trainer))
        run.callbacks = CallbackList(_MetricsFlusher(staging, run), _Checkpointer(staging, run), callbacks)
        started = time.perf_counter()
        if cfg.engine == "flower" and grid is None:
            from pfl.flower.app import simulate

            state = simulate(run, str(state_dir), _client_accelerator(cfg), hw.precision, client_mods)
        else:
            if cfg.engine == "flower":
                from pfl.flower.app import FlowerWorkers

                run.workers = FlowerWorkers(grid, cfg, setup.clients, str(state_dir), hw.accelerator, hw.precision,
                                            expected_nodes)
            if resume_from is None:
                run.initialise()
            else:
                run.restore(resume_from["round"], resume_from["global_state"], resume_from["clients"],
                            resume_from["history"], resume_from["last_accuracies"])
            state = run.run()
        wall = time.perf_counter() - started
        summary = _write_run(staging, setup, run, state, wall, hw, recipe_source,
                             resumed_from=resume_from["round"] if resume_from else None)
        for leftover in [*staging.glob("checkpoint-*"), *staging.glob(".checkpoint-*"), staging / checkpoint.POINTER]:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # checked empty above
        staging.rename(out)
    except BaseException:
        if checkpoint.latest_round(staging) is None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


RUN_FILE = "run.json"


def resumable(out: Path) -> tuple[Path, int | None] | None:
    """The staging directory of an unfinished run of `out` that `--resume` can continue, and the round of
    its newest checkpoint (None: none yet, it restarts from round 0); None when there is none."""
    out = Path(out).expanduser().absolute()
    candidates = []
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        if (staging / "config.toml").is_file() and (staging / RUN_FILE).is_file():
            candidates.append((checkpoint.latest_round(staging) or -1, staging.stat().st_mtime, staging))
    if not candidates:
        return None
    best = max(candidates)
    return best[2], (best[0] if best[0] >= 0 else None)


def _owner_alive(staging: Path) -> int | None:
    """The pid in a staging directory's name, if that process is still a running pfl."""
    try:
        pid = int(staging.name.rsplit("-", 1)[1])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, IndexError, OSError):
        return None
    return pid if (b"pfl" in cmdline or b"cli.main" in cmdline) and pid != os.getpid() else None


def resume(out: Path, make_callbacks=None) -> tuple[Config, dict[str, Any], int | None]:
    """Continue the interrupted run that was writing `out`, from its newest checkpoint (or from round 0
    when it had none yet). `make_callbacks(cfg, start_round)` may build the progress display. Returns the
    config, the summary and the round it resumed from."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (out / "summary.json").is_file():
        raise RunDirError(f"--resume: '{out}' is a finished run; there is nothing to resume")
    found = resumable(out)
    if found is None:
        raise RunDirError(f"--resume: no interrupted run of '{out}' was found (looked for "
                          f"'{out.parent / ('.' + out.name + '.partial-*')}')")
    staging, round_idx = found
    pid = _owner_alive(staging)
    if pid is not None:
        raise RunDirError(f"--resume: the run of '{out}' is still running (pid {pid}); stop it first")
    try:
        cfg = config_mod.from_toml((staging / "config.toml").read_text(encoding="utf-8"))
        saved = json.loads((staging / RUN_FILE).read_text(encoding="utf-8"))
        hw = Hardware(str(saved["accelerator"]), saved["devices"], str(saved["precision"]))
        recipe_source = str(saved.get("recipe_source", ""))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise RunDirError(f"--resume: '{staging}' has an unreadable config.toml or {RUN_FILE} "
                          f"({type(exc).__name__}: {exc})") from None
    if cfg.engine == "flower":
        raise RunDirError("--resume: runs on the flower engine cannot be resumed yet (their client states live "
                          "on the SuperNodes); rerun them")
    trainer = check_hardware(hw, cfg.grad_clip)
    setup = build(cfg)
    # a pointer that exists but cannot be read is an error to report, not a reason to start over
    state = checkpoint.load(staging, cfg.num_clients) if (staging / checkpoint.POINTER).exists() else None
    mine = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging != mine:  # the staging dir names the pid writing it, so a second --resume sees this one alive
        staging.rename(mine)
        staging = mine
    round_idx = state["round"] if state else None
    callbacks = make_callbacks(cfg, round_idx or 0) if make_callbacks else None
    summary = _execute(setup, out, staging, hw, trainer, callbacks, recipe_source, resume_from=state)
    return cfg, summary, round_idx


class _Checkpointer(Callbacks):
    """Every `checkpoint_every` rounds (before the last): the complete run state, atomically (pfl.checkpoint)."""

    def __init__(self, root: Path, run: FederatedRun):
        self.root, self.run = root, run

    def on_round_end(self, record: dict[str, Any]) -> None:
        every, t = self.run.cfg.checkpoint_every, record["round"]
        if self.run.worker is None or every == 0 or t % every or t == self.run.cfg.rounds:
            return
        state = self.run.state
        checkpoint.save(self.root, t, state.global_state,
                        ((k, self.run.store.get(k)) for k in range(len(self.run.clients))),
                        state.history, state.last_accuracies)


def _client_accelerator(cfg: Config) -> str:
    """Simulated clients train on a GPU exactly when Ray gives them a share of one."""
    return "gpu" if cfg["flower.client_gpus"] > 0 else "cpu"


class _MetricsFlusher(Callbacks):
    """Rewrites metrics.csv in the staging directory after every round, so a long run can be followed."""

    def __init__(self, root: Path, run: FederatedRun):
        self.root, self.run = root, run

    def on_round_end(self, record: dict[str, Any]) -> None:
        write_metrics_csv(self.root / "metrics.csv", self.run.state.history)


def _git_commit() -> str:
    """The commit pfl runs from (with '+dirty' for uncommitted changes), or 'unknown' outside a checkout."""
    import subprocess

    root = Path(pfl.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def _versions() -> dict[str, str]:
    import lightning

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "pfl": pfl.__version__, "git_commit": _git_commit()}


def version_differences(run_dir: Path) -> list[str]:
    """What differs between the versions a run was made with (summary.json) and the running ones."""
    try:
        recorded = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["summary.json has no readable 'versions'"]
    now = _versions()
    return [f"{name} {recorded.get(name, '?')} -> {now[name]}" for name in now
            if str(recorded.get(name, "?")) != str(now[name])]


def _write_run(root: Path, setup: Setup, run: FederatedRun, state, wall: float, hw: Hardware,
               recipe_source: str, resumed_from: int | None = None) -> dict[str, Any]:
    cfg = setup.cfg
    (root / "config.toml").write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
    write_metrics_csv(root / "metrics.csv", state.history)
    per_client = [{"client_id": c.client_id, "arch": a, "num_train": c.num_train, "num_test": len(c.y_test),
                   "accuracy": acc} for c, a, acc in zip(setup.clients, setup.architectures, state.last_accuracies)]
    with open(root / "per_client.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_client[0]))
        writer.writeheader()
        writer.writerows(per_client)
    (root / "state" / "clients").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.global_state.items()} or {"_empty": torch.zeros(0)},
              str(root / "state" / "global.safetensors"))
    if run.worker is not None and cfg.store == "memory":
        for k in range(len(setup.clients)):
            save_file(run.store.get(k), str(root / "state" / "clients" / f"client_{k:05d}.safetensors"))
    evaluated = [r for r in state.history if not math.isnan(r["acc_mean"])]
    best = max(evaluated, key=lambda r: r["acc_mean"])
    final = evaluated[-1]
    summary = {
        "method": cfg.method, "dataset": cfg.dataset, "recipe": cfg.name, "recipe_source": recipe_source,
        "seed": cfg.seed, "rounds": state.round, "num_clients": cfg.num_clients,
        "evaluation": setup.algorithm.evaluation_label(),
        "final": {k: final[k] for k in ("round", "acc_mean", "acc_weighted", "acc_std", "acc_min", "acc_max")},
        "best": {"round": best["round"], "acc_mean": best["acc_mean"],
                 "note": "best mean accuracy over evaluated rounds; not the final result"},
        "bytes_up_total": sum(r["bytes_up"] for r in state.history),
        "bytes_down_total": sum(r["bytes_down"] for r in state.history),
        "params_up_total": sum(r["params_up"] for r in state.history),
        "params_down_total": sum(r["params_down"] for r in state.history),
        "flops_client_total": sum(r["flops_client"] for r in state.history),
        "flops_server_total": sum(r["flops_server"] for r in state.history),
        "target_accuracy": cfg.target_accuracy,
        "to_target": first_reaching(state.history, cfg.target_accuracy),
        "wall_seconds": round(wall, 3),
        "resumed_from_round": resumed_from,
        "train_seconds_per_round": round(sum(r["train_seconds"] for r in state.history) / len(state.history), 4),
        "hardware": {"accelerator": hw.accelerator, "devices": str(hw.devices), "precision": hw.precision},
        "engine": _engine_summary(cfg),
        "clients_dropped_total": sum(r["clients_dropped"] for r in state.history),
        "versions": _versions(),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_accuracy(state.history, root / "accuracy.png", title=f"{cfg.method} on {cfg.dataset} "
                  f"(N={cfg.num_clients}, C={cfg.participation}, seed {cfg.seed})")
    return summary


def _engine_summary(cfg: Config) -> dict[str, Any]:
    if cfg.engine != "flower":
        return {"name": "local"}
    return {"name": "flower", "supernodes": cfg["flower.num_supernodes"] or cfg.num_clients,
            "client_cpus": cfg["flower.client_cpus"], "client_gpus": cfg["flower.client_gpus"],
            "round_timeout": cfg["flower.round_timeout"], "min_clients": cfg.min_clients}


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def plot_accuracy(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in history if not math.isnan(r["acc_mean"])]
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.fill_between(rounds, [100 * r["acc_min"] for r in rows], [100 * r["acc_max"] for r in rows],
                    alpha=0.2, label="min-max over clients")
    ax.plot(rounds, [100 * r["acc_mean"] for r in rows], marker="o", ms=3, label="mean (unweighted)")
    ax.plot(rounds, [100 * r["acc_weighted"] for r in rows], ls="--", label="mean (sample-weighted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("personalised test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- re-evaluation

def load_run_config(run_dir: Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"RUN_DIR: '{run_dir}' is not a directory")
    path = run_dir / "config.toml"
    if not path.is_file():
        raise RunDirError(f"RUN_DIR: '{run_dir}' has no config.toml; is it a pfl run directory?")
    raw, _ = config_mod.read_recipe_file(str(path))
    return config_mod.resolve(raw)


def read_per_client(run_dir: Path) -> list[dict[str, str]]:
    with open(Path(run_dir) / "per_client.csv", newline="") as f:
        return list(csv.DictReader(f))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunDirError(f"run state file '{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"run state file '{path}' is corrupted or not a safetensors file: {exc}") from None


def evaluate_run(run_dir: Path, hw: Hardware, data_dir: str | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Reload a run's saved state and recompute every client's personalised test accuracy."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_dir:
        cfg = config_mod.resolve(cfg.as_flat(), {"data_dir": data_dir})
    trainer = check_hardware(hw)
    setup = build(cfg)
    global_state = _load_tensors(run_dir / "state" / "global.safetensors")
    global_state.pop("_empty", None)
    store = MemoryStore()
    for k in range(cfg.num_clients):
        store.put(k, _load_tensors(run_dir / "state" / "clients" / f"client_{k:05d}.safetensors"))
    run = FederatedRun(cfg, setup.clients, setup.architectures, setup.algorithm, store, ClientRunner(trainer))
    run.state.global_state = global_state
    try:
        accs = run.evaluate_all()
    except RuntimeError as exc:  # e.g. a state file whose tensors do not fit the architecture
        raise RunDirError(f"run state in '{run_dir / 'state'}' does not match config.toml: "
                          f"{str(exc).splitlines()[0]}") from None
    rows = [{"client_id": c.client_id, "arch": a, "num_test": len(c.y_test), "accuracy": acc}
            for c, a, acc in zip(setup.clients, setup.architectures, accs)]
    return cfg, rows
