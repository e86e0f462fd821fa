"""Checkpoints of a run in progress, written so that a crash at any moment leaves a complete one.

A checkpoint is a directory `checkpoint-RRRRRR/` in the run's staging directory:

    global.safetensors                the server state after round R
    clients/client_NNNNN.safetensors  every client's private state after round R
    progress.json                     R, the metrics rows so far, the last accuracies

written under a temporary name, every file fsynced, then renamed into place; `checkpoint.json` (also
replaced atomically, after an fsync: pfl.files) names the newest complete checkpoint and holds the SHA-256 of
each of its files, so a truncated or altered file is reported by name. Older checkpoints are deleted only
after the pointer has moved. Nothing is ever unpickled: tensors are safetensors, the rest is JSON.

A client not trained since the newest checkpoint has the same state file: the new checkpoint hard-links
it instead of writing and hashing it again (files are never modified in place, so a link is as good as a
copy). With 50 of 1000 clients per round that is most of a cross-device checkpoint (4.5 GB, ~19 s here).

Random-number state needs no saving: every random choice of a run (partition, sampling, initialisation,
data order, augmentation) is drawn from a generator seeded by (seed, round, client, phase) at the moment
it is used, so round R + 1 after a resume draws exactly what it would have drawn without the crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pfl.errors import RunDirError
from pfl.federation.store import client_file
from pfl.files import atomic_write, fsync

POINTER = "checkpoint.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _newest(root: Path) -> tuple[str, dict[str, str]] | None:
    """(name, SHA-256 per file) of the newest checkpoint, or None."""
    try:
        pointer = json.loads((root / POINTER).read_text(encoding="utf-8"))
        return str(pointer["latest"]), dict(pointer["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def linkable(root: Path, client_ids) -> list[int]:
    """The clients among `client_ids` whose file the newest checkpoint under `root` holds (and can lend)."""
    newest = _newest(Path(root))
    if newest is None:
        return []
    name, digests = newest
    return [k for k in client_ids if f"clients/{client_file(k)}" in digests
            and (Path(root) / name / "clients" / client_file(k)).is_file()]


def save(root: Path, round_idx: int, global_state: dict[str, torch.Tensor], client_states,
         progress: dict[str, Any], linked=()) -> Path:
    """Write the checkpoint of round `round_idx` under `root` and point checkpoint.json at it.

    `client_states` yields (client_id, tensors); `linked` names clients whose state is unchanged since the
    newest checkpoint (see `linkable`): their files are hard links to it. `progress` is the loop's JSON
    state (metrics rows so far, the last per-client accuracies), returned as it was by `load`."""
    root = Path(root)
    name = f"checkpoint-{round_idx:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "clients").mkdir(parents=True)
    digests = {}
    linked = list(linked)
    if linked:
        previous, previous_digests = _newest(root)
        for k in linked:
            rel = f"clients/{client_file(k)}"
            os.link(root / previous / rel, tmp / rel)
            digests[rel] = previous_digests[rel]
    files = {"global.safetensors": {k: v.contiguous() for k, v in global_state.items()} or
             {"_empty": torch.zeros(0)}}
    for k, state in client_states:
        files[f"clients/{client_file(k)}"] = {n: t.cpu().contiguous() for n, t in state.items()}
    for rel, tensors in files.items():
        save_file(tensors, str(tmp / rel))
        fsync(tmp / rel)
        digests[rel] = _sha256(tmp / rel)
    progress = {**progress, "round": round_idx}
    (tmp / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    fsync(tmp / "progress.json")
    digests["progress.json"] = _sha256(tmp / "progress.json")
    fsync(tmp / "clients")
    fsync(tmp)
    target = root / name
    shutil.rmtree(target, ignore_errors=True)  # a leftover of a crash right after this rename, before the pointer
    os.replace(tmp, target)
    fsync(root)
    clients = sorted(int(rel[len("clients/client_"):-len(".safetensors")]) for rel in digests
                     if rel.startswith("clients/"))
    atomic_write(root / POINTER, json.dumps({"latest": name, "round": round_idx, "sha256": digests,
                                             "clients": clients}))
    for old in root.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_round(root: Path) -> int | None:
    """The round of the newest complete checkpoint under `root`, or None (no or unreadable pointer)."""
    try:
        return int(json.loads((Path(root) / POINTER).read_text(encoding="utf-8"))["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(root: Path, num_clients: int) -> dict[str, Any]:
    """The newest checkpoint under `root`, verified; RunDirError naming the file when anything is wrong."""
    root = Path(root)
    pointer_path = root / POINTER
    try:
        pointer = json.loads(pointer_path.read_text(encoding="utf-8"))
        name, digests = str(pointer["latest"]), dict(pointer["sha256"])
        # the clients whose state the checkpoint holds: all of them, except in a Flower simulation, whose
        # clients initialise on first contact
        client_ids = [int(k) for k in pointer.get("clients", range(num_clients))]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"checkpoint pointer '{pointer_path}' is missing or corrupted ({type(exc).__name__})") \
            from None
    if "/" in name or not name.startswith("checkpoint-"):
        raise RunDirError(f"checkpoint pointer '{pointer_path}' names an invalid checkpoint {name!r}")
    directory = root / name
    expected = {"global.safetensors", "progress.json"} | {f"clients/{client_file(k)}" for k in client_ids}
    if set(digests) != expected or not set(client_ids) <= set(range(num_clients)):
        raise RunDirError(f"checkpoint '{directory}' does not list the files of a {num_clients}-client run")
    for rel, digest in digests.items():
        path = directory / rel
        if not path.is_file():
            raise RunDirError(f"checkpoint file '{path}' is missing")
        if _sha256(path) != digest:
            raise RunDirError(f"checkpoint file '{path}' is corrupted (its SHA-256 differs from checkpoint.json)")

    def tensors(rel: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(directory / rel))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RunDirError(f"checkpoint file '{directory / rel}' is not a valid safetensors file: {exc}") \
                from None

    try:
        progress = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
        progress["round"], progress["history"] = int(progress["round"]), list(progress["history"])
        for key in ("last_accuracies", "last_val_accuracies"):
            progress[key] = [float(a) for a in progress.get(key, [])]
        progress["client_curves"] = [{"round": int(c["round"]), "accuracies": [float(a) for a in c["accuracies"]]}
                                     for c in progress.get("client_curves", [])]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"checkpoint file '{directory / 'progress.json'}' is corrupted "
                          f"({type(exc).__name__})") from None
    global_state = tensors("global.safetensors")
    global_state.pop("_empty", None)
    clients = {k: tensors(f"clients/{client_file(k)}") for k in client_ids}
    return {**progress, "global_state": global_state, "clients": clients}
