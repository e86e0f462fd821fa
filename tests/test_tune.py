"""`pfl tune` and the tuned comparison: validation-only objective (test labels cannot change a thing), a study
that continues where it stopped without repeating trials, pruning of a lagging trial, bad --space refused."""

import csv
import json
import math
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import optuna
import pytest
import torch

from pfl import build as build_mod
from pfl import tune
from pfl.build import Hardware
from pfl.parallel import Resources
from tests.test_cli import ENV, PFL, pfl

REPO = Path(__file__).resolve().parents[1]
ONE_JOB = Resources(jobs=1, cpus_per_run=1)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _plan(out: Path, trials: int, space=("lr=log:0.005:0.2", "pfedlora.mu=0.5:1.0"), rounds: int = 2):
    return tune.plan_tune("smoke", [], "pfedlora", list(space), trials, 1, None, rounds, None, out)


def test_tuning_never_reads_test_data(tmp_path, monkeypatch):
    """Every client's test labels replaced by random labels: the same trials, objectives and best values."""
    first = tune.run_study(_plan(tmp_path / "a", 3), Hardware(), ONE_JOB)
    real_build_clients = build_mod.build_clients

    def scrambled(dataset, cfg):
        clients = real_build_clients(dataset, cfg)
        generator = torch.Generator().manual_seed(123)
        for c in clients:
            c.y_test = torch.randint(0, dataset.num_classes, c.y_test.shape, generator=generator)
            c.x_test = torch.randint(0, 256, c.x_test.shape, generator=generator, dtype=torch.uint8)
        return clients

    monkeypatch.setattr(build_mod, "build_clients", scrambled)
    second = tune.run_study(_plan(tmp_path / "b", 3), Hardware(), ONE_JOB)
    assert rows(tmp_path / "a" / "trials.csv") == rows(tmp_path / "b" / "trials.csv")
    assert first.best_values == second.best_values and first.best_objective == second.best_objective
    metrics = rows(next((tmp_path / "a" / "trials").glob("trial-*/seed-0")) / "metrics.csv")
    assert all(r["acc_mean"] == "" and r["val_acc_mean"] for r in metrics)  # test never evaluated
    best = (tmp_path / "a" / "best.toml").read_text()
    assert "val_fraction = 0.0" in best and "eval_test = true" in best and "rounds = 3" in best
    assert 0.5 < first.best_objective <= 1.0


@pytest.mark.heavy
def test_a_continued_study_grows_and_repeats_no_trial(tmp_path):
    out = tmp_path / "tune"
    res = pfl("tune", "--recipe", "smoke", "--method", "standalone", "--trials", "2", "--set", "rounds=2",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    before = rows(out / "trials.csv")
    res = pfl("tune", "--recipe", "smoke", "--method", "standalone", "--trials", "4", "--set", "rounds=2",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    after = rows(out / "trials.csv")
    assert [r["trial"] for r in after] == ["0", "1", "2", "3"] and after[:2] == before
    params = [tuple(r[k] for k in ("lr", "weight_decay", "momentum")) for r in after]
    assert len(set(params)) == 4
    assert "pfl tune standalone: 4 trials" in res.stdout


@pytest.mark.heavy
def test_a_killed_tune_resumes_its_running_trial(tmp_path):
    """SIGKILL during trial 1 (after its checkpoint of round 2): the same command finishes trial 1 from its
    checkpoint and the study ends with exactly the trials asked for."""
    out = tmp_path / "tune"
    args = ["tune", "--recipe", "smoke", "--method", "standalone", "--trials", "2", "--set", "rounds=8",
            "--set", "checkpoint_every=1", "--set", "synthetic.num_samples=1200", "--out", str(out)]
    proc = subprocess.Popen(PFL + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=REPO)
    deadline, killed = time.monotonic() + 240, False
    while proc.poll() is None and time.monotonic() < deadline:
        pointer = out / "trials" / "trial-0001"
        stagings = list(pointer.glob(".seed-0.partial-*")) if pointer.exists() else []
        if stagings and (stagings[0] / "checkpoint.json").exists() and \
                json.loads((stagings[0] / "checkpoint.json").read_text())["round"] >= 2:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed, proc.stderr.read()
    storage = tune._storage(out)
    states = [t.state.name for t in optuna.load_study(study_name=tune.STUDY_NAME, storage=storage).trials]
    assert states == ["COMPLETE", "RUNNING"]
    res = pfl(*args)
    assert res.returncode == 0, res.stderr
    assert "trial 1: resumed from round" in res.stdout.replace("standalone ", "")
    final = rows(out / "trials.csv")
    assert [r["trial"] for r in final] == ["0", "1"] and all(r["state"] == "complete" for r in final)


def test_a_lagging_trial_is_pruned(tmp_path):
    """Two trials with a good learning rate, then one that cannot learn: the median pruner stops the third
    at its first evaluated round, and its partial run is removed."""
    plan = tune.plan_tune("smoke", [], "standalone", ["lr=log:1e-7:0.1"], 3, 1, None, 3, None, tmp_path / "t")
    plan.out.mkdir(parents=True)
    study = optuna.create_study(study_name=tune.STUDY_NAME, storage=tune._storage(plan.out), direction="maximize")
    for lr in (0.05, 0.05, 1e-7):
        study.enqueue_trial({"lr": lr})
    result = tune.run_study(plan, Hardware(), ONE_JOB)
    states = [(r["state"], int(r["rounds_run"])) for r in result.rows]
    assert states == [("complete", 3), ("complete", 3), ("pruned", 1)]
    assert not list((plan.out / "trials" / "trial-0002").iterdir())
    assert result.best_values == {"lr": 0.05} and not math.isnan(result.best_objective)


BAD = [
    (["--space", "rounds=1:5"], "--space 'rounds=1:5': 'rounds' is not a hyperparameter of pfedlora"),
    (["--space", "bogus=1:2"], "--space 'bogus=1:2': unknown recipe key 'bogus'"),
    (["--space", "lr=log:0:0.1"], "recipe key 'lr': must be a number > 0"),
    (["--space", "lr=0.1:0.01"], "LOW must be below HIGH"),
    (["--space", "lr=wide:0.1:0.2"], "unknown prefix 'wide'"),
    (["--space", "pfedlora.rank=8"], "at least two choices"),
    (["--space", "pfedlora.rank=4,600"], "recipe key 'pfedlora.rank': must be an integer in [1, 500]"),
    (["--space", "lr"], "expected KEY=SPEC"),
    (["--trials", "0"], "--trials: must be an integer >= 1"),
    (["--jobs", "0"], "--jobs: must be an integer >= 1"),
    (["--val-fraction", "0.9"], "--val-fraction: must be a number > 0 and <= 0.5"),
    (["--set", "seed=3"], "--set: 'seed' is chosen by pfl tune"),
    (["--method", "bogus"], "--method: unknown method 'bogus'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_tune_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    base = ["tune", "--recipe", "smoke"] + ([] if "--method" in args else ["--method", "pfedlora"])
    res = CliRunner().invoke(app, [*base, *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_method_has_a_default_space_of_the_same_size(tmp_path):
    from pfl.algorithms import ALGORITHMS

    sizes = set()
    for name in ALGORITHMS:
        recipe = {"fedavg": ["model_setting=homogeneous"]}.get(name, [])
        plan = tune.plan_tune("smoke", recipe, name, None, 2, 1, None, 1, None, tmp_path / name)
        assert "lr" in plan.space
        sizes.add(len(plan.space))
    assert sizes == {3}


@pytest.mark.heavy
def test_compare_tunes_every_method_with_the_same_budget_then_runs_the_seeds(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--recipe", "smoke", "--methods", "pfedlora,standalone", "--seeds", "2", "--set", "rounds=2",
            "--tune-trials", "2", "--tune-rounds", "1", "--out", str(out)]
    res = pfl(*args)
    assert res.returncode == 0, res.stderr
    with open(out / "comparison.csv", newline="") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    for method in ("pfedlora", "standalone"):
        best = tune.load_best(out / "tune" / method)
        assert table[method]["tuned"] == "; ".join(f"{k}={v}" for k, v in best.items())
        assert len(rows(out / "tune" / method / "trials.csv")) == 2
        summary = json.loads((out / "runs" / f"{method}-seed1" / "summary.json").read_text())
        assert summary["tuned"]["values"] == best
        cfg = (out / "runs" / f"{method}-seed1" / "config.toml").read_text()
        assert f"lr = {best['lr']}" in cfg and "val_fraction = 0.0" in cfg
    res = pfl(*args)  # everything reused
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("reusing finished run") == 4


def test_an_entrys_fixed_keys_leave_its_search_space_and_hold_in_every_trial(tmp_path):
    """`pfedlora(mu=0.5)`: pFedLoRA's default space (lr, alpha, mu) without mu; mu = 0.5 in the trials' recipe
    and in best.toml's; a plain entry keeps the whole space under tune/<method> as before."""
    from pfl.compare import parse_entries

    plain, fixed = tune.plan_comparison("smoke", ["rounds=2"], parse_entries("pfedlora, pfedlora(mu=0.5)"), None, 2,
                                        1, tmp_path)
    assert list(plain.space) == ["lr", "pfedlora.alpha", "pfedlora.mu"] and plain.out == tmp_path / "tune" / "pfedlora"
    assert list(fixed.space) == ["lr", "pfedlora.alpha"] and fixed.out == tmp_path / "tune" / "pfedlora-mu=0.5"
    assert fixed.trial_flat["pfedlora.mu"] == 0.5 and fixed.final_flat["pfedlora.mu"] == 0.5
    assert fixed.label == "pfedlora(mu=0.5)" and fixed.trial_flat["rounds"] == 1


def test_compare_tunes_each_entry_without_its_fixed_keys_and_skips_one_that_fixes_them_all(tmp_path, monkeypatch):
    """pFedLoRA's space narrowed to its own two keys (alpha, mu), so that an entry can fix all of it: the entry
    fixing mu is tuned on alpha alone with mu = 0.5 in every trial and in its seeds; the one fixing both is not
    tuned, and its row says so."""
    from typer.testing import CliRunner

    from cli.main import app
    from pfl import compare as cmp
    from pfl.algorithms import ALGORITHMS

    monkeypatch.setattr(ALGORITHMS["pfedlora"], "SHARED_SEARCH_SPACE", {})
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", "--recipe", "smoke", "--methods", "pfedlora(mu=0.5), pfedlora(alpha=16, "
                                   "mu=0.5)", "--set", "rounds=2", "--tune-trials", "2", "--tune-rounds", "1", "--out",
                                   str(out)])
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    assert f"pfedlora(alpha=16, mu=0.5): {cmp.NOT_TUNED}" in " ".join(res.stdout.split())
    assert sorted(p.name for p in (out / "tune").iterdir()) == ["pfedlora-mu=0.5"]  # nothing to tune for the other
    study = out / "tune" / "pfedlora-mu=0.5"
    assert list(json.loads((study / "tune.json").read_text())["space"]) == ["pfedlora.alpha"]
    trials = [tomllib.loads(p.read_text())["pfedlora"] for p in sorted(study.glob("trials/trial-*/seed-0/config.toml"))]
    assert len(trials) == 2 and all(t["mu"] == 0.5 for t in trials) and trials[0]["alpha"] != trials[1]["alpha"]
    best = tune.load_best(study)
    assert list(best) == ["pfedlora.alpha"]
    with open(out / "comparison.csv", newline="") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert table["pfedlora(mu=0.5)"]["tuned"] == f"pfedlora.alpha={best['pfedlora.alpha']}"
    assert table["pfedlora(alpha=16, mu=0.5)"]["tuned"] == cmp.NOT_TUNED
    seeds = {slug: tomllib.loads((out / "runs" / f"{slug}-seed0" / "config.toml").read_text())["pfedlora"]
             for slug in ("pfedlora-mu=0.5", "pfedlora-alpha=16-mu=0.5")}
    assert seeds["pfedlora-mu=0.5"]["mu"] == 0.5 and seeds["pfedlora-mu=0.5"]["alpha"] == best["pfedlora.alpha"]
    assert seeds["pfedlora-alpha=16-mu=0.5"]["alpha"] == 16 and seeds["pfedlora-alpha=16-mu=0.5"]["mu"] == 0.5
    summary = json.loads((out / "runs" / "pfedlora-alpha=16-mu=0.5-seed0" / "summary.json").read_text())
    assert summary["tuned"] == {"values": {}, "not_tuned": cmp.NOT_TUNED}


def test_a_validation_split_is_recorded_beside_the_test_split(tmp_path, make_cfg):
    from pfl.run import train

    plain = train(make_cfg(), tmp_path / "plain", Hardware())
    cfg = make_cfg({"val_fraction": 0.25})
    summary = train(cfg, tmp_path / "val", Hardware())
    metrics = rows(tmp_path / "val" / "metrics.csv")
    assert all(0 < float(r["val_acc_mean"]) <= 1 and r["acc_mean"] for r in metrics)
    assert summary["validation"]["fraction"] == 0.25 and summary["validation"]["final"]["round"] == 2
    per_client = rows(tmp_path / "val" / "per_client.csv")
    before = rows(tmp_path / "plain" / "per_client.csv")
    for mine, theirs in zip(per_client, before):
        assert mine["num_test"] == theirs["num_test"]  # the same test split
        assert int(mine["num_train"]) + int(mine["num_val"]) == int(theirs["num_train"])
        assert abs(int(mine["num_val"]) / int(theirs["num_train"]) - 0.25) < 0.05
    assert "val_acc_mean" not in rows(tmp_path / "plain" / "metrics.csv")[0] and "validation" not in plain
