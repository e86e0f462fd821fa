"""Where every client's private state lives between its rounds: memory (CPU, or the training device when
the run keeps client states resident there) or disk (safetensors files, for many clients or large models).

Only the client being trained or evaluated has its state loaded into a module; `device` tells the modules
where to make their state copies (ClientModule.keep), so a resident store never round-trips the host.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pfl.files import atomic_file
from pfl.schema import Tensors


def client_file(client_id: int) -> str:
    """The one name of a client's state file, wherever states are written (store, checkpoint, run dir)."""
    return f"client_{client_id:05d}.safetensors"


class MemoryStore:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[int, Tensors] = {}

    def put(self, client_id: int, state: Tensors) -> None:
        self._states[client_id] = {k: v.to(self.device) for k, v in state.items()}  # no copy if already there

    def get(self, client_id: int) -> Tensors:
        return self._states[client_id]

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._states


class DiskStore:
    """One safetensors file per client, replaced atomically (pfl.files.atomic_file)."""

    device = torch.device("cpu")

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.root / client_file(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        # not fsynced: a working copy; checkpoints and the finished run's state files are the durable ones
        with atomic_file(self._path(client_id), durable=False) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))

    def get(self, client_id: int) -> Tensors:
        return load_file(str(self._path(client_id)))

    def __contains__(self, client_id: int) -> bool:
        return self._path(client_id).is_file()
