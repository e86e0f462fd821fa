"""`pfl compare` as a user runs it: the table's numbers come from the runs, finished runs are reused, and
comparisons of runs made under different protocols are refused."""

import csv
import json
import statistics

import pytest

from tests.test_cli import pfl

ARGS = ["--recipe", "smoke", "--methods", "pfedlora,standalone", "--seeds", "2",
        "--set", "rounds=2", "--set", "target_accuracy=0.5"]


def read_csv(path):
    with open(path, newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    res = pfl("compare", *ARGS, "--out", str(out))
    assert res.returncode == 0, (res.stdout, res.stderr)
    return out, res


def test_compare_runs_every_method_and_seed_and_writes_table_and_plots(comparison):
    out, res = comparison
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["pfedlora-seed0", "pfedlora-seed1", "standalone-seed0", "standalone-seed1"]
    for name in ("comparison.csv", "comparison.md", "accuracy_vs_round.png", "accuracy_vs_bytes.png",
                 "per_client.png"):
        assert (out / name).stat().st_size > 0, name
    assert "comparison" in res.stdout and "pfedlora" in res.stdout and "standalone" in res.stdout
    rows = read_csv(out / "comparison.csv")
    for method, row in rows.items():
        summaries = [json.loads((out / "runs" / f"{method}-seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        finals = [s["final"]["acc_mean"] for s in summaries]
        assert float(row["final_acc_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(row["final_acc_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(row["bytes_per_round"]) == pytest.approx(
            statistics.mean((s["bytes_up_total"] + s["bytes_down_total"]) / 2 for s in summaries))
        assert row["seeds"] == "2"
    assert list(rows) == ["pfedlora", "standalone"]
    finals = {(m, s): json.loads((out / "runs" / f"{m}-seed{s}" / "summary.json").read_text())["final"]["acc_mean"]
              for m in rows for s in (0, 1)}
    paired = [finals["standalone", s] - finals["pfedlora", s] for s in (0, 1)]
    assert float(rows["standalone"]["final_minus_pfedlora_mean"]) == pytest.approx(statistics.mean(paired))
    assert float(rows["standalone"]["final_minus_pfedlora_std"]) == pytest.approx(statistics.stdev(paired))
    assert float(rows["standalone"]["bytes_per_round"]) == 0
    # 4 clients x (8 x 500 + 4 x 8) float32 adapter parameters, up and down
    assert float(rows["pfedlora"]["bytes_per_round"]) == 2 * 4 * 4 * (8 * 500 + 4 * 8)
    if rows["pfedlora"]["flops_to_target"]:
        assert float(rows["pfedlora"]["flops_to_target_vs_pfedlora"]) == pytest.approx(1.0)
    md = (out / "comparison.md").read_text()
    assert "| pfedlora |" in md and "seeds 0, 1" in md


def test_rerunning_reuses_finished_runs(comparison):
    out, _ = comparison
    stamps = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    before = read_csv(out / "comparison.csv")
    res = pfl("compare", *ARGS, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("reusing finished run") == 4
    assert stamps == {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert read_csv(out / "comparison.csv") == before


def test_from_builds_the_same_table_from_existing_runs(comparison, tmp_path):
    out, _ = comparison
    res = pfl("compare", "--from", str(out), "--out", str(tmp_path / "again"))
    assert res.returncode == 0, res.stderr
    assert read_csv(tmp_path / "again" / "comparison.csv") == read_csv(out / "comparison.csv")
    # single run directories, several after one --from
    res = pfl("compare", "--from", str(out / "runs" / "pfedlora-seed0"), str(out / "runs" / "standalone-seed0"),
              "--out", str(tmp_path / "pair"))
    assert res.returncode == 0, res.stderr
    assert set(read_csv(tmp_path / "pair" / "comparison.csv")) == {"pfedlora", "standalone"}


def test_a_different_recipe_in_the_same_out_is_refused_and_changes_nothing(comparison):
    out, _ = comparison
    before = sorted(p.name for p in out.rglob("*"))
    res = pfl("compare", *ARGS, "--set", "lr=0.05", "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: --out: the finished run") and "lr=0.01" in res.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_runs_of_different_protocols_cannot_be_compared(comparison, tmp_path):
    out, _ = comparison
    other = tmp_path / "other"
    res = pfl("train", "--recipe", "smoke", "--set", "rounds=2", "--set", "test_fraction=0.3", "--set", "method=fml",
              "--set", "target_accuracy=0.5", "--out", str(other))
    assert res.returncode == 0, res.stderr
    res = pfl("compare", "--from", str(out), str(other), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "differ in recipe key 'test_fraction'" in res.stderr
    assert not (tmp_path / "x").exists()


def test_methods_may_differ_in_hyperparameters_but_not_between_their_own_seeds(comparison, tmp_path):
    """Tuned comparisons run each method with its own learning rate; one method's seeds must agree."""
    out, _ = comparison
    fml = tmp_path / "fml"
    res = pfl("train", "--recipe", "smoke", "--set", "rounds=2", "--set", "target_accuracy=0.5", "--set", "lr=0.02",
              "--set", "method=fml", "--out", str(fml))
    assert res.returncode == 0, res.stderr
    res = pfl("compare", "--from", str(out), str(fml), "--out", str(tmp_path / "x"))
    assert res.returncode == 0, res.stderr
    assert "per method: lr pfedlora 0.01, standalone 0.01, fml 0.02" in (tmp_path / "x" / "comparison.md").read_text()
    odd = tmp_path / "odd"
    res = pfl("train", "--recipe", "smoke", "--set", "rounds=2", "--set", "target_accuracy=0.5", "--set", "lr=0.02",
              "--set", "method=standalone", "--seed", "7", "--out", str(odd))
    assert res.returncode == 0, res.stderr
    res = pfl("compare", "--from", str(out), str(odd), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and "of standalone differ in 'lr'" in res.stderr


BAD = [
    (["--recipe", "smoke", "--methods", "pfedlora,bogus"], "--methods: unknown method 'bogus'"),
    (["--recipe", "smoke", "--methods", "pfedlora,pfedlora"], "--methods: a method is listed twice"),
    (["--recipe", "smoke", "--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--recipe", "smoke", "--set", "method=fml"], "--set: 'method' and 'seed' are chosen by"),
    (["--recipe", "smoke", "--methods", "fedavg"], "recipe key 'model_setting': method fedavg"),
    (["--recipe", "smoke", "--set", "fml.alpha=2"], "recipe key 'fml.alpha'"),
    ([], "give either --recipe"),
    (["--recipe", "smoke", "--from", "."], "give either --recipe"),
    (["--from", "/nonexistent"], "--from: '/nonexistent' is neither a pfl run directory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_compare_input_exits_2_with_one_line(tmp_path, monkeypatch, args, message):
    """In-process (Typer's runner: the `pfl` command's code path without a Python start per row)."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["compare", *args, "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "runs").exists()


def test_all_thirteen_methods_finish_a_comparison(tmp_path):
    """Smaller than the smoke recipe (half its data, pFedES's extractor phase 1 epoch longer than the local one,
    not 10): the point is that every method goes through compare, not how well it learns."""
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "all"
    res = CliRunner().invoke(app, ["compare", "--recipe", "smoke", "--methods", "all", "--set", "rounds=2", "--set",
                                   "synthetic.num_samples=400", "--set", "pfedes.extra_epochs=1", "--out", str(out)])
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    rows = read_csv(out / "comparison.csv")
    assert list(rows) == ["pfedlora", "standalone", "lg_fedavg", "fml", "fedkd", "fedproto", "fedgh",
                          "fd", "fedtgp", "fedmrl", "pfedes", "fedssa", "pfedafm"]
    for method, row in rows.items():
        assert 0.25 < float(row["final_acc_mean"]) <= 1.0, method  # 4 classes: above chance
    assert float(rows["standalone"]["bytes_per_round"]) == 0
    assert all(float(r["bytes_per_round"]) > 0 for m, r in rows.items() if m != "standalone")
