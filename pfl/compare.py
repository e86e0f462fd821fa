"""`pfl compare`: several methods on the same recipe, partitions and seeds; one table and three plots.

Layout of a comparison directory:

    runs/<method>-seed<S>/   an ordinary run directory per (method, seed), written by `pfl.run.train`
    comparison.csv           one row per method: accuracy mean and std over seeds, costs, to-target costs
    comparison.md            the same table in Markdown, with the protocol it was measured under
    accuracy_vs_round.png    mean accuracy per round (mean over seeds, band: min-max over seeds)
    accuracy_vs_bytes.png    mean accuracy against bytes communicated so far (both directions)
    per_client.png           every method's final accuracy per client (mean over seeds), side by side

A finished run (it has summary.json, which `train` writes last) is reused when the comparison is run
again with the same output directory, after checking that it was made with the same resolved recipe.
Ratios compare each method with pFedLoRA as "method / pFedLoRA", so 7.4 means the method needed 7.4x
what pFedLoRA needed (the paper's "7.41x less communication").
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pfl import config as config_mod
from pfl.algorithms import ALGORITHMS, LATER_METHODS, PAPER_METHODS
from pfl.config import HYPERPARAMETERS
from pfl.errors import ConfigError, PflUserError, RunDirError, RunFailed
from pfl.files import atomic_write
from pfl.parallel import RunOutcome, RunSpec, check_reusable, finished, run_all
from pfl.pictures import plot_client_comparison, plot_comparison
from pfl.rundir import load_run_config, read_per_client
from pfl.schema import Config

REFERENCE = "pfedlora"
# The protocol, which every run of one comparison must share, is what a run computes (config.computation)
# except the comparison's own axes: method, seed and a method's hyperparameters (config.HYPERPARAMETERS and
# its own table; each method may run with its own (tuned) values, the same for all its seeds; values that
# differ between methods are listed with the table).


@dataclass
class RunRecord:
    method: str
    seed: int
    run_dir: Path
    config: Config
    summary: dict[str, Any]
    history: list[dict[str, float]]


def run_dir_for(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


def plan(recipe: str, overrides: list[str], methods: list[str], seeds: int,
         seed: int | None = None, tuned_values: dict[str, dict[str, Any]] | None = None
         ) -> list[tuple[str, int, Config, str]]:
    """(method, seed, resolved config, recipe source) for every run, all validated before any runs.
    `tuned_values`: per method, recipe keys set to what tuning found (on top of --set)."""
    unknown = [m for m in methods if m not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(ALGORITHMS))}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: a method is listed twice: {','.join(methods)}")
    raw, source = config_mod.read_recipe_file(recipe)
    parsed = dict(config_mod.parse_override(o) for o in overrides)
    if "method" in parsed or "seed" in parsed:
        raise ConfigError("--set: 'method' and 'seed' are chosen by --methods and --seeds in `pfl compare`")
    first = config_mod.resolve(raw, {**parsed, **({"seed": seed} if seed is not None else {})}).seed
    runs = []
    for s in range(first, first + seeds):
        for m in methods:
            tuned = (tuned_values or {}).get(m, {})
            runs.append((m, s, config_mod.resolve(raw, {**parsed, **tuned, "method": m, "seed": s}), source))
    return runs


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]


def load_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        history = read_metrics(run_dir / "metrics.csv")
    except FileNotFoundError as exc:
        raise RunDirError(f"'{run_dir}' is not a finished pfl run: {Path(exc.filename).name} is missing") from None
    except (json.JSONDecodeError, ValueError, csv.Error) as exc:
        raise RunDirError(f"'{run_dir}': summary.json or metrics.csv is unreadable: {exc}") from None
    if not history or "flops_cumulative" not in history[0]:
        raise RunDirError(f"'{run_dir}': metrics.csv has no cost columns; it was written by an older pfl")
    return RunRecord(cfg.method, cfg.seed, run_dir, cfg, summary, history)


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Runs from run directories and/or comparison directories (their runs/ subdirectories)."""
    records = []
    for path in paths:
        path = Path(path)
        if (path / "config.toml").is_file():
            records.append(load_run(path))
        elif (path / "runs").is_dir():
            found = sorted(p for p in (path / "runs").iterdir() if p.is_dir() and finished(p))
            if not found:
                raise RunDirError(f"--from: '{path}' has no finished runs under runs/")
            records += [load_run(p) for p in found]
        else:
            raise RunDirError(f"--from: '{path}' is neither a pfl run directory nor a comparison directory")
    seen = {}
    for r in records:
        if (r.method, r.seed) in seen:
            raise RunDirError(f"--from: two runs of {r.method} with seed {r.seed}: '{seen[r.method, r.seed]}' "
                              f"and '{r.run_dir}'")
        seen[r.method, r.seed] = r.run_dir
    check_comparable(records)
    return records


def _protocol(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in config_mod.computation(cfg.as_flat()).items()
            if k not in ("method", "seed") and k not in HYPERPARAMETERS and k.split(".")[0] not in ALGORITHMS}


def _hyperparameters(cfg: Config) -> dict[str, Any]:
    """The shared hyperparameters and the method's own table."""
    flat = cfg.as_flat()
    return {k: v for k, v in flat.items() if k in HYPERPARAMETERS or k.startswith(cfg.method + ".")}


def check_comparable(records: list[RunRecord]) -> None:
    """Every run must share the protocol (data, partition, N, C, rounds, optimiser, ...)."""
    first = records[0]
    base = _protocol(first.config)
    for r in records[1:]:
        other = _protocol(r.config)
        key = config_mod.first_difference(base, other)
        if key is not None:
            raise RunDirError(f"runs '{first.run_dir}' and '{r.run_dir}' differ in recipe key '{key}' "
                              f"({base.get(key)!r} vs {other.get(key)!r}); they cannot be compared")
    settings: dict[str, tuple[Path, dict[str, Any]]] = {}
    for r in records:
        mine = _hyperparameters(r.config)
        if r.method in settings and settings[r.method][1] != mine:
            other_dir, theirs = settings[r.method]
            key = config_mod.first_difference(mine, theirs)
            raise RunDirError(f"runs '{other_dir}' and '{r.run_dir}' of {r.method} differ in '{key}' "
                              f"({theirs.get(key)!r} vs {mine.get(key)!r}); every seed of a method must use the "
                              f"same settings")
        settings[r.method] = (r.run_dir, mine)


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


# Names `--methods` accepts for groups of methods.
METHOD_GROUPS = {"paper": PAPER_METHODS, "later": LATER_METHODS, "all": PAPER_METHODS + LATER_METHODS}


def method_names(text: str | None) -> list[str]:
    """`--methods`: comma-separated names and groups (paper: pFedLoRA and its six baselines; later: the six
    later methods; all: both, thirteen); default paper."""
    names: list[str] = []
    for item in (text or "paper").split(","):
        item = item.strip()
        names.extend(METHOD_GROUPS.get(item, (item,)) if item else ())
    return names


def _method_order(record: RunRecord) -> tuple[int, str, int]:
    """pFedLoRA first, then the baselines in the paper's order, the later methods, any other; seeds ascending."""
    order = {m: i for i, m in enumerate(PAPER_METHODS + LATER_METHODS)}
    return order.get(record.method, len(order)), record.method, record.seed


def _by_method(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Each method's runs, methods and seeds in `_method_order`."""
    by_method: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=_method_order):
        by_method.setdefault(r.method, []).append(r)
    return by_method


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval of the mean of paired differences (n - 1 degrees of freedom); NaN below 2 pairs."""
    if len(diffs) < 2:
        return math.nan, math.nan
    from scipy.stats import t

    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return mean - half, mean + half


def summarise(records: list[RunRecord], failures: list[tuple[str, int, str]] | None = None
              ) -> list[dict[str, Any]]:
    """One row per method (pFedLoRA, then the paper's baselines, then others): accuracy mean/std over seeds,
    the paired difference to pFedLoRA with its 95% t interval, per-round costs, and to-target costs with
    their ratio to pFedLoRA's. `failures` (method, seed, why) are listed in the row of their method."""
    by_method = _by_method(records)
    failed: dict[str, list[str]] = {}
    for method, seed, why in failures or []:
        failed.setdefault(method, []).append(f"seed {seed}: {why}")
        by_method.setdefault(method, [])
    rows = []
    for method, runs in by_method.items():
        if not runs:  # every seed of this method failed
            rows.append({"method": method, "seeds": 0, "failed": " | ".join(failed[method])})
            continue
        final_mean, final_std = _mean_std([r.summary["final"]["acc_mean"] for r in runs])
        best_mean, best_std = _mean_std([r.summary["best"]["acc_mean"] for r in runs])
        rounds = [len(r.history) for r in runs]
        bytes_round = np.mean([(r.summary["bytes_up_total"] + r.summary["bytes_down_total"]) / n
                               for r, n in zip(runs, rounds)])
        params_round = np.mean([(r.summary["params_up_total"] + r.summary["params_down_total"]) / n
                                for r, n in zip(runs, rounds)])
        flops_round = np.mean([(r.summary["flops_client_total"] + r.summary["flops_server_total"]) / n
                               for r, n in zip(runs, rounds)])
        # wall time of a round (training + evaluation), median over rounds, mean over seeds; runs that shared
        # the machine (--jobs) slowed each other
        seconds_round = np.mean([np.median([h["train_seconds"] + h["eval_seconds"] for h in r.history])
                                 for r in runs])
        reached = [r.summary["to_target"] for r in runs if r.summary.get("to_target")]
        row = {
            "method": method, "seeds": len(runs), "seed_list": " ".join(str(r.seed) for r in runs),
            "final_acc_mean": final_mean, "final_acc_std": final_std,
            "best_acc_mean": best_mean, "best_acc_std": best_std,
            "params_per_round": float(params_round), "bytes_per_round": float(bytes_round),
            "flops_per_round": float(flops_round), "seconds_per_round": float(seconds_round),
            "target_accuracy": runs[0].summary.get("target_accuracy", 0.0),
            "target_reached": f"{len(reached)}/{len(runs)}",
            "rounds_to_target": _mean_std([t["round"] for t in reached])[0],
            "bytes_to_target": _mean_std([t["bytes"] for t in reached])[0],
            "flops_to_target": _mean_std([t["flops"] for t in reached])[0],
            "tuned": "; ".join(f"{k}={v}" for k, v in runs[0].summary.get("tuned", {}).get("values", {}).items()),
            "failed": " | ".join(failed.get(method, [])),
        }
        rows.append(row)
    columns = list(next(r for r in rows if r["seeds"]))  # callers pass at least one finished run
    rows = [{c: r.get(c, math.nan) for c in columns} | {"method": r["method"], "seeds": r["seeds"],
                                                        "failed": r["failed"]} for r in rows]
    ref = next((r for r in rows if r["method"] == REFERENCE), None)
    # paired over the seeds both ran (same seed = same partition and initial draws): the difference
    # without the seed-to-seed spread of the data split
    final_of = {(r.method, r.seed): r.summary["final"]["acc_mean"] for r in records}
    for row in rows:
        diffs = [final_of[row["method"], s] - final_of[REFERENCE, s] for s in sorted({r.seed for r in records})
                 if (row["method"], s) in final_of and (REFERENCE, s) in final_of]
        row[f"final_minus_{REFERENCE}_mean"], row[f"final_minus_{REFERENCE}_std"] = _mean_std(diffs)
        low, high = paired_interval(diffs)
        row[f"final_minus_{REFERENCE}_ci95_low"], row[f"final_minus_{REFERENCE}_ci95_high"] = low, high
        row[f"differs_from_{REFERENCE}"] = ("" if math.isnan(low) or row["method"] == REFERENCE else
                                            "yes" if low > 0 or high < 0 else "no")
        row["paired_seeds"] = len(diffs)
    for row in rows:
        for what in ("bytes", "flops"):
            mine, theirs = row[f"{what}_to_target"], ref[f"{what}_to_target"] if ref else math.nan
            row[f"{what}_to_target_vs_{REFERENCE}"] = mine / theirs if theirs and theirs > 0 and not \
                math.isnan(mine) and not math.isnan(theirs) else math.nan
    return rows


# ------------------------------------------------------------------ formatting

def fmt_acc(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.2f}±{100 * std:.2f}"


def fmt_count(x: float, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def fmt_ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


TABLE_COLUMNS = ("method", "final acc %", f"final - {REFERENCE} [95% CI] (seeds)", "best acc %", "bytes/round",
                 "FLOPs/round", "s/round", "rounds to target", "bytes to target (x)", "FLOPs to target (x)", "tuned")


def _fmt_paired(r: dict[str, Any]) -> str:
    """'+0.12 [-0.30, +0.54] (3)': mean paired difference in points, its 95% t interval, pairs; '*' marks an
    interval that excludes 0."""
    mean = r[f"final_minus_{REFERENCE}_mean"]
    if r["method"] == REFERENCE or math.isnan(mean):
        return "-"
    low, high = r[f"final_minus_{REFERENCE}_ci95_low"], r[f"final_minus_{REFERENCE}_ci95_high"]
    interval = "" if math.isnan(low) else f" [{100 * low:+.2f}, {100 * high:+.2f}]"
    mark = "*" if r[f"differs_from_{REFERENCE}"] == "yes" else ""
    return f"{100 * mean:+.2f}{interval}{mark} ({r['paired_seeds']})"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        reached = r["target_reached"]
        out.append([
            r["method"], fmt_acc(r["final_acc_mean"], r["final_acc_std"]),
            _fmt_paired(r),
            fmt_acc(r["best_acc_mean"], r["best_acc_std"]),
            fmt_count(r["bytes_per_round"], "B"), fmt_count(r["flops_per_round"]), f"{r['seconds_per_round']:.1f}",
            "-" if math.isnan(r["rounds_to_target"]) else f"{r['rounds_to_target']:.1f} ({reached})",
            "-" if math.isnan(r["bytes_to_target"]) else
            f"{fmt_count(r['bytes_to_target'], 'B')} ({fmt_ratio(r[f'bytes_to_target_vs_{REFERENCE}'])})",
            "-" if math.isnan(r["flops_to_target"]) else
            f"{fmt_count(r['flops_to_target'])} ({fmt_ratio(r[f'flops_to_target_vs_{REFERENCE}'])})",
            r["tuned"] or "-",
        ])
    return out


def describe(records: list[RunRecord]) -> str:
    cfg = records[0].config
    seeds = sorted({r.seed for r in records})
    target = cfg.target_accuracy
    return (f"{cfg.dataset}, {cfg.partition} partition"
            + (f" (alpha={cfg.dirichlet_alpha})" if cfg.partition == "dirichlet" else "")
            + (f" ({cfg.classes_per_client} classes/client)" if cfg.partition == "pathological" else "")
            + f", N={cfg.num_clients}, C={cfg.participation}, T={cfg.rounds}, E={cfg.local_epochs}, "
            f"batch {cfg.batch_size}, {cfg.model_setting} models; seeds {', '.join(map(str, seeds))}; "
            f"accuracy: personalised, unweighted mean over clients; target "
            + (f"{100 * target:g}%" if target > 0 else "none") + _differing_hyperparameters(records))


def _differing_hyperparameters(records: list[RunRecord]) -> str:
    """'; per method: lr pfedlora 0.05, standalone 0.01' for shared hyperparameters that differ."""
    first_of = {}
    for r in sorted(records, key=_method_order):
        first_of.setdefault(r.method, r.config)
    parts = []
    for key in HYPERPARAMETERS:
        values = {m: c[key] for m, c in first_of.items()}
        if len(set(values.values())) > 1:
            parts.append(f"{key} " + ", ".join(f"{m} {v:g}" if isinstance(v, float) else f"{m} {v}"
                                               for m, v in values.items()))
    return ("; per method: " + "; ".join(parts)) if parts else ""


# ------------------------------------------------------------------ outputs

def write_outputs(out: Path, records: list[RunRecord], rows: list[dict[str, Any]]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")  # quotes cells with commas
    writer.writeheader()
    writer.writerows({c: "" if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in columns}
                     for r in rows)
    atomic_write(out / "comparison.csv", text.getvalue())
    md = ["# Comparison\n", describe(records) + "\n",
          f"Accuracy: mean ± std over seeds (sample std); `final - {REFERENCE}`: per-seed (paired: same "
          f"partition and initial draws) difference in points, mean over the seeds both ran with its 95% "
          f"confidence interval (t distribution, n - 1 degrees of freedom; needs 2 seeds), `*` where the "
          f"interval excludes 0, seed count in brackets. Ratios in brackets: method / {REFERENCE} (above 1: "
          f"{REFERENCE} needed less). Costs are measured: "
          "bytes from the tensors sent (both directions), FLOPs with torch's FlopCounterMode on the real "
          "training steps and server step. `best` is the best round's mean accuracy, not the final result.\n",
          "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    md += ["| " + " | ".join(cells) + " |" for cells in table_rows([r for r in rows if r["seeds"]])]
    failed = [f"- {r['method']}: {r['failed']}" for r in rows if r["failed"]]
    if failed:
        md += ["", "Failed runs (not in the figures above; rerun the same command to retry or resume them):", *failed]
    atomic_write(out / "comparison.md", "\n".join(md) + "\n")
    plots = [out / "accuracy_vs_round.png", out / "accuracy_vs_bytes.png", out / "per_client.png"]
    plot_comparison({method: [r.history for r in runs] for method, runs in _by_method(records).items()},
                    REFERENCE, records[0].config.target_accuracy, plots[0], plots[1], describe(records))
    plot_per_client(records, plots[2], describe(records))
    return [out / "comparison.csv", out / "comparison.md", *plots]


def plot_per_client(records: list[RunRecord], path: Path, subtitle: str) -> None:
    """per_client.png: every method's final accuracy per client (mean over seeds), side by side."""
    import textwrap

    per_method = {method: [[float(row["accuracy"]) if row["accuracy"] not in ("", None) else math.nan
                            for row in read_per_client(r.run_dir)] for r in runs]
                  for method, runs in _by_method(records).items()}
    plot_client_comparison(per_method, path, "\n".join(textwrap.wrap(subtitle, 95)))


# ------------------------------------------------------------------ running

def specs_for(out: Path, runs: list[tuple[str, int, Config, str]],
              tuned: dict[str, dict[str, Any]] | None = None, trackers: tuple[str, ...] = ()) -> list[RunSpec]:
    """The run specs of a comparison: one run directory per (method, seed) under out/runs/. `tuned`: per
    method, what its recipe was tuned to (recorded in the runs' summary.json); `trackers`: where every run
    is also sent (pfl.trackers)."""
    out = out.expanduser().absolute()
    return [RunSpec(f"{m} seed {s}", cfg.as_flat(), source, run_dir_for(out, m, s),
                    extra_summary={"tuned": tuned[m]} if tuned and m in tuned else None, trackers=trackers)
            for m, s, cfg, source in runs]


def check_reuse(out: Path, runs: list[tuple[str, int, Config, str]]) -> None:
    """Refuse a comparison directory whose runs were made differently, before any compute."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: '{out}' exists and is not a directory")
    check_reusable(specs_for(out, runs))


def run_comparison(out: Path, runs: list[tuple[str, int, Config, str]], hw, resources,
                   on_event: Callable[[dict], None] | None = None,
                   on_outcome: Callable[[RunOutcome], None] | None = None,
                   tuned: dict[str, dict[str, Any]] | None = None, trackers: tuple[str, ...] = ()
                   ) -> tuple[list[RunRecord], list[tuple[str, int, str]]]:
    """Every (method, seed) run under out/runs/: finished ones reused, interrupted ones resumed, the rest
    trained (`resources.jobs` at once). Returns the finished runs and the failed ones (method, seed, why)."""
    out = out.expanduser().absolute()
    check_reuse(out, runs)
    outcomes = run_all(specs_for(out, runs, tuned, trackers), hw, resources, on_event, on_outcome)
    records, failures = [], []
    for (method, seed, _, _), outcome in zip(runs, outcomes):
        if outcome.ok:
            records.append(load_run(outcome.run_dir))
        else:
            failures.append((method, seed, outcome.detail))
    return records, failures


# ------------------------------------------------------------------ the whole command

class Display:
    """What a front end shows while `compare` works (pfl's CLI: progress bars and tables); this one shows
    nothing."""

    def message(self, text: str) -> None:
        """A line saying what is about to run."""

    @contextmanager
    def runs(self, title: str, total: int) -> Iterator[tuple[Callable | None, Callable | None]]:
        """Around `total` runs: (on_event, on_outcome) for pfl.parallel.run_all."""
        yield None, None

    def tuned(self, result) -> None:
        """One method's tuning finished (a pfl.tune.TuneResult)."""


@dataclass
class Comparison:
    """What `compare` found: the finished runs, the failed ones (method, seed, why), one row per method (see
    `summarise`) and the files written."""

    records: list[RunRecord]
    failures: list[tuple[str, int, str]]
    rows: list[dict[str, Any]]
    written: list[Path]


def compare(recipe: str | None, sources: list[Path], methods: str | None, overrides: list[str], seeds: int,
            seed: int | None, out: Path | None, tune_trials: int, tune_rounds: int | None,
            trackers: tuple[str, ...], hardware: Callable[[], tuple[Any, Any]], display: Display | None = None
            ) -> Comparison:
    """`pfl compare`: the finished runs of `sources` (run or comparison directories), or every method of
    `methods` on `recipe` for `seeds` seeds (each tuned first with `tune_trials` trials when > 0); then the
    table and plots in `out`. `hardware()` gives (Hardware, Resources) once runs need them, so that options
    are checked in the order the command always did. RunFailed when every run failed."""
    if seeds < 1:
        raise PflUserError(f"--seeds: must be an integer >= 1, got {seeds}")
    if tune_trials < 0:
        raise PflUserError(f"--tune-trials: must be an integer >= 0, got {tune_trials}")
    if tune_rounds is not None and (tune_rounds < 1 or not tune_trials):
        raise PflUserError(f"--tune-rounds: must be an integer >= 1 and goes with --tune-trials, got {tune_rounds}")
    failures: list[tuple[str, int, str]] = []
    if sources:
        if methods or overrides or seed is not None or seeds != 1 or tune_trials or trackers:
            raise PflUserError("--from: --methods, --set, --seed, --seeds, --tune-trials and --logger apply only "
                               "with --recipe")
        records = collect_runs(sources)
        if out is None:
            out = sources[0] if len(sources) == 1 and (sources[0] / "runs").is_dir() else \
                Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    else:
        records, failures, out = _run_methods(recipe, methods, overrides, seeds, seed, out, tune_trials,
                                              tune_rounds, trackers, hardware, display or Display())
    rows = summarise(records, failures)
    return Comparison(records, failures, rows, write_outputs(out.expanduser().absolute(), records, rows))


def _run_methods(recipe, methods, overrides, seeds, seed, out, tune_trials, tune_rounds, trackers, hardware,
                 display: Display) -> tuple[list[RunRecord], list[tuple[str, int, str]], Path]:
    from pfl.trackers import check_trackers

    trackers = check_trackers(trackers)
    names = method_names(methods)
    if not names:
        raise PflUserError("--methods: give at least one method, e.g. --methods pfedlora,standalone")
    hw, resources = hardware()
    runs = plan(recipe, overrides, names, seeds, seed)
    base = runs[0][2]
    if base.engine == "flower" and (resources.jobs > 1 or resources.ray_address):
        raise PflUserError("--jobs: runs on the flower engine use Ray themselves; run them with --jobs 1 "
                           "or use engine=local for parallel runs")
    out = out or Path("runs") / f"compare-{base.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tuned = None
    if tune_trials:
        tuned = _tune_each(recipe, overrides, names, seed, tune_trials, tune_rounds, out, hw, resources, display)
        runs = plan(recipe, overrides, names, seeds, seed, tuned_values={m: t["values"] for m, t in tuned.items()})
    check_reuse(out, runs)
    display.message(f"{', '.join(names)} on {base.dataset}: N={base.num_clients}, C={base.participation}, "
                    f"T={base.rounds}, {base.partition} partition, {len(runs) // len(names)} seed(s), "
                    f"{resources.jobs} at once ({resources.threads} thread(s) each) -> {out}")
    with display.runs("runs done", len(runs)) as (on_event, on_outcome):
        records, failures = run_comparison(out, runs, hw, resources, on_event, on_outcome, tuned, trackers)
    if not records:
        raise RunFailed("every run failed: " + "; ".join(f"{m} seed {s}: {why}" for m, s, why in failures))
    return records, failures, out


def _tune_each(recipe, overrides, names, seed, trials, rounds, out, hw, resources, display: Display
               ) -> dict[str, dict[str, Any]]:
    """Every method tuned with the same budget (pfl.tune.plan_comparison); per method its best values and
    where its study is."""
    from pfl import tune as tune_mod

    studies = tune_mod.plan_comparison(recipe, overrides, names, seed, trials, rounds, out.expanduser().absolute())
    display.message(f"tuning {', '.join(names)}: {trials} trials each, {studies[0].rounds} rounds per trial, "
                    f"objective: {tune_mod.OBJECTIVE_TEXT}")
    tuned = {}
    for study in studies:
        with display.runs(f"tuning {study.method}", trials) as (on_event, on_outcome):
            result = tune_mod.run_study(study, hw, resources, on_event, on_outcome)
        display.tuned(result)
        tuned[study.method] = {"values": result.best_values, "from": str(study.out)}
    return tuned
