"""Parallel comparisons (`pfl compare --jobs`): results independent of the number of jobs, a killed worker's
run resumed on rerun, a run's own failure reported without stopping the others, bad resources refused, the
paired confidence interval, and no Ray process left behind."""

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pfl import compare as cmp
from pfl import config
from pfl.build import Hardware
from pfl.parallel import Resources, RunSpec, run_all
from pfl.rundir import owner_alive
from tests.test_cli import ENV, PFL, pfl

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--recipe", "smoke", "--methods", "pfedlora,standalone", "--seeds", "2", "--set", "rounds=3",
        "--set", "target_accuracy=0.5", "--cpus-per-run", "1"]


def table(path: Path) -> list[dict]:
    """The rows of a csv, wall-time columns (which vary run to run) left out."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "cmp"
    res = pfl("compare", *ARGS, "--jobs", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.ray
def test_two_jobs_give_the_table_of_one_job(sequential, tmp_path, no_ray_left):
    out = tmp_path / "cmp"
    res = pfl("compare", *ARGS, "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "2 at once (1 thread(s) each)" in res.stdout
    assert table(out / "comparison.csv") == table(sequential / "comparison.csv")
    for run in (sequential / "runs").iterdir():  # every round of every run, bit for bit
        assert table(out / "runs" / run.name / "metrics.csv") == table(run / "metrics.csv"), run.name


def _checkpointed_staging(runs: Path, at_least: int):
    """A run's staging directory whose checkpoint is at round >= at_least, and its round."""
    for staging in runs.glob(".*.partial-*"):
        try:
            round_idx = json.loads((staging / "checkpoint.json").read_text())["round"]
        except (OSError, ValueError, KeyError):
            continue
        if round_idx >= at_least:
            return staging, round_idx
    return None


@pytest.mark.heavy
@pytest.mark.ray
def test_a_killed_worker_fails_its_run_only_and_the_rerun_resumes_it(tmp_path, no_ray_left):
    """SIGKILL the Ray worker training one run after its checkpoint of round 2: the other runs finish, the
    killed one is reported failed (exit 1); the same command again resumes it from its checkpoint (not from
    round 0) and the table equals an uninterrupted comparison's."""
    args = ["--recipe", "smoke", "--methods", "pfedlora,standalone", "--seeds", "1", "--set", "rounds=8",
            "--set", "checkpoint_every=1", "--set", "synthetic.num_samples=1200", "--cpus-per-run", "1"]
    reference = tmp_path / "reference"
    assert pfl("compare", *args, "--jobs", "1", "--out", str(reference)).returncode == 0
    out = tmp_path / "cmp"
    proc = subprocess.Popen(PFL + ["compare", *args, "--jobs", "2", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    found, deadline = None, time.monotonic() + 240
    while found is None and proc.poll() is None and time.monotonic() < deadline:
        found = _checkpointed_staging(out / "runs", 2)
        time.sleep(0.01)
    assert found is not None, proc.communicate(timeout=60)
    staging, killed_at = found
    victim = int(staging.name.rsplit("-", 1)[1])
    assert b"ray::" in Path(f"/proc/{victim}/cmdline").read_bytes()  # a Ray worker, not the driver
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, (stdout, stderr)
    assert "its worker died" in stderr and "1 run(s) failed" in stderr
    assert len(list((out / "runs").glob("*/summary.json"))) == 1  # the other run finished
    assert "Failed runs" in (out / "comparison.md").read_text()
    res = pfl("compare", *args, "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    resumed = [line for line in res.stdout.splitlines() if "resumed from round" in line]
    assert len(resumed) == 1 and int(resumed[0].split("resumed from round ")[1].split()[0]) >= killed_at >= 2
    assert "reusing finished run" in res.stdout
    assert table(out / "comparison.csv") == table(reference / "comparison.csv")


def test_a_run_that_fails_on_its_own_is_reported_and_the_others_finish(tmp_path, make_cfg):
    good = make_cfg({"rounds": 1})
    broken = config.resolve({**good.as_flat(), "dataset": "cifar10", "data_dir": str(tmp_path / "none"),
                             "download": False, "model_zoo": ["cnn5"]})
    specs = [RunSpec("good", good.as_flat(), "test", tmp_path / "good"),
             RunSpec("broken", broken.as_flat(), "test", tmp_path / "broken")]
    outcomes = run_all(specs, Hardware(), Resources(jobs=1, cpus_per_run=1))
    assert [o.status for o in outcomes] == ["trained", "failed"]
    assert "DataError" in outcomes[1].detail and not (tmp_path / "broken").exists()
    records = [cmp.load_run(tmp_path / "good")]
    rows = cmp.summarise(records, [("fedproto", 0, outcomes[1].detail)])
    assert [r["method"] for r in rows] == ["pfedlora", "fedproto"] and rows[1]["seeds"] == 0
    written = cmp.write_outputs(tmp_path / "cmp", records, rows)
    md = written[1].read_text()
    assert md.count("fedproto") == 1 and "Failed runs" in md and "DataError" in md


def test_paired_interval_is_the_t_interval_computed_by_hand():
    low, high = cmp.paired_interval([0.01, 0.03, 0.02])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 df) x sample sd / sqrt(n)
    assert low == pytest.approx(0.02 - half) and high == pytest.approx(0.02 + half)
    assert all(math.isnan(x) for x in cmp.paired_interval([0.01]))


BAD = [
    (["compare", "--recipe", "smoke", "--jobs", "0"], "--jobs: must be an integer >= 1"),
    (["compare", "--recipe", "smoke", "--jobs", "2", "--cpus-per-run", "64"], "--cpus-per-run: this machine has"),
    (["compare", "--recipe", "smoke", "--cpus-per-run", "0.5"], "--cpus-per-run: must be a whole number"),
    (["compare", "--recipe", "smoke", "--gpus-per-run", "-1"], "--gpus-per-run: must be between 0 and 8"),
    (["compare", "--recipe", "smoke", "--gpus-per-run", "0.5"], "--gpus-per-run: runs that get a GPU share"),
    (["compare", "--recipe", "smoke", "--tune-rounds", "2"], "--tune-rounds: must be an integer >= 1 and goes"),
    (["compare", "--recipe", "smoke", "--jobs", "2", "--set", "engine=flower"], "--jobs: runs on the flower engine"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_parallel_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    """In-process (Typer's runner: the `pfl` command's code path without a Python start per row)."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.heavy
@pytest.mark.ray
def test_ctrl_c_stops_every_worker_and_leaves_resumable_runs(tmp_path, no_ray_left):
    args = ["--recipe", "smoke", "--methods", "pfedlora,standalone", "--seeds", "1", "--set", "rounds=8",
            "--set", "checkpoint_every=1", "--set", "synthetic.num_samples=1200", "--cpus-per-run", "1",
            "--jobs", "2", "--out", str(tmp_path / "cmp")]
    proc = subprocess.Popen(PFL + ["compare", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=REPO)
    deadline = time.monotonic() + 240
    while _checkpointed_staging(tmp_path / "cmp" / "runs", 2) is None and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "every worker was stopped" in stderr
    # what a rerun resumes (tested above): a staging directory with a checkpoint and no live writer
    staging, _ = _checkpointed_staging(tmp_path / "cmp" / "runs", 2)
    assert owner_alive(staging) is None
