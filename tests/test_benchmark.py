"""The overhead benchmark keeps working, and its plain-PyTorch reference computes what pfl computes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_pfl_rounds_equal_a_hand_written_pfedlora_loop():
    res = run("--recipe", "smoke", "--rounds", "2", "--warmup", "0")
    assert res.returncode == 0, res.stderr
    assert "median of per-round ratios" in res.stdout
    drift = float(re.search(r"max \|global adapter pfl - plain\| after 2 rounds: (\S+)", res.stdout).group(1))
    assert drift < 1e-5  # same clients, init, batches, phases: the same adapter up to float noise


@pytest.mark.heavy
def test_memory_mode_reports_both_sides():
    res = run("--memory", "--recipe", "smoke", "--rounds", "1")
    assert res.returncode == 0, res.stderr
    peaks = dict(re.findall(r"(plain|pfl): peak RSS ([\d.]+) MiB", res.stdout))
    assert set(peaks) == {"plain", "pfl"} and all(float(v) > 50 for v in peaks.values())
    assert "ratio pfl / plain peak RSS" in res.stdout
