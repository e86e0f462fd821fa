"""Run directories under pressure: symbolic links, two runs racing for one --out, recipe names that are paths,
absurd sizes, and errors after a run has finished. A finished run is never lost."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from pfl import checkpoint, config, rundir
from pfl.errors import RunDirError
from pfl.run import Hardware, train

FAST = ["--set", "rounds=1"]


def invoke(*args):
    res = CliRunner().invoke(app, list(args))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    return res, lines


def one_error_line(res, lines, fragment):
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def no_staging_left(parent: Path) -> bool:
    return not list(parent.glob(".*partial*"))


# ------------------------------------------------------------------------------------------ symbolic links

def test_symlinked_out_to_an_empty_directory_runs_into_its_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "target"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    res, _ = invoke("train", "--recipe", "smoke", *FAST, "--out", str(link))
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    assert link.is_symlink() and link.resolve() == target  # the link was not replaced by the run
    assert (target / "summary.json").is_file() and (link / "state" / "global.safetensors").is_file()
    assert no_staging_left(tmp_path) and no_staging_left(target.parent)
    res, _ = invoke("eval", str(link), "--json")
    assert res.exit_code == 0, res.stderr


def test_symlinked_out_to_a_non_empty_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    res, lines = invoke("train", "--recipe", "smoke", *FAST, "--out", str(link))
    one_error_line(res, lines, "already exists and is not empty")
    assert snapshot(target) == {"keep.txt": b"mine"} and link.is_symlink()


def test_a_loop_of_symbolic_links_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    res, lines = invoke("train", "--recipe", "smoke", *FAST, "--out", str(tmp_path / "a"))
    one_error_line(res, lines, "--out")
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


# ------------------------------------------------------------------------------------------ racing runs

def test_two_runs_racing_for_one_out_never_lose_the_first(tmp_path, monkeypatch):
    """Run B passes prepare_output, trains, and just before its rename run A (a real `pfl train` process)
    finishes into the same --out. B must neither delete nor overwrite A's run: one line, exit 2, and B's own
    finished run kept under NAME.finished-PID."""
    monkeypatch.chdir(tmp_path)
    tmp_path = tmp_path.resolve()
    out = tmp_path / "run"
    real_finish = rundir.finish
    seen = {}

    def a_finishes_first(staging, target):
        a = subprocess.run([sys.executable, "-m", "cli.main", "train", "--recipe", "smoke", "--set", "rounds=1",
                            "--set", "seed=7", "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert a.returncode == 0, a.stderr
        seen["a"] = snapshot(out)
        real_finish(staging, target)

    monkeypatch.setattr(rundir, "finish", a_finishes_first)
    res, lines = invoke("train", "--recipe", "smoke", *FAST, "--out", str(out))
    one_error_line(res, lines, f"--out: '{out}' was filled by another run while this one ran")
    assert snapshot(out) == seen["a"]  # A's run, byte for byte
    assert json.loads((out / "summary.json").read_text())["seed"] == 7
    kept = tmp_path / f"run.finished-{os.getpid()}"
    assert f"'{kept}'" in lines[0]
    assert json.loads((kept / "summary.json").read_text())["seed"] == 0  # B's run, complete
    assert (kept / "state" / "global.safetensors").is_file()
    assert not (kept / checkpoint.POINTER).exists() and not list(kept.glob("checkpoint-*"))
    assert no_staging_left(tmp_path)


def test_finish_into_a_taken_out_keeps_both_runs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    staging = rundir.staging_dir(out, 123)
    staging.mkdir()
    (staging / "summary.json").write_text('{"mine": 1}')
    with pytest.raises(RunDirError, match="was filled by another run"):
        rundir.finish(staging, out)
    assert snapshot(out) == {"summary.json": b"{}"}
    kept = tmp_path / f"run.finished-{os.getpid()}"
    assert snapshot(kept) == {"summary.json": b'{"mine": 1}'} and not staging.exists()


# ------------------------------------------------------------------------------------------ finish order

def test_finish_renames_before_it_drops_the_checkpoints(tmp_path, monkeypatch):
    """A rename that fails must leave the checkpoints (what --resume continues from) where they were."""
    out = tmp_path / "run"
    staging = rundir.staging_dir(out, 123)
    (staging / "checkpoint-000002").mkdir(parents=True)
    (staging / "checkpoint-000002" / "global.safetensors").write_bytes(b"x")
    (staging / checkpoint.POINTER).write_text("{}")
    (staging / "summary.json").write_text("{}")

    def broken_rename(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(rundir.os, "rename", broken_rename)
    with pytest.raises(OSError):
        rundir.finish(staging, out)
    assert (staging / "checkpoint-000002" / "global.safetensors").is_file() and (staging / checkpoint.POINTER).is_file()
    monkeypatch.undo()
    rundir.finish(staging, out)
    assert snapshot(out) == {"summary.json": b"{}"} and not staging.exists()


def test_finished_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = checkpoint.fsync

    def record(path):
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(checkpoint, "fsync", record)
    tmp_path = tmp_path.resolve()
    out = tmp_path / "run"
    cfg, _ = config.load("smoke", ["rounds=1"])
    train(cfg, out, Hardware())
    staging = rundir.staging_dir(out)
    names = {p.relative_to(staging) for p in synced if p.is_relative_to(staging)}
    for name in ("summary.json", "metrics.csv", "per_client.csv", "config.toml", "state/global.safetensors",
                 "state/clients/client_00000.safetensors", ".", "state", "state/clients"):
        assert Path(name) in names, name
    assert tmp_path in synced  # the directory holding the renamed run


# ------------------------------------------------------------------------------------------ errors after the end

def _train_with(monkeypatch, tmp_path, **overrides):
    cfg, _ = config.load("smoke", ["rounds=2", "checkpoint_every=0"])
    for target, replacement in overrides.items():
        monkeypatch.setattr(target, replacement)
    return tmp_path.resolve() / "run", cfg


def test_an_error_after_summary_json_keeps_the_run_in_place(tmp_path, monkeypatch):
    """checkpoint_every = 0: nothing to resume from, which used to mean 'delete the staging directory'."""
    def failing_sync(root):
        raise OSError(errno.EIO, "fsync failed")

    out, cfg = _train_with(monkeypatch, tmp_path, **{"pfl.rundir.sync_tree": failing_sync})
    with pytest.raises(OSError, match="fsync failed"):
        train(cfg, out, Hardware())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and (out / "state" / "global.safetensors").is_file()
    assert no_staging_left(tmp_path)


def test_a_failed_rename_leaves_the_finished_run_under_a_clear_name(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    out = tmp_path / "run"
    real_rename = os.rename

    def no_rename_onto_out(src, dst):
        if Path(dst) == out:
            raise OSError(errno.EACCES, "Permission denied")
        real_rename(src, dst)

    _, cfg = _train_with(monkeypatch, tmp_path, **{"pfl.rundir.os.rename": no_rename_onto_out})
    with pytest.raises(OSError, match="Permission denied"):
        train(cfg, out, Hardware())
    kept = tmp_path / f"run.finished-{os.getpid()}"
    assert json.loads((kept / "summary.json").read_text())["rounds"] == 2
    assert not out.exists() and no_staging_left(tmp_path)


def test_a_tracker_that_fails_to_close_does_not_delete_the_finished_run(tmp_path, monkeypatch):
    import pfl.trackers

    calls = []

    def failing_finish(self, run_dir, status="success"):
        calls.append(status)
        raise RuntimeError("tracker server went away")

    out, cfg = _train_with(monkeypatch, tmp_path, **{"pfl.trackers.Trackers.finish": failing_finish})
    assert pfl.trackers.Trackers.finish is failing_finish
    with pytest.raises(RuntimeError, match="tracker server went away"):
        train(cfg, out, Hardware(), trackers=("csv",))
    assert calls[0] == "success"
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2 and no_staging_left(tmp_path)


def test_an_error_before_summary_json_still_leaves_nothing(tmp_path, monkeypatch):
    import pfl.report

    def failing_plot(*args, **kwargs):
        raise RuntimeError("plotting broke")

    out, cfg = _train_with(monkeypatch, tmp_path, **{"pfl.report.plot_accuracy": failing_plot})
    assert pfl.report.plot_accuracy is failing_plot
    with pytest.raises(RuntimeError, match="plotting broke"):
        train(cfg, out, Hardware())
    assert not out.exists() and no_staging_left(tmp_path) and not list(tmp_path.glob("run.finished-*"))


# ------------------------------------------------------------------------------------------ names and sizes

def test_a_recipe_name_that_is_a_path_is_refused_by_train_and_partition(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = tmp_path / "evil.toml"
    recipe.write_text(config.list_recipes()["smoke"].read_text().replace('name = "smoke"', 'name = "../x"'))
    assert 'name = "../x"' in recipe.read_text()
    res, lines = invoke("train", "--recipe", str(recipe), *FAST)
    one_error_line(res, lines, "recipe key 'name'")
    assert "plain file name" in lines[0]
    res, lines = invoke("partition", "--recipe", str(recipe))
    one_error_line(res, lines, "recipe key 'name'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.toml", "work"] and not list(work.iterdir())


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\\b", "..", "x" * 101])
def test_names_that_are_not_plain_file_names_are_refused(name):
    with pytest.raises(config.ConfigError, match="recipe key 'name'"):
        config.load("smoke", [f"name={json.dumps(name)}"])


def test_ordinary_names_are_accepted():
    for name in ("smoke", "fmnist-dir", "my run 2", "a.b_c"):
        assert config.load("smoke", [f"name={json.dumps(name)}"])[0].name == name


@pytest.mark.parametrize("key, value, allowed", [
    ("representation_dim", 65537, "an integer >= 1 and <= 65536"),
    ("representation_dim", 10**12, "an integer >= 1 and <= 65536"),
    ("synthetic.num_samples", 10_000_001, "an integer >= 10 and <= 10000000"),
    ("batch_size", 65537, "an integer >= 1 and <= 65536"),
    ("batch_size", 10**15, "an integer >= 1 and <= 65536"),
])
def test_huge_sizes_exit_2_naming_the_key_and_the_range(tmp_path, monkeypatch, key, value, allowed):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for command in (["train", "--out", str(out)], ["partition"], ["models"]):
        res, lines = invoke(command[0], "--recipe", "smoke", "--set", f"{key}={value}", *command[1:])
        one_error_line(res, lines, f"recipe key '{key}': must be {allowed}, got {value}")
    assert not list(tmp_path.iterdir())


def test_the_upper_bounds_hold_for_every_bundled_recipe_and_are_reachable():
    for name in config.list_recipes():
        cfg, _ = config.load(name)
        assert cfg.representation_dim <= 65536 and cfg.batch_size <= 65536
        assert cfg["synthetic.num_samples"] <= 10_000_000
    cfg, _ = config.load("smoke", ["representation_dim=65536", "batch_size=65536", "synthetic.num_samples=10000000"])
    assert (cfg.representation_dim, cfg.batch_size, cfg["synthetic.num_samples"]) == (65536, 65536, 10_000_000)
