"""Files replaced whole: an error or a crash at any moment leaves the old file or the new one under the
name, never a half-written one.

Files that must outlive a failure of their writer go through `atomic_file` (or `atomic_write`, for data
already in memory): the checkpoint pointer, client states on disk, comparison and tune outputs, private
keys and secrets, every picture, unpacked data sets. (A run's other files are written into its staging
directory, which is renamed into place whole: pfl.rundir.)

The new content is written to a temporary sibling `.<name>.tmp-<pid>` (hidden; in the same directory, so
the rename stays on one file system; named after the writing process, so two processes replacing the same
file never write into each other's temporary file), flushed to disk, and renamed over the name; the
directory is then flushed too, so the rename itself survives a power loss. On an error the temporary file
is removed and the old file is left as it was. A process killed in the middle of a write can leave its
hidden temporary file behind; the name itself is never touched until the rename.

This module imports nothing of pfl (and no torch), so that every layer can use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file or directory to disk (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """Where a write of `path` goes before it is renamed into place: `.<name>.tmp-<pid>` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int = 0o666, durable: bool = True) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s new content to (by any means: open, save_file, savefig with
    an explicit format); when the block ends without an error, rename it over `path`.

    The temporary file exists, empty, when the block starts: created anew (never following a link) with
    permissions `mode` (less the umask), which writers that open it again keep; `mode=0o600` makes a file
    that is private from its first byte. `durable`: fsync the file before the rename and the directory
    after it (off only for working files whose durability comes from elsewhere, e.g. client states that
    checkpoints copy)."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)  # a leftover of a killed process that had this pid
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync(path.parent)


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o666, durable: bool = True) -> Path:
    """Replace `path` with `data` (str: UTF-8) as `atomic_file` does; returns `path`."""
    with atomic_file(path, mode=mode, durable=durable) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
