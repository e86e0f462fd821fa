"""pfl.files: a file is replaced whole or not at all; a failed write leaves the old file and no temporary file,
and a private file is never readable by others, not even while it is written."""

import os
import stat

import pytest

from pfl import files
from pfl.files import atomic_file, atomic_write, temporary_name


def listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_successful_write_replaces_the_file_by_a_rename(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    old_inode = path.stat().st_ino
    with atomic_file(path) as tmp:
        tmp.write_text("new, half")
        assert path.read_text() == "old"  # readers see the old file until the rename
        assert tmp.parent == tmp_path and tmp.name.startswith(".summary.json.tmp-")
        tmp.write_text("new, whole")
    assert path.read_text() == "new, whole" and path.stat().st_ino != old_inode
    assert listing(tmp_path) == ["summary.json"]
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01") == tmp_path / "b.bin"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write(path, "ünïcode")
    assert path.read_bytes() == "ünïcode".encode()
    assert listing(tmp_path) == ["b.bin", "summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "comparison.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and listing(tmp_path) == ["comparison.csv"]
    with pytest.raises(TypeError):  # fails in the middle of atomic_write: not bytes
        atomic_write(path, object())
    with pytest.raises(KeyboardInterrupt), atomic_file(path):
        raise KeyboardInterrupt
    assert path.read_text() == "old" and listing(tmp_path) == ["comparison.csv"]
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "new.csv") as tmp:  # nothing to keep: nothing left
        tmp.write_text("x")
        raise RuntimeError
    assert listing(tmp_path) == ["comparison.csv"]


def test_a_failed_fsync_or_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.json"
    path.write_text("old")

    def broken(*args):
        raise OSError(5, "Input/output error")

    for target in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(files if target == "fsync" else files.os, target, broken)
            with pytest.raises(OSError, match="Input/output error"):
                atomic_write(path, "new")
        assert path.read_text() == "old" and listing(tmp_path) == ["checkpoint.json"]


def test_durable_writes_sync_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync", lambda p: synced.append(p))
    path = tmp_path / "checkpoint.json"
    atomic_write(path, "{}")
    assert synced == [temporary_name(path), tmp_path]
    synced.clear()
    atomic_write(path, "{}", durable=False)  # a working copy (DiskStore): no fsync at all
    assert synced == [] and path.read_text() == "{}"


def test_a_private_file_is_private_from_its_first_byte(tmp_path):
    os.umask(old := os.umask(0o022))
    path = tmp_path / "server.key"
    path.write_text("old, world-readable")
    path.chmod(0o644)
    with atomic_file(path, mode=0o600) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600
        tmp.write_bytes(b"secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"secret"
    atomic_write(tmp_path / "plain.csv", "a")
    assert stat.S_IMODE((tmp_path / "plain.csv").stat().st_mode) == 0o666 & ~old


def test_a_leftover_temporary_file_or_link_is_replaced_never_followed(tmp_path):
    path = tmp_path / "runtime.secret"
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    temporary_name(path).symlink_to(victim)  # e.g. planted, or left by a killed process with this pid
    atomic_write(path, b"secret", mode=0o600)
    assert victim.read_text() == "untouched" and path.read_bytes() == b"secret"
    assert listing(tmp_path) == ["runtime.secret", "victim"]
