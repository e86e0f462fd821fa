"""Where every client's private state lives between its rounds: CPU memory or disk, never the device.

Only the client being trained or evaluated has its state loaded into a module on the device; the store
holds CPU tensors (memory) or safetensors files (disk, for many clients or large models).
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from pfl.schema import Tensors


def client_file(client_id: int) -> str:
    """The one name of a client's state file, wherever states are written (store, checkpoint, run dir)."""
    return f"client_{client_id:05d}.safetensors"


class MemoryStore:
    def __init__(self):
        self._states: dict[int, Tensors] = {}

    def put(self, client_id: int, state: Tensors) -> None:
        self._states[client_id] = state

    def get(self, client_id: int) -> Tensors:
        return self._states[client_id]

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._states


class DiskStore:
    """One safetensors file per client, replaced atomically (write to a temporary name, then rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.root / client_file(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        path = self._path(client_id)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

    def get(self, client_id: int) -> Tensors:
        return load_file(str(self._path(client_id)))

    def __contains__(self, client_id: int) -> bool:
        return self._path(client_id).is_file()
