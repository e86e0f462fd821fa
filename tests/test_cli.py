"""The CLI as a user runs it: real `pfl` processes, exit codes, messages, and what lands on disk."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

PFL = [sys.executable, "-m", "cli.main"]
ENV = {**os.environ, "COLUMNS": "200"}


def pfl(*args, cwd=None):
    return subprocess.run(PFL + list(args), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def test_train_smoke_end_to_end_and_eval_reproduces_final_accuracy(tmp_path):
    out = tmp_path / "run"
    res = pfl("train", "--recipe", "smoke", "--out", str(out))
    assert res.returncode == 0, res.stderr
    for name in ("config.toml", "metrics.csv", "summary.json", "per_client.csv", "accuracy.png", "partition.png",
                 "state/global.safetensors", "state/clients/client_00000.safetensors"):
        assert (out / name).is_file(), name
    assert "personalised accuracy per client" in res.stdout and "final mean accuracy" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and "adapter used at inference: own" in summary["evaluation"]
    assert summary["final"]["acc_mean"] > 0.5  # above chance for 2-class clients... and learnt something
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("round,clients,clients_dropped,train_loss")
    assert not list(tmp_path.glob(".*partial*"))

    ev = pfl("eval", str(out), "--json")
    assert ev.returncode == 0, ev.stderr
    recomputed = {r["client_id"]: r["accuracy"] for r in json.loads(ev.stdout)}
    import csv
    with open(out / "per_client.csv") as fh:
        recorded = {int(r["client_id"]): float(r["accuracy"]) for r in csv.DictReader(fh)}
    assert recomputed.keys() == recorded.keys()
    for k in recorded:
        assert math.isclose(recomputed[k], recorded[k], abs_tol=1e-9)
    mean = sum(recorded.values()) / len(recorded)
    assert math.isclose(mean, summary["final"]["acc_mean"], abs_tol=1e-9)


@pytest.mark.heavy
def test_same_seed_same_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert pfl("train", "--recipe", "smoke", "--out", str(out), "--set", "rounds=2").returncode == 0

    def strip(p):
        return [",".join(line.split(",")[:-2]) for line in (p / "metrics.csv").read_text().splitlines()]

    assert strip(a) == strip(b)  # all but the two timing columns


@pytest.fixture
def existing_run(tmp_path):
    d = tmp_path / "existing"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    return d


BAD = [
    (["train", "--recipe", "nope"], "--recipe: unknown recipe 'nope'"),
    (["train", "--recipe", "smoke", "--set", "rounds=0"], "recipe key 'rounds': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "bogus=1"], "--set key 'bogus': unknown recipe key"),
    (["train", "--recipe", "smoke", "--set", "participation=2"], "recipe key 'participation'"),
    (["train", "--recipe", "smoke", "--set", "pfedlora.rank=0"], "recipe key 'pfedlora.rank'"),
    (["train", "--recipe", "smoke", "--set", "noequals"], "expected key=value"),
    (["train", "--recipe", "smoke", "--set", "dataset=cifar10", "--set", "download=false",
      "--set", "data_dir=/nonexistent/x"],
     "dataset 'cifar10': cifar-10-batches-py/ not found in /nonexistent/x"),
    (["train", "--recipe", "smoke", "--out", "/proc/pfl-run"], "--out: cannot create '/proc/pfl-run'"),
    (["train", "--recipe", "smoke", "--precision", "16-mixed"], "--precision: 16-mixed (float16) needs a GPU"),
    (["train", "--recipe", "smoke", "--precision", "8-bit"], "--precision: must be one of"),
    (["train", "--recipe", "smoke", "--accelerator", "cuda"],
     "--accelerator/--devices/--precision: cuda/1/32-true cannot"),
    (["train", "--recipe", "smoke", "--devices", "2"], "--devices: the local engine trains one client at a time"),
    (["train", "--recipe", "smoke", "--devices", "two"], "--devices: must be a count"),
    (["train", "--recipe", "smoke", "--threads", "-1"], "--threads: must be >= 0"),
    (["train", "--recipe", "smoke", "--resident", "always"], "--resident: must be one of auto, on, off"),
    (["train", "--recipe", "smoke", "--resident", "on", "--set", "store=disk"],
     "--resident on: needs the local engine"),
    (["train", "--recipe", "smoke", "--engine", "spark"], "recipe key 'engine': must be one of local, flower"),
    (["train", "--recipe", "smoke", "--set", "min_clients=5"],
     "recipe key 'min_clients': must be <= the 4 clients sampled"),
    (["train", "--recipe", "smoke", "--set", "flower.num_supernodes=9"],
     "recipe key 'flower.num_supernodes': must be <= num_clients (4), got 9"),
    (["train", "--recipe", "smoke", "--set", "flower.client_cpus=0"],
     "recipe key 'flower.client_cpus': must be a number > 0"),
    (["train", "--recipe", "smoke", "--set", "flower.round_timeout=-1"], "recipe key 'flower.round_timeout'"),
    (["train", "--recipe", "smoke", "--set", "num_clients=0"], "recipe key 'num_clients': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "participation=0"], "recipe key 'participation': must be a number > 0"),
    (["train", "--recipe", "smoke", "--set", "local_epochs=0"], "recipe key 'local_epochs': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "lr=0"], "recipe key 'lr': must be a number > 0"),
    (["train", "--recipe", "smoke", "--set", "lr=nan"], "recipe key 'lr': must be a number > 0"),
    (["train", "--recipe", "smoke", "--set", "batch_size=0"], "recipe key 'batch_size': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "rounds=1.5"], "recipe key 'rounds': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "classes_per_client=5"],
     "recipe key 'classes_per_client': must be <= the 4 classes of synthetic"),
    (["train", "--recipe", "smoke", "--set", "pfedlora.rank=501"],
     "recipe key 'pfedlora.rank': must be an integer in [1, 500]"),
    (["train", "--recipe", "smoke", "--set", "method=fedx"], "recipe key 'method': must be one of"),
    (["train", "--recipe", "smoke", "--set", "model_zoo=[\"cnn9\"]"], "recipe key 'model_zoo': unknown model 'cnn9'"),
    (["train", "--recipe", "smoke", "--set", "dirichlet_alpha=0"],
     "recipe key 'dirichlet_alpha': must be a number > 0"),
    (["train", "--recipe", "smoke", "--set", "test_fraction=1"], "recipe key 'test_fraction'"),
    (["train", "--recipe", "smoke", "--set", "eval_every=0"], "recipe key 'eval_every': must be an integer >= 1"),
    (["train", "--recipe", "smoke", "--set", "checkpoint_every=-1"],
     "recipe key 'checkpoint_every': must be an integer >= 0"),
    (["train", "--recipe", "smoke", "--set", "dataset=mnist"], "recipe key 'dataset': must be one of"),
    (["train", "--recipe", "smoke", "--set", "method=fedkd", "--set", "fedkd.energy_start=0.99", "--set",
      "fedkd.energy_end=0.9"],
     "recipe key 'fedkd.energy_end': must be >= fedkd.energy_start"),
    (["train", "--recipe", "smoke", "--set", "method=fedmrl", "--set", "fedmrl.small_dim=600"],
     "recipe key 'fedmrl.small_dim': must be an integer in [0, 500]"),
    (["train", "--recipe", "smoke", "--set", "model_zoo=htfe9"],
     "recipe key 'model_zoo': must be a list of strings or one of paper-cnn, htfe8, mixed-small"),
    (["train", "--recipe", "smoke", "--set", "evaluate_at=end"], "recipe key 'evaluate_at': must be one of"),
    (["compare", "--recipe", "smoke", "--methods", "later,fedx"], "--methods: unknown method 'fedx'"),
    (["models", "--recipe", "nope"], "--recipe: unknown recipe 'nope'"),
    (["partition", "--recipe", "nope"], "--recipe: unknown recipe 'nope'"),
    (["partition", "--recipe", "smoke", "--set", "num_clients=0"], "recipe key 'num_clients'"),
    (["partition", "--recipe", "smoke", "--out", "split.jpg"], "--out: must be a .png file"),
    (["partition", "--recipe", "smoke", "--out", "missing/split.png"], "--out: 'missing/split.png' is a directory"),
    (["models", "--recipe", "smoke", "--set", "representation_dim=0"], "recipe key 'representation_dim'"),
    (["train", "--recipe", "/etc/passwd"], "--recipe: '/etc/passwd' is not valid TOML"),
    (["train", "--recipe", "missing.toml"], "--recipe: file 'missing.toml' does not exist"),
    (["train", "--set", "rounds=2"], "--recipe: required"),
    (["train", "--recipe", "smoke", "--out", "{finished}"], "--out: '{finished}' already exists and is not empty"),
    (["train", "--resume", "{finished}"], "--resume: '{finished}' is a finished run; there is nothing to resume"),
    (["train", "--resume", "/nonexistent/run"], "--resume: no interrupted run of '/nonexistent/run' was found"),
    (["train", "--resume", "{finished}", "--set", "rounds=9"],
     "--resume: continues the run exactly as it was configured; drop --set"),
    (["eval", "/nonexistent/run"], "RUN_DIR: '/nonexistent/run' is not a directory"),
    (["eval", "{finished}", "--precision", "16-mixed"], "--precision: 16-mixed (float16) needs a GPU"),
    (["compare", "--recipe", "smoke", "--methods", "pfedlora,nope"], "--methods"),
    (["compare", "--recipe", "smoke", "--methods", "pfedlora, pfedlora(mu=2)"],
     "--methods: entry 'pfedlora(mu=2)': recipe key 'pfedlora.mu': must be a number > 0 and <= 1, got 2.0"),
    (["compare", "--recipe", "smoke", "--methods", "pfedlora(mu=0.5"], "--methods: entry 'pfedlora(mu=0.5': unbal"),
    (["recipes", "--resolve", "nope"], "--recipe: unknown recipe 'nope'"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert pfl("train", "--recipe", "smoke", "--set", "rounds=1", "--out", str(out)).returncode == 0
    return out


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, message", BAD,
                         ids=[" ".join(a[:1] + a[3:] if a[1:2] == ["--recipe"] else a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, finished_run, args, message):
    """The CLI in-process (Typer's runner: the same code path as the `pfl` command, without paying a
    Python start per row): exit 2, one line naming the problem, nothing written, a finished run untouched."""
    from typer.testing import CliRunner

    from cli.main import app

    if "cuda" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{finished}", str(finished_run)) for a in args]
    message = message.replace("{finished}", str(finished_run))
    out = tmp_path / "out"
    if args[0] in ("train", "compare") and "--out" not in args and "--resume" not in args:
        args = args + ["--out", str(out)]
    before = _snapshot(finished_run)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial*")) and not (tmp_path / "runs").exists()
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.png"))
    assert _snapshot(finished_run) == before


def test_existing_out_dir_is_refused_and_left_untouched(existing_run):
    res = pfl("train", "--recipe", "smoke", "--out", str(existing_run))
    assert res.returncode == 2 and "already exists and is not empty" in res.stderr
    assert [p.name for p in existing_run.iterdir()] == ["keep.txt"]


def test_eval_of_a_directory_that_is_not_a_run_exits_2(existing_run):
    res = pfl("eval", str(existing_run))
    assert res.returncode == 2 and "has no config.toml" in res.stderr


def test_eval_of_a_corrupted_state_file_names_it(tmp_path):
    out = tmp_path / "run"
    assert pfl("train", "--recipe", "smoke", "--out", str(out), "--set", "rounds=1").returncode == 0
    victim = out / "state" / "clients" / "client_00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    res = pfl("eval", str(out))
    assert res.returncode == 2 and "client_00002.safetensors" in res.stderr and "corrupted" in res.stderr


def test_recipes_lists_the_bundled_recipes(monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("COLUMNS", "250")  # one table row per key
    res = CliRunner().invoke(app, ["recipes"], terminal_width=200)
    assert res.exit_code == 0
    for name in ("cifar10", "cifar100", "fmnist", "fmnist-dir", "fmnist-mixed", "smoke"):
        assert name in res.stdout
    keys = CliRunner().invoke(app, ["recipes", "--keys"], terminal_width=200)
    for key in ("pfedlora.adapter_epochs", "classes_per_client", "fedtgp.margin_max", "evaluate_at"):
        assert key in keys.stdout


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_cpu_precisions_run_and_upload_float32(tmp_path, precision):
    """Mixed and true precisions train on the CPU; a true-precision client computes in bf16 / float64 and its
    upload travels in float32 (pFedLoRA's adapter: r (d + C) floats of 4 bytes, none rejected)."""
    out = tmp_path / precision
    res = pfl("train", "--recipe", "smoke", "--precision", precision, "--set", "rounds=1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hardware"]["precision"] == precision and 0.0 <= summary["final"]["acc_mean"] <= 1.0
    with open(out / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert int(row["clients_dropped"]) == 0 and int(row["bytes_up"]) == 4 * 4 * 8 * (500 + 4)


def test_cifar10_recipe_runs_end_to_end_on_a_cifar_format_archive(tmp_path):
    """The paper's recipe (3x32x32, crop+flip augmentation, CNN-1..5) on an archive in the real format."""
    from conftest import make_cifar10_archive
    make_cifar10_archive(tmp_path, per_batch=100)
    out = tmp_path / "run"
    res = pfl("train", "--recipe", "cifar10", "--set", f"data_dir={tmp_path}", "--set", "download=false",
              "--set", "rounds=2", "--set", "num_clients=5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "cifar10" and summary["rounds"] == 2
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"adapter_logit_ratio", "train_acc_with_adapter", "train_acc_head_only"} <= set(header)
    import csv
    with open(out / "per_client.csv") as fh:
        archs = [r["arch"] for r in csv.DictReader(fh)]
    assert archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]


def test_sigterm_stops_a_run_cleanly_and_leaves_nothing_behind(tmp_path):
    """`timeout` and job schedulers send SIGTERM: the run must clean up its staging directory like Ctrl-C."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(PFL + ["train", "--recipe", "smoke", "--set", "rounds=500", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".run.partial-*/metrics.csv")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(tmp_path.glob(".run.partial-*")), "the run never started its first round"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))


def test_models_lists_the_recipe_zoo_with_measured_sizes(monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app
    from pfl.models import build_model, count_parameters

    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["models", "--recipe", "smoke", "--set", "model_zoo=mixed-small"], terminal_width=200)
    assert res.exit_code == 0, res.stdout
    for name in ("cnn1", "resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "vit_mini"):
        line = next(line for line in res.stdout.splitlines() if f" {name} " in line)
        assert f"{count_parameters(build_model(name, (1, 16, 16), 4, 500)):,}" in line, line
    assert "cnn2" not in res.stdout
