"""Runs that survive: SIGKILL at random points and `--resume` end exactly where an uninterrupted run
ends; checkpoints that are corrupted, truncated or carry a pickle are refused by name (exit 2); at least
30 bad inputs end with exit 2, one line, and leave a finished run directory untouched."""

import csv
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import pfl

REPO = Path(__file__).resolve().parents[1]
TIMING = {"train_seconds", "eval_seconds"}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})


def staging_of(out: Path) -> Path | None:
    found = sorted(out.parent.glob(f".{out.name}.partial-*"))
    return found[-1] if found else None


def checkpoint_round(out: Path) -> int:
    staging = staging_of(out)
    try:
        return json.loads((staging / "checkpoint.json").read_text())["round"]
    except (TypeError, OSError, ValueError, KeyError):
        return 0


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(open(path))]


def same_state(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in (a / "state").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in (b / "state").rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        if x.keys() != y.keys() or not all(torch.equal(x[n], y[n]) for n in x):
            return False
    return True


# FedKD samples half the clients per round, so its checkpoints hard-link the others' files from the last one
@pytest.mark.parametrize("method, store, participation",
                         [("pfedlora", "memory", 1.0), pytest.param("fedkd", "disk", 0.5, marks=pytest.mark.heavy)])
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, method, store, participation):
    settings = ["--set", "rounds=10", "--set", "checkpoint_every=1", "--set", f"method={method}",
                "--set", f"store={store}", "--set", f"participation={participation}"]
    reference = tmp_path / "reference"
    assert pfl("train", "--recipe", "smoke", *settings, "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    rng = random.Random(f"{method}-{store}")
    proc = start("train", "--recipe", "smoke", *settings, "--out", str(out))
    kills, resumed_from = 0, []
    while kills < 3:
        # wait for a checkpoint beyond the one we resumed from, then kill at a random moment after it:
        # mid-round, mid-evaluation or mid-checkpoint
        last = resumed_from[-1] if resumed_from else 0
        deadline = time.monotonic() + 120
        while checkpoint_round(out) <= last and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            break  # finished before we could kill it again
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert not out.exists()  # a killed run never leaves anything under the requested name
        resumed_from.append(checkpoint_round(out))
        proc = start("train", "--resume", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert kills >= 2 and all(r >= 1 for r in resumed_from), (kills, resumed_from)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == resumed_from[-1]
    assert rows(out / "metrics.csv") == rows(reference / "metrics.csv")
    with open(out / "per_client.csv") as mine, open(reference / "per_client.csv") as theirs:
        assert list(csv.DictReader(mine)) == list(csv.DictReader(theirs))
    assert same_state(out, reference)
    assert staging_of(out) is None and not list(out.glob("checkpoint*"))


# ---------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def interrupted(tmp_path) -> tuple[Path, Path]:
    """A run killed after its third checkpoint: (the requested directory, its staging directory)."""
    out = tmp_path / "run"
    proc = start("train", "--recipe", "smoke", "--set", "rounds=12", "--set", "checkpoint_every=1", "--out", str(out))
    deadline = time.monotonic() + 120
    while checkpoint_round(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staging = staging_of(out)
    assert staging is not None and checkpoint_round(out) >= 3
    return out, staging


class RunsCode:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _latest(staging: Path) -> Path:
    return staging / json.loads((staging / "checkpoint.json").read_text())["latest"]


def _resume_fails(out: Path, message: str) -> None:
    res = pfl("train", "--resume", str(out))
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_checkpoint_holding_a_pickle_is_refused_and_never_unpickled(interrupted, tmp_path):
    out, staging = interrupted
    marker = tmp_path / "code-ran"
    target = _latest(staging) / "global.safetensors"
    target.write_bytes(pickle.dumps(RunsCode(marker)))
    pointer = json.loads((staging / "checkpoint.json").read_text())
    pointer["sha256"]["global.safetensors"] = hashlib.sha256(target.read_bytes()).hexdigest()  # a forger's pointer
    (staging / "checkpoint.json").write_text(json.dumps(pointer))
    _resume_fails(out, f"checkpoint file '{target}' is not a valid safetensors file")
    (staging / "checkpoint.json").write_bytes(pickle.dumps(RunsCode(marker)))
    _resume_fails(out, f"checkpoint pointer '{staging / 'checkpoint.json'}' is missing or corrupted")
    assert not marker.exists()


def test_truncated_or_altered_checkpoint_is_reported_by_name(interrupted):
    out, staging = interrupted
    client = _latest(staging) / "clients" / "client_00002.safetensors"
    client.write_bytes(client.read_bytes()[:100])
    _resume_fails(out, f"checkpoint file '{client}' is corrupted")
    (staging / "checkpoint.json").write_text('{"latest": "../../etc", "round": 3, "sha256": {}}')
    _resume_fails(out, "names an invalid checkpoint")


@pytest.mark.heavy
def test_resume_of_a_running_or_finished_run_is_refused(interrupted, tmp_path):
    out, _staging = interrupted
    running = start("train", "--resume", str(out))  # a resumed run names its own pid: a second resume sees it
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(f".{out.name}.partial-{running.pid}")) and time.monotonic() < deadline:
            time.sleep(0.01)
        running.send_signal(signal.SIGSTOP)  # alive but paused: it cannot finish while we try
        res = pfl("train", "--resume", str(out))
        assert res.returncode == 2 and f"is still running (pid {running.pid})" in res.stderr, res.stderr
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait()
    ok = pfl("train", "--resume", str(out))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from_round"] >= 3
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = pfl("train", "--resume", str(out))
    assert res.returncode == 2 and "is a finished run; there is nothing to resume" in res.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.heavy
def test_eval_warns_when_the_versions_differ(tmp_path):
    out = tmp_path / "run"
    assert pfl("train", "--recipe", "smoke", "--set", "rounds=1", "--out", str(out)).returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["versions"]) == {"python", "torch", "lightning", "pfl", "git_commit"}
    quiet = pfl("eval", str(out))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    summary["versions"]["torch"] = "1.0.0"
    (out / "summary.json").write_text(json.dumps(summary))
    res = pfl("eval", str(out))
    assert res.returncode == 0
    assert f"warning: this run was made with other versions: torch 1.0.0 -> {torch.__version__}" in res.stderr
