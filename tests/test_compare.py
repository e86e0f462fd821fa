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


@pytest.mark.heavy
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
    (["--recipe", "smoke", "--methods", "pfedlora,pfedlora"], "--methods: 'pfedlora' is listed twice"),
    (["--recipe", "smoke", "--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--recipe", "smoke", "--set", "method=fml"], "--set: 'method' and 'seed' are chosen by"),
    (["--recipe", "smoke", "--methods", "fedavg"], "recipe key 'model_setting': method fedavg"),
    (["--recipe", "smoke", "--set", "fml.alpha=2"], "recipe key 'fml.alpha'"),
    ([], "give either --recipe"),
    (["--recipe", "smoke", "--from", "."], "give either --recipe"),
    (["--from", "/nonexistent"], "--from: '/nonexistent' is neither a pfl run directory"),
    # entries: method(key=value, ...) with the method's own settings
    (["--recipe", "smoke", "--methods", "pfedlora(bogus=1)"],
     "--methods: entry 'pfedlora(bogus=1)': 'bogus' is not a setting of pfedlora (its settings: rank, alpha, mu,"),
    (["--recipe", "smoke", "--methods", "standalone(lr=0.1)"],
     "--methods: entry 'standalone(lr=0.1)': 'lr' is not a setting of standalone (standalone has no settings"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank=0)"],
     "--methods: entry 'pfedlora(rank=0)': recipe key 'pfedlora.rank': must be an integer >= 1, got 0"),
    (["--recipe", "smoke", "--methods", "pfedlora, pfedlora(rank=600)"],  # the method's cross check
     "--methods: entry 'pfedlora(rank=600)': recipe key 'pfedlora.rank': must be an integer in [1, 500]"),
    (["--recipe", "smoke", "--methods", "pfedlora(inference_adapter=mine)"],
     "--methods: entry 'pfedlora(inference_adapter=mine)': recipe key 'pfedlora.inference_adapter': must be one of"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank=4, mu=0.5"],
     "--methods: entry 'pfedlora(rank=4, mu=0.5': unbalanced parentheses"),
    (["--recipe", "smoke", "--methods", "pfedlora), standalone"], "--methods: entry 'pfedlora)': unbalanced"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank=4)x"],
     "--methods: entry 'pfedlora(rank=4)x': expected pfedlora(key=value, ...) with nothing after its ')'"),
    (["--recipe", "smoke", "--methods", "pfedlora,,standalone"],
     "--methods: entry 2 of 'pfedlora,,standalone' is empty; give a method, a group (paper, later, all) or"),
    (["--recipe", "smoke", "--methods", "pfedlora()"], "--methods: entry 'pfedlora()': nothing inside the paren"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank)"],
     "--methods: entry 'pfedlora(rank)': expected key=value inside the parentheses, got 'rank'"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank=4, rank=8)"], "'pfedlora(rank=4, rank=8)': 'rank' is given"),
    (["--recipe", "smoke", "--methods", "pfedlora(rank=4), pfedlora( rank = 4 )"],
     "--methods: 'pfedlora(rank=4)' is listed twice"),
    (["--recipe", "smoke", "--methods", "paper,pfedlora"], "'pfedlora' is listed twice (the group paper includes it)"),
    (["--recipe", "smoke", "--methods", "paper(rank=4)"],
     "--methods: entry 'paper(rank=4)': paper is a group of methods; settings go on one method"),
    (["--recipe", "smoke", "--methods", "bogus(rank=4)"], "--methods: unknown method 'bogus' in 'bogus(rank=4)'"),
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


def test_all_fifteen_methods_finish_a_comparison(tmp_path):
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
                          "fd", "fedtgp", "fedmrl", "pfedes", "fedssa", "pfedafm", "fedgen", "fedl2g"]
    for method, row in rows.items():
        assert 0.25 < float(row["final_acc_mean"]) <= 1.0, method  # 4 classes: above chance
    assert float(rows["standalone"]["bytes_per_round"]) == 0
    assert all(float(r["bytes_per_round"]) > 0 for m, r in rows.items() if m != "standalone")


# ------------------------------------------------------------------ entries: a method with its own settings

ENTRIES = "pfedlora(mu=0.5), standalone,pfedlora( rank = 4 ,inference_adapter=global)"
LABELS = ["pfedlora(mu=0.5)", "standalone", "pfedlora(rank=4, inference_adapter=global)"]
SLUGS = ["pfedlora-mu=0.5", "standalone", "pfedlora-rank=4-inference_adapter=global"]
ENTRY_ARGS = ["--recipe", "smoke", "--methods", ENTRIES, "--seeds", "2", "--set", "rounds=2",
              "--set", "target_accuracy=0.5"]


def invoke(*args):
    """`pfl` in this process (Typer's runner), as test_bad_compare_input_exits_2_with_one_line does."""
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, list(args))


def table_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def entry_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("entries") / "cmp"
    res = invoke("compare", *ENTRY_ARGS, "--out", str(out))
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    return out, res


def test_entries_name_their_rows_runs_and_pair_with_the_first_entry(entry_comparison):
    import tomllib

    out, res = entry_comparison
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{slug}-seed{s}" for slug in SLUGS
                                                                      for s in (0, 1))
    rows = table_rows(out / "comparison.csv")
    assert [r["method"] for r in rows] == LABELS  # the entries' order: the first is the reference
    by_label = {r["method"]: r for r in rows}
    final = {}
    for label, slug in zip(LABELS, SLUGS):
        for s in (0, 1):
            run = out / "runs" / f"{slug}-seed{s}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["entry"] == label
            final[label, s] = summary["final"]["acc_mean"]
            recipe = tomllib.loads((run / "config.toml").read_text())
            assert recipe["method"] == label.partition("(")[0]
            if label.startswith("pfedlora"):  # the entry's settings, the recipe's others
                assert (recipe["pfedlora"]["mu"], recipe["pfedlora"]["rank"], recipe["pfedlora"]["inference_adapter"]) \
                    == ((0.5, 8, "own") if label == LABELS[0] else (1.0, 4, "global"))
    first = LABELS[0]
    for label in LABELS:
        paired = [final[label, s] - final[first, s] for s in (0, 1)]
        assert float(by_label[label][f"final_minus_{first}_mean"]) == pytest.approx(statistics.mean(paired))
        assert by_label[label]["paired_seeds"] == "2"
    assert by_label[first][f"differs_from_{first}"] == ""
    assert by_label["standalone"][f"differs_from_{first}"] in ("yes", "no")
    # rank 4: 4 clients x (4 x 500 + 4 x 4) float32 adapter parameters, up and down; rank 8 for the first
    assert float(by_label[LABELS[2]]["bytes_per_round"]) == 2 * 4 * 4 * (4 * 500 + 4 * 4)
    assert float(by_label[first]["bytes_per_round"]) == 2 * 4 * 4 * (8 * 500 + 4 * 8)
    md = (out / "comparison.md").read_text()
    assert all(f"| {label} |" in md for label in LABELS) and f"| final - {first} [95% CI] (seeds) |" in md
    printed = " ".join(res.stdout.split())
    assert f"ratios in brackets: method / {first};" in printed
    assert all(label in res.stdout for label in ("pfedlora(mu=0.5)", "standalone")), res.stdout


def test_from_rebuilds_an_entry_comparison_and_every_legend_names_the_entries(entry_comparison, tmp_path,
                                                                                monkeypatch):
    from pfl import pictures

    out, _ = entry_comparison
    legends = {}
    real_save = pictures._save

    def save(figure, path):
        legend = figure.axes[0].get_legend()
        legends[path.name] = [t.get_text() for t in legend.get_texts()]
        return real_save(figure, path)

    monkeypatch.setattr(pictures, "_save", save)
    res = invoke("compare", "--from", str(out), "--out", str(tmp_path / "again"))
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    assert table_rows(tmp_path / "again" / "comparison.csv") == table_rows(out / "comparison.csv")
    assert legends["accuracy_vs_round.png"] == [*LABELS, "target 50%"]
    assert legends["accuracy_vs_bytes.png"] == [LABELS[0], "standalone (sends nothing; final level)", LABELS[2],
                                                "target 50%"]
    assert legends["per_client.png"] == LABELS
    # the runs again, this time from the same directory: the same table, every run reused
    res = invoke("compare", *ENTRY_ARGS, "--out", str(out))
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    assert res.stdout.count("reusing finished run") == 6
    assert table_rows(tmp_path / "again" / "comparison.csv") == table_rows(out / "comparison.csv")


def test_from_with_methods_picks_and_orders_entries_and_pairs_with_the_first(entry_comparison, tmp_path):
    out, _ = entry_comparison
    view = tmp_path / "view"
    res = invoke("compare", "--from", str(out), "--methods", f"standalone, {LABELS[0]}", "--out", str(view))
    assert res.exit_code == 0, (res.stdout[-2000:], res.stderr[-2000:], res.exception)
    rows = table_rows(view / "comparison.csv")
    assert [r["method"] for r in rows] == ["standalone", LABELS[0]]
    final = {(label, s): json.loads((out / "runs" / f"{slug}-seed{s}" / "summary.json").read_text())["final"]
             ["acc_mean"] for label, slug in zip(LABELS, SLUGS) for s in (0, 1)}
    paired = [final[LABELS[0], s] - final["standalone", s] for s in (0, 1)]
    assert float(rows[1]["final_minus_standalone_mean"]) == pytest.approx(statistics.mean(paired))
    assert table_rows(out / "comparison.csv")[0]["method"] == LABELS[0]  # the source's own table untouched
    res = invoke("compare", "--from", str(out), "--methods", "standalone, fml", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    assert "--methods: 'fml' has no finished run in --from; the runs there: pfedlora(mu=0.5), " in \
        " ".join(res.stderr.split())


def test_one_entrys_seeds_must_agree_but_entries_of_a_method_differ(entry_comparison, tmp_path):
    """Two entries of pFedLoRA differ in its settings on purpose; a run labelled as one of them with another
    learning rate is refused by label."""
    out, _ = entry_comparison
    odd = tmp_path / "odd"
    res = invoke("train", "--recipe", "smoke", "--set", "rounds=2", "--set", "target_accuracy=0.5", "--set",
                 "pfedlora.mu=0.5", "--set", "lr=0.02", "--seed", "7", "--out", str(odd))
    assert res.exit_code == 0, (res.stderr[-2000:], res.exception)
    summary = json.loads((odd / "summary.json").read_text())
    (odd / "summary.json").write_text(json.dumps({**summary, "entry": LABELS[0]}))
    res = invoke("compare", "--from", str(out), str(odd), "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and f"of {LABELS[0]} differ in 'lr'" in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()
