"""The run directory on disk: staging, checkpoints, state files, resume.

A run is written to a hidden sibling `.NAME.partial-PID` of its directory and renamed into place only when
complete, so a failed or interrupted run leaves nothing half-written under the requested name. While it
runs, the staging directory holds config.toml and run.json (what `--resume` rebuilds the run from),
metrics.csv (rewritten every round) and the newest checkpoint (pfl.checkpoint). The PID in its name is the
process writing it, so a second writer can tell that it is still alive.

    state/global.safetensors              the server state
    state/clients/<client_file(k)>        every client's private state (pfl.federation.store.client_file)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pfl import checkpoint
from pfl import config as config_mod
from pfl.build import Hardware
from pfl.errors import RunDirError
from pfl.federation import Callbacks
from pfl.federation.store import client_file
from pfl.schema import Config, Tensors

RUN_FILE = "run.json"


def staging_dir(out: Path, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.partial-{pid or os.getpid()}"


def output_path(out: Path) -> Path:
    """`out` made absolute with every symbolic link resolved: a run given a link (`--out scratch`, a link to
    an empty directory elsewhere) is staged beside, and renamed onto, the link's target, so the link then
    points to the finished run (renaming onto the link itself would replace the link)."""
    given = Path(out).expanduser().absolute()
    try:
        resolved = given.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise RunDirError(f"--out: cannot resolve the symbolic link '{given}': {exc}") from None
    if resolved.is_symlink():  # Python >= 3.13 returns a looping link instead of raising
        raise RunDirError(f"--out: cannot resolve the symbolic link '{given}': it loops")
    return resolved


def prepare_output(out: Path) -> Path:
    """Check that `out` can be created and is not an existing non-empty directory; return the staging dir."""
    given = Path(out).expanduser().absolute()
    out = output_path(given)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        target = f" (the target of the link '{given}')" if out != given else ""
        raise RunDirError(f"--out: '{out}'{target} already exists and is not empty; choose a new directory")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:  # os.access lies for root and for special file systems: really try
        if not ancestor.is_dir():
            raise OSError("not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".pfl-probe-", dir=ancestor))
    except OSError:
        raise RunDirError(f"--out: cannot create '{out}': '{ancestor}' is not a writable directory") from None
    return staging_dir(out)


def start_staging(staging: Path, cfg: Config, hw: Hardware, recipe_source: str) -> None:
    """A fresh staging directory holding what `--resume` needs to rebuild the run: the resolved recipe
    and the hardware."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        (staging / "config.toml").write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
        (staging / RUN_FILE).write_text(json.dumps({"recipe_source": recipe_source, "accelerator": hw.accelerator,
                                                    "devices": hw.devices, "precision": hw.precision}),
                                        encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_checkpoint(path: Path) -> bool:
    return path.name.startswith(("checkpoint-", ".checkpoint-")) or path.name == checkpoint.POINTER


def sync_tree(root: Path) -> None:
    """fsync every file and directory of a finished run (its checkpoints, already synced and about to be
    dropped, excepted), so that a power loss after the rename cannot leave a named but empty file."""
    for directory, dirs, files in os.walk(root):
        if Path(directory) == root:
            dirs[:] = [d for d in dirs if not _is_checkpoint(Path(d))]
            files = [f for f in files if not _is_checkpoint(Path(f))]
        for name in files:
            checkpoint.fsync(Path(directory) / name)
        checkpoint.fsync(Path(directory))


def drop_checkpoints(run_dir: Path) -> None:
    """Remove a finished run's checkpoints (best effort: a leftover checkpoint never fails a finished run)."""
    for leftover in [*run_dir.glob("checkpoint-*"), *run_dir.glob(".checkpoint-*"), run_dir / checkpoint.POINTER]:
        with contextlib.suppress(OSError):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def unplaced_dir(out: Path) -> Path:
    """Where a finished run goes when `out` was taken meanwhile: the visible sibling `NAME.finished-PID`
    (`-2`, `-3`, ... if even that exists); not a staging name, so nothing resumes or deletes it."""
    candidate = out.parent / f"{out.name}.finished-{os.getpid()}"
    n = 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = out.parent / f"{out.name}.finished-{os.getpid()}-{n}"
    return candidate


def finish(staging: Path, out: Path) -> None:
    """Put a completed run in place: fsync its files, rename the staging directory to `out` (atomically; the
    kernel refuses when `out` is no longer an empty directory), fsync the parent, and only then drop the
    checkpoints. When another run took `out` meanwhile, this run is left complete under `unplaced_dir(out)`
    and a RunDirError names both: nothing of either run is deleted or overwritten."""
    sync_tree(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, out)  # replaces `out` only when it is an empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        kept = keep_finished(staging, out)
        raise RunDirError(f"--out: '{out}' was filled by another run while this one ran; this run finished and "
                          f"was left in '{kept}' (move it where you want it)") from None
    checkpoint.fsync(out.parent)
    drop_checkpoints(out)


def keep_finished(staging: Path, out: Path) -> Path:
    """After an error once summary.json is written: never delete the finished run. Rename it to `out` if that
    is still free, else to `unplaced_dir(out)`; returns where it is (the staging directory itself when even
    a rename fails)."""
    for target in (out, unplaced_dir(out)):
        try:
            os.rename(staging, target)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            checkpoint.fsync(target.parent)
        drop_checkpoints(target)
        return target
    return staging


def discard_unless_resumable(staging: Path) -> None:
    """After a failure: keep the staging directory only when it holds a checkpoint to resume from."""
    if checkpoint.latest_round(staging) is None:
        shutil.rmtree(staging, ignore_errors=True)


def resumable(out: Path) -> tuple[Path, int | None] | None:
    """The staging directory of an unfinished run of `out` that `--resume` can continue, and the round of
    its newest checkpoint (None: none yet, it restarts from round 0); None when there is none."""
    out = output_path(out)
    candidates = []
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        if (staging / "config.toml").is_file() and (staging / RUN_FILE).is_file():
            candidates.append((checkpoint.latest_round(staging) or -1, staging.stat().st_mtime, staging))
    if not candidates:
        return None
    best = max(candidates)
    return best[2], (best[0] if best[0] >= 0 else None)


def owner_alive(staging: Path) -> int | None:
    """The pid in a staging directory's name, if that process is still a running pfl (the CLI, or a Ray
    worker of `pfl compare --jobs`)."""
    try:
        pid = int(staging.name.rsplit("-", 1)[1])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, IndexError, OSError):
        return None
    ours = b"pfl" in cmdline or b"cli.main" in cmdline or cmdline.startswith(b"ray::")
    return pid if ours and pid != os.getpid() else None


def claim(staging: Path, out: Path) -> Path:
    """Rename an interrupted run's staging directory to this process's pid, so that a second `--resume`
    sees this one alive."""
    mine = staging_dir(out)
    if staging != mine:
        staging.rename(mine)
    return mine


def read_staging(staging: Path) -> tuple[Config, Hardware, str]:
    """The resolved recipe, the hardware and the recipe's source an interrupted run was started with."""
    try:
        cfg = config_mod.from_toml((staging / "config.toml").read_text(encoding="utf-8"))
        saved = json.loads((staging / RUN_FILE).read_text(encoding="utf-8"))
        hw = Hardware(str(saved["accelerator"]), saved["devices"], str(saved["precision"]))
        recipe_source = str(saved.get("recipe_source", ""))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise RunDirError(f"--resume: '{staging}' has an unreadable config.toml or {RUN_FILE} "
                          f"({type(exc).__name__}: {exc})") from None
    return cfg, hw, recipe_source


class Checkpointer(Callbacks):
    """Every `checkpoint_every` rounds (before the last): the complete run state, atomically (pfl.checkpoint).
    Engines whose client states live elsewhere (Flower nodes) are not checkpointed. Clients not sampled
    since the newest checkpoint keep their file from it (a hard link): only trained clients are written."""

    def __init__(self, root: Path):
        self.root = root
        self.run = None
        self.sampled: set[int] | None = None  # sampled since the newest checkpoint; None: every client is new

    def on_run_start(self, run) -> None:
        self.run = run
        # a restored run starts from the newest checkpoint's files exactly; a fresh one has none
        self.sampled = set() if run.state.round > 0 else None

    def on_round_start(self, round_idx: int, sampled: list[int]) -> None:
        if self.sampled is not None:
            self.sampled.update(sampled)

    def on_round_end(self, record: dict[str, Any]) -> None:
        every, t = self.run.cfg.checkpoint_every, record["round"]
        if every == 0 or t % every or t == self.run.cfg.rounds:
            return
        everyone = range(self.run.cfg.num_clients)
        unchanged = [] if self.sampled is None else [k for k in everyone if k not in self.sampled]
        linked = set(checkpoint.linkable(self.root, unchanged))
        states = self.run.workers.client_states([k for k in everyone if k not in linked])
        if states is None:
            return
        checkpoint.save(self.root, t, self.run.state.global_state, states, self.run.state.progress(), linked)
        self.sampled = set()


# ---------------------------------------------------------------- state files of a finished run

def save_states(root: Path, global_state: Tensors, client_states) -> None:
    """state/global.safetensors and, when the engine hands them out, every client's state."""
    (root / "state" / "clients").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in global_state.items()} or {"_empty": torch.zeros(0)},
              str(root / "state" / "global.safetensors"))
    for k, state in client_states or ():
        save_file({n: t.cpu().contiguous() for n, t in state.items()}, str(client_state_path(root, k)))


def client_state_path(run_dir: Path, client_id: int) -> Path:
    return Path(run_dir) / "state" / "clients" / client_file(client_id)


def load_tensors(path: Path) -> Tensors:
    if not path.is_file():
        raise RunDirError(f"run state file '{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"run state file '{path}' is corrupted or not a safetensors file: {exc}") from None


def load_global_state(run_dir: Path) -> Tensors:
    state = load_tensors(Path(run_dir) / "state" / "global.safetensors")
    state.pop("_empty", None)
    return state


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
