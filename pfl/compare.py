"""`pfl compare`: several methods on the same recipe, partitions and seeds; one table and three plots.

An entry of `--methods` is a method, a group of methods, or a method with some of its own settings fixed,
`pfedlora(rank=4, mu=0.5)` (an ablation): its label (the entry's text, normalised) names its row, its
curves and its run directories. The first entry is the reference of the paired differences and ratios.

Layout of a comparison directory:

    runs/<entry>-seed<S>/    an ordinary run directory per (entry, seed), written by `pfl.run.train`; <entry> is
                             the method, then `-key=value` per fixed setting (`Entry.slug`); the label is in
                             the run's summary.json (`entry`)
    comparison.csv           one row per entry: accuracy mean and std over seeds, costs, to-target costs
    comparison.md            the same table in Markdown, with the protocol it was measured under
    accuracy_vs_round.png    mean accuracy per round (mean over seeds, band: min-max over seeds)
    accuracy_vs_bytes.png    mean accuracy against bytes communicated so far (both directions)
    per_client.png           every entry's final accuracy per client (mean over seeds), side by side

A finished run (it has summary.json, which `train` writes last) is reused when the comparison is run
again with the same output directory, after checking that it was made with the same resolved recipe.
Ratios compare each entry with the first as "entry / first", so with pFedLoRA first 7.4 means the method
needed 7.4x what pFedLoRA needed (the paper's "7.41x less communication").
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
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

# The protocol, which every run of one comparison must share, is what a run computes (config.computation)
# except the comparison's own axes: method, seed and a method's hyperparameters (config.HYPERPARAMETERS and
# its own table; each entry may run with its own (tuned or fixed) values, the same for all its seeds; values
# that differ between entries are listed with the table).


@dataclass
class RunRecord:
    method: str
    seed: int
    run_dir: Path
    config: Config
    summary: dict[str, Any]
    history: list[dict[str, float]]
    label: str  # the entry the run belongs to (`Entry.label`; the method for a run made outside compare)


# ------------------------------------------------------------------ entries of --methods

# Names `--methods` accepts for groups of methods.
METHOD_GROUPS = {"paper": PAPER_METHODS, "later": LATER_METHODS, "all": PAPER_METHODS + LATER_METHODS}
ENTRY_HELP = "a method, a group (paper, later, all) or method(key=value, ...) with the method's own settings"
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Entry:
    """One entry of `--methods`: a method, and the settings of its own (`<method>.<key>` without the prefix)
    that the entry fixes, as (key, value text) in the order given; values are read like `--set` values."""

    method: str
    settings: tuple[tuple[str, str], ...] = ()
    # given by a group (`all`): left out, with a note, when the method refuses the recipe (pFedES on text)
    grouped: bool = dataclasses.field(default=False, compare=False)

    @property
    def label(self) -> str:
        """The row's name: 'pfedlora', or 'pfedlora(rank=4, mu=0.5)' (keys in the order given)."""
        pairs = ", ".join(f"{key}={value}" for key, value in self.settings)
        return f"{self.method}({pairs})" if self.settings else self.method

    @property
    def overrides(self) -> dict[str, Any]:
        """The recipe keys the entry fixes, with their values read as `--set` reads them."""
        return dict(config_mod.parse_override(f"{self.method}.{key}={value}") for key, value in self.settings)

    @property
    def slug(self) -> str:
        """Its directories' name (runs/<slug>-seed<S>, tune/<slug>): the method, then `-key=value` per setting.
        A value with characters other than letters, digits and `._+-` has them written as `_` and the label's
        hash appended, so that different labels never share a directory."""
        text = self.method + "".join(f"-{key}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"
                                     for key, value in self.settings)
        if all(_PLAIN_VALUE.fullmatch(value) for _, value in self.settings) and len(text) <= 100:
            return text
        return f"{text[:80]}-{hashlib.sha256(self.label.encode()).hexdigest()[:8]}"


class _Unbalanced(Exception):
    """Brackets or quotes that do not pair up; `args[0]`: the piece of text where they do not."""


_CLOSING = {")": "(", "]": "[", "}": "{"}


def _split_top(text: str) -> list[str]:
    """`text` cut at the commas outside (), [], {} and quotes (a TOML list or table stays one value)."""
    parts, stack, start = [], [], 0
    for i, c in enumerate(text):
        if stack and stack[-1] in "\"'":
            if c == stack[-1]:
                stack.pop()
        elif c in "([{\"'":
            stack.append(c)
        elif c in _CLOSING:
            if not stack or stack[-1] != _CLOSING[c]:
                end = text.find(",", i)
                raise _Unbalanced(text[start:end if end >= 0 else None])
            stack.pop()
        elif c == "," and not stack:
            parts.append(text[start:i])
            start = i + 1
    if stack:
        raise _Unbalanced(text[start:])
    parts.append(text[start:])
    return parts


def _known_methods() -> str:
    return f"known: {', '.join(sorted(ALGORITHMS))}, or a group: {', '.join(METHOD_GROUPS)}"


def _parse_entry(item: str) -> list[Entry]:
    """One entry (already cut from the list and stripped): the entries it stands for (a group: several)."""
    name, paren, rest = item.partition("(")
    name = name.strip()
    if not paren:
        if name in METHOD_GROUPS:
            return [Entry(m, grouped=True) for m in METHOD_GROUPS[name]]
        if name not in ALGORITHMS:
            raise ConfigError(f"--methods: unknown method {name!r}; {_known_methods()}")
        return [Entry(name)]
    where = f"--methods: entry {item!r}"
    if name in METHOD_GROUPS:
        raise ConfigError(f"{where}: {name} is a group of methods; settings go on one method, e.g. "
                          f"{METHOD_GROUPS[name][0]}(key=value)")
    if name not in ALGORITHMS:
        raise ConfigError(f"--methods: unknown method {name!r} in {item!r}; {_known_methods()}")
    try:
        pairs = _split_top(rest[:-1]) if rest.endswith(")") else None
    except _Unbalanced:
        pairs = None
    if pairs is None:
        raise ConfigError(f"{where}: expected {name}(key=value, ...) with nothing after its ')'")
    own = ALGORITHMS[name].SETTINGS
    allowed = f"its settings: {', '.join(own)}" if own else f"{name} has no settings of its own"
    if not rest[:-1].strip():
        raise ConfigError(f"{where}: nothing inside the parentheses; write {name} for its defaults or "
                          f"{name}(key=value, ...) ({allowed})")
    settings: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals or not key:
            raise ConfigError(f"{where}: expected key=value inside the parentheses, got {pair.strip()!r} "
                              f"({allowed})" if pair.strip() else f"{where}: an empty setting; {allowed}")
        if key not in own:
            raise ConfigError(f"{where}: {key!r} is not a setting of {name} ({allowed}; shared "
                              f"hyperparameters such as lr go in --set or --tune-trials)")
        if key in settings:
            raise ConfigError(f"{where}: {key!r} is given twice")
        settings[key] = value
    return [Entry(name, tuple(settings.items()))]


def parse_entries(text: str | None) -> list[Entry]:
    """`--methods`: comma-separated entries (commas inside parentheses belong to their entry), each a method,
    a group (paper: pFedLoRA and its six baselines; later: the eight later methods; all: both, fifteen) or
    `method(key=value, ...)` with some of the method's own settings; default paper. ConfigError names the
    entry; values are checked against the recipe in `plan`."""
    try:
        items = _split_top(text or "paper")
    except _Unbalanced as exc:
        raise ConfigError(f"--methods: entry {exc.args[0].strip()!r}: unbalanced parentheses (or brackets or "
                          f"quotes); write method(key=value, ...)") from None
    entries: list[Entry] = []
    given: dict[str, str] = {}  # label -> the item that gave it (a group gives several)
    for n, item in enumerate(items, 1):
        if not item.strip():
            raise ConfigError(f"--methods: entry {n} of {text!r} is empty; give {ENTRY_HELP}")
        for entry in _parse_entry(item.strip()):
            if entry.label in given:
                groups = [g for g in (given[entry.label], item.strip()) if g in METHOD_GROUPS]
                raise ConfigError(f"--methods: {entry.label!r} is listed twice"
                                  + (f" (the group {groups[0]} includes it)" if groups else ""))
            given[entry.label] = item.strip()
            entries.append(entry)
    seen: dict[str, str] = {}
    for entry in entries:
        other = seen.get(entry.slug.lower())
        if other is not None:
            raise ConfigError(f"--methods: {other!r} and {entry.label!r} would share run directories; write one "
                              f"of them differently")
        seen[entry.slug.lower()] = entry.label
    return entries


def run_dir_for(out: Path, slug: str, seed: int) -> Path:
    return out / "runs" / f"{slug}-seed{seed}"


def applicable(recipe: str, overrides: list[str], entries: list[Entry]) -> tuple[list[Entry], list[str]]:
    """The entries to run, and a note for each method a group brought in that refuses this recipe (a group
    means "every method that can run here"; a method named on its own that refuses is an error, in `plan`)."""
    raw, _ = config_mod.read_recipe_file(recipe)
    parsed = dict(config_mod.parse_override(o) for o in overrides)
    kept, notes = [], []
    for entry in entries:
        if entry.grouped:
            try:
                config_mod.resolve(raw, {**parsed, "method": entry.method})
            except ConfigError as exc:
                notes.append(f"{entry.label} left out: {exc}")
                continue
        kept.append(entry)
    if not kept:
        raise ConfigError("--methods: no method of the group can run this recipe: " + "; ".join(notes))
    return kept, notes


def plan(recipe: str, overrides: list[str], entries: list[Entry], seeds: int,
         seed: int | None = None, tuned_values: dict[str, dict[str, Any]] | None = None
         ) -> list[tuple[Entry, int, Config, str]]:
    """(entry, seed, resolved config, recipe source) for every run, all validated before any runs: --set, then
    the entry's settings, then `tuned_values` (per entry label: recipe keys set to what tuning found)."""
    raw, source = config_mod.read_recipe_file(recipe)
    parsed = dict(config_mod.parse_override(o) for o in overrides)
    if "method" in parsed or "seed" in parsed:
        raise ConfigError("--set: 'method' and 'seed' are chosen by --methods and --seeds in `pfl compare`")
    first = config_mod.resolve(raw, {**parsed, **({"seed": seed} if seed is not None else {})}).seed
    for entry in entries:  # an entry's values are checked as `--set <method>.<key>=<value>` would be
        if entry.settings:
            try:
                config_mod.resolve(raw, {**parsed, **entry.overrides, "method": entry.method})
            except ConfigError as exc:
                raise ConfigError(f"--methods: entry {entry.label!r}: {exc}") from None
    runs = []
    for s in range(first, first + seeds):
        for e in entries:
            tuned = (tuned_values or {}).get(e.label, {})
            runs.append((e, s, config_mod.resolve(raw, {**parsed, **e.overrides, **tuned, "method": e.method,
                                                        "seed": s}), source))
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
    label = summary.get("entry", cfg.method)
    if not isinstance(label, str) or label.partition("(")[0] != cfg.method:
        raise RunDirError(f"'{run_dir}': summary.json's entry {label!r} is not a run of {cfg.method}")
    return RunRecord(cfg.method, cfg.seed, run_dir, cfg, summary, history, label)


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
        if (r.label, r.seed) in seen:
            raise RunDirError(f"--from: two runs of {r.label} with seed {r.seed}: '{seen[r.label, r.seed]}' "
                              f"and '{r.run_dir}'")
        seen[r.label, r.seed] = r.run_dir
    check_comparable(records)
    return records


def table_order(paths: list[Path]) -> list[str]:
    """The row order of the comparison.csv in each comparison directory among `paths` (the order its entries
    were given in), so that --from rebuilds the same table; entries it does not list come after them."""
    order: list[str] = []
    for path in paths:
        table = Path(path) / "comparison.csv"
        if (Path(path) / "runs").is_dir() and table.is_file():
            try:
                with open(table, newline="", encoding="utf-8") as f:
                    order += [row["method"] for row in csv.DictReader(f) if row.get("method")]
            except (OSError, csv.Error, UnicodeDecodeError):
                continue  # an unreadable table: the default order
    return list(dict.fromkeys(order))


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
    for r in records:  # entries of one method differ in its settings on purpose; one entry's seeds may not
        mine = _hyperparameters(r.config)
        if r.label in settings and settings[r.label][1] != mine:
            other_dir, theirs = settings[r.label]
            key = config_mod.first_difference(mine, theirs)
            raise RunDirError(f"runs '{other_dir}' and '{r.run_dir}' of {r.label} differ in '{key}' "
                              f"({theirs.get(key)!r} vs {mine.get(key)!r}); every seed of an entry must use the "
                              f"same settings")
        settings[r.label] = (r.run_dir, mine)


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def _default_rank(label: str) -> tuple[int, str, bool, str]:
    """pFedLoRA first, then the baselines in the paper's order, the later methods, any other; a method's
    entries with settings after the method itself."""
    order = {m: i for i, m in enumerate(PAPER_METHODS + LATER_METHODS)}
    method = label.partition("(")[0]
    return order.get(method, len(order)), method, label != method, label


def ordered_labels(labels: list[str], first: list[str] | None = None) -> list[str]:
    """Every label once: those in `first` in its order, then the others in the default order."""
    present = dict.fromkeys(labels)
    head = [label for label in dict.fromkeys(first or []) if label in present]
    return head + sorted(set(present) - set(head), key=_default_rank)


def _by_label(records: list[RunRecord], order: list[str]) -> dict[str, list[RunRecord]]:
    """Each entry's runs (seeds ascending), entries in `order` (every label of `records` is in it)."""
    by_label: dict[str, list[RunRecord]] = {label: [] for label in order}
    for r in sorted(records, key=lambda r: r.seed):
        by_label[r.label].append(r)
    return {label: runs for label, runs in by_label.items() if runs}


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval of the mean of paired differences (n - 1 degrees of freedom); NaN below 2 pairs."""
    if len(diffs) < 2:
        return math.nan, math.nan
    from scipy.stats import t

    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return mean - half, mean + half


NOT_TUNED = "not tuned: the entry fixes its whole search space"


def _tuned_cell(summary: dict[str, Any]) -> str:
    tuned = summary.get("tuned") or {}
    values = "; ".join(f"{k}={v}" for k, v in tuned.get("values", {}).items())
    return values or (NOT_TUNED if tuned.get("not_tuned") else "")


def summarise(records: list[RunRecord], failures: list[tuple[str, int, str]] | None = None,
              order: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per entry, in `order` (labels; the others, or all without it, in the default order: pFedLoRA,
    the paper's baselines, the later methods, others): accuracy mean/std over seeds, the paired difference to
    the first row's entry (the reference) with its 95% t interval, per-round costs, and to-target costs with
    their ratio to the reference's. `failures` (label, seed, why) are listed in the row of their entry."""
    failed: dict[str, list[str]] = {}
    for label, seed, why in failures or []:
        failed.setdefault(label, []).append(f"seed {seed}: {why}")
    order = ordered_labels([r.label for r in records] + list(failed), order)
    by_label = _by_label(records, order)
    rows = []
    for label in order:
        runs = by_label.get(label, [])
        if not runs:  # every seed of this entry failed
            rows.append({"method": label, "seeds": 0, "failed": " | ".join(failed[label])})
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
            "method": label, "seeds": len(runs), "seed_list": " ".join(str(r.seed) for r in runs),
            "final_acc_mean": final_mean, "final_acc_std": final_std,
            "best_acc_mean": best_mean, "best_acc_std": best_std,
            "params_per_round": float(params_round), "bytes_per_round": float(bytes_round),
            "flops_per_round": float(flops_round), "seconds_per_round": float(seconds_round),
            "target_accuracy": runs[0].summary.get("target_accuracy", 0.0),
            "target_reached": f"{len(reached)}/{len(runs)}",
            "rounds_to_target": _mean_std([t["round"] for t in reached])[0],
            "bytes_to_target": _mean_std([t["bytes"] for t in reached])[0],
            "flops_to_target": _mean_std([t["flops"] for t in reached])[0],
            "tuned": _tuned_cell(runs[0].summary),
            "failed": " | ".join(failed.get(label, [])),
        }
        rows.append(row)
    columns = list(next(r for r in rows if r["seeds"]))  # callers pass at least one finished run
    rows = [{c: r.get(c, math.nan) for c in columns} | {"method": r["method"], "seeds": r["seeds"],
                                                        "failed": r["failed"]} for r in rows]
    ref = rows[0]
    reference = ref["method"]
    # paired over the seeds both ran (same seed = same partition and initial draws): the difference
    # without the seed-to-seed spread of the data split
    final_of = {(r.label, r.seed): r.summary["final"]["acc_mean"] for r in records}
    for row in rows:
        diffs = [final_of[row["method"], s] - final_of[reference, s] for s in sorted({r.seed for r in records})
                 if (row["method"], s) in final_of and (reference, s) in final_of]
        row[f"final_minus_{reference}_mean"], row[f"final_minus_{reference}_std"] = _mean_std(diffs)
        low, high = paired_interval(diffs)
        row[f"final_minus_{reference}_ci95_low"], row[f"final_minus_{reference}_ci95_high"] = low, high
        row[f"differs_from_{reference}"] = ("" if math.isnan(low) or row["method"] == reference else
                                            "yes" if low > 0 or high < 0 else "no")
        row["paired_seeds"] = len(diffs)
    for row in rows:
        for what in ("bytes", "flops"):
            mine, theirs = row[f"{what}_to_target"], ref[f"{what}_to_target"]
            row[f"{what}_to_target_vs_{reference}"] = mine / theirs if theirs and theirs > 0 and not \
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


def table_columns(reference: str) -> tuple[str, ...]:
    """The printed table's header; `reference`: the first entry's label."""
    return ("method", "final acc %", f"final - {reference} [95% CI] (seeds)", "best acc %", "bytes/round",
            "FLOPs/round", "s/round", "rounds to target", "bytes to target (x)", "FLOPs to target (x)", "tuned")


def _fmt_paired(r: dict[str, Any], reference: str) -> str:
    """'+0.12 [-0.30, +0.54] (3)': mean paired difference in points, its 95% t interval, pairs; '*' marks an
    interval that excludes 0."""
    mean = r[f"final_minus_{reference}_mean"]
    if r["method"] == reference or math.isnan(mean):
        return "-"
    low, high = r[f"final_minus_{reference}_ci95_low"], r[f"final_minus_{reference}_ci95_high"]
    interval = "" if math.isnan(low) else f" [{100 * low:+.2f}, {100 * high:+.2f}]"
    mark = "*" if r[f"differs_from_{reference}"] == "yes" else ""
    return f"{100 * mean:+.2f}{interval}{mark} ({r['paired_seeds']})"


def table_rows(rows: list[dict[str, Any]], reference: str) -> list[list[str]]:
    """The printed table's cells of `summarise`'s rows whose reference is the entry labelled `reference`."""
    out = []
    for r in rows:
        reached = r["target_reached"]
        out.append([
            r["method"], fmt_acc(r["final_acc_mean"], r["final_acc_std"]),
            _fmt_paired(r, reference),
            fmt_acc(r["best_acc_mean"], r["best_acc_std"]),
            fmt_count(r["bytes_per_round"], "B"), fmt_count(r["flops_per_round"]), f"{r['seconds_per_round']:.1f}",
            "-" if math.isnan(r["rounds_to_target"]) else f"{r['rounds_to_target']:.1f} ({reached})",
            "-" if math.isnan(r["bytes_to_target"]) else
            f"{fmt_count(r['bytes_to_target'], 'B')} ({fmt_ratio(r[f'bytes_to_target_vs_{reference}'])})",
            "-" if math.isnan(r["flops_to_target"]) else
            f"{fmt_count(r['flops_to_target'])} ({fmt_ratio(r[f'flops_to_target_vs_{reference}'])})",
            r["tuned"] or "-",
        ])
    return out


def describe(records: list[RunRecord], order: list[str] | None = None) -> str:
    cfg = records[0].config
    seeds = sorted({r.seed for r in records})
    target = cfg.target_accuracy
    return (f"{cfg.dataset}, {cfg.partition} partition"
            + (f" (alpha={cfg.dirichlet_alpha})" if cfg.partition == "dirichlet" else "")
            + (f" ({cfg.classes_per_client} classes/client)" if cfg.partition == "pathological" else "")
            + f", N={cfg.num_clients}, C={cfg.participation}, T={cfg.rounds}, E={cfg.local_epochs}, "
            f"batch {cfg.batch_size}, {cfg.model_setting} models; seeds {', '.join(map(str, seeds))}; "
            f"accuracy: personalised, unweighted mean over clients; target "
            + (f"{100 * target:g}%" if target > 0 else "none") + _differing_hyperparameters(records, order))


def _differing_hyperparameters(records: list[RunRecord], order: list[str] | None) -> str:
    """'; per method: lr pfedlora 0.05, standalone 0.01' for shared hyperparameters that differ (per entry,
    entries in `order`)."""
    by_label = _by_label(records, ordered_labels([r.label for r in records], order))
    first_of = {label: runs[0].config for label, runs in by_label.items()}
    parts = []
    for key in HYPERPARAMETERS:
        values = {m: c[key] for m, c in first_of.items()}
        if len(set(values.values())) > 1:
            parts.append(f"{key} " + ", ".join(f"{m} {v:g}" if isinstance(v, float) else f"{m} {v}"
                                               for m, v in values.items()))
    return ("; per method: " + "; ".join(parts)) if parts else ""


# ------------------------------------------------------------------ outputs

def write_outputs(out: Path, records: list[RunRecord], rows: list[dict[str, Any]]) -> list[Path]:
    """comparison.csv, comparison.md and the three plots of `summarise`'s rows (their order: the entries',
    the first the reference) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    order = [r["method"] for r in rows]
    reference = order[0]
    subtitle = describe(records, order)
    columns = list(rows[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")  # quotes cells with commas
    writer.writeheader()
    writer.writerows({c: "" if isinstance(r[c], float) and math.isnan(r[c]) else r[c] for c in columns}
                     for r in rows)
    atomic_write(out / "comparison.csv", text.getvalue())
    md = ["# Comparison\n", subtitle + "\n",
          f"Accuracy: mean ± std over seeds (sample std); `final - {reference}`: per-seed (paired: same "
          f"partition and initial draws) difference in points, mean over the seeds both ran with its 95% "
          f"confidence interval (t distribution, n - 1 degrees of freedom; needs 2 seeds), `*` where the "
          f"interval excludes 0, seed count in brackets. Ratios in brackets: method / {reference} (above 1: "
          f"{reference} needed less). Costs are measured: "
          "bytes from the tensors sent (both directions), FLOPs with torch's FlopCounterMode on the real "
          "training steps and server step. `best` is the best round's mean accuracy, not the final result.\n",
          "| " + " | ".join(table_columns(reference)) + " |", "|" + "---|" * len(table_columns(reference))]
    md += ["| " + " | ".join(cells) + " |" for cells in table_rows([r for r in rows if r["seeds"]], reference)]
    failed = [f"- {r['method']}: {r['failed']}" for r in rows if r["failed"]]
    if failed:
        md += ["", "Failed runs (not in the figures above; rerun the same command to retry or resume them):", *failed]
    atomic_write(out / "comparison.md", "\n".join(md) + "\n")
    plots = [out / "accuracy_vs_round.png", out / "accuracy_vs_bytes.png", out / "per_client.png"]
    by_label = _by_label(records, ordered_labels([r.label for r in records], order))
    plot_comparison({label: [r.history for r in runs] for label, runs in by_label.items()},
                    reference, records[0].config.target_accuracy, plots[0], plots[1], subtitle)
    plot_per_client(by_label, plots[2], subtitle)
    return [out / "comparison.csv", out / "comparison.md", *plots]


def plot_per_client(by_label: dict[str, list[RunRecord]], path: Path, subtitle: str) -> None:
    """per_client.png: every entry's final accuracy per client (mean over seeds), side by side."""
    import textwrap

    per_entry = {label: [[float(row["accuracy"]) if row["accuracy"] not in ("", None) else math.nan
                          for row in read_per_client(r.run_dir)] for r in runs]
                 for label, runs in by_label.items()}
    plot_client_comparison(per_entry, path, "\n".join(textwrap.wrap(subtitle, 95)))


# ------------------------------------------------------------------ running

def specs_for(out: Path, runs: list[tuple[Entry, int, Config, str]],
              tuned: dict[str, dict[str, Any]] | None = None, trackers: tuple[str, ...] = ()) -> list[RunSpec]:
    """The run specs of a comparison: one run directory per (entry, seed) under out/runs/, its summary.json
    recording the entry's label (`entry`, read back by `load_run`). `tuned`: per entry label, what its recipe
    was tuned to (recorded in the runs' summary.json); `trackers`: where every run is also sent."""
    out = out.expanduser().absolute()
    return [RunSpec(f"{e.label} seed {s}", cfg.as_flat(), source, run_dir_for(out, e.slug, s),
                    extra_summary={"entry": e.label, **({"tuned": tuned[e.label]} if tuned and e.label in tuned
                                                        else {})}, trackers=trackers)
            for e, s, cfg, source in runs]


def check_reuse(out: Path, runs: list[tuple[Entry, int, Config, str]]) -> None:
    """Refuse a comparison directory whose runs were made differently, before any compute."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: '{out}' exists and is not a directory")
    check_reusable(specs_for(out, runs))


def run_comparison(out: Path, runs: list[tuple[Entry, int, Config, str]], hw, resources,
                   on_event: Callable[[dict], None] | None = None,
                   on_outcome: Callable[[RunOutcome], None] | None = None,
                   tuned: dict[str, dict[str, Any]] | None = None, trackers: tuple[str, ...] = ()
                   ) -> tuple[list[RunRecord], list[tuple[str, int, str]]]:
    """Every (entry, seed) run under out/runs/: finished ones reused, interrupted ones resumed, the rest
    trained (`resources.jobs` at once). Returns the finished runs and the failed ones (label, seed, why)."""
    out = out.expanduser().absolute()
    check_reuse(out, runs)
    outcomes = run_all(specs_for(out, runs, tuned, trackers), hw, resources, on_event, on_outcome)
    records, failures = [], []
    for (entry, seed, _, _), outcome in zip(runs, outcomes):
        if outcome.ok:  # the entry's directory: its label even where a run reused from an older pfl has none
            records.append(load_run(outcome.run_dir))
            records[-1].label = entry.label
        else:
            failures.append((entry.label, seed, outcome.detail))
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
        """One entry's tuning finished (a pfl.tune.TuneResult)."""


@dataclass
class Comparison:
    """What `compare` found: the finished runs, the failed ones (label, seed, why), one row per entry (see
    `summarise`) and the files written."""

    records: list[RunRecord]
    failures: list[tuple[str, int, str]]
    rows: list[dict[str, Any]]
    written: list[Path]

    @property
    def order(self) -> list[str]:
        """The entries' labels, in the table's order."""
        return [r["method"] for r in self.rows]

    @property
    def reference(self) -> str:
        """The first entry's label: what the paired differences and the ratios compare with."""
        return self.rows[0]["method"]


def compare(recipe: str | None, sources: list[Path], methods: str | None, overrides: list[str], seeds: int,
            seed: int | None, out: Path | None, tune_trials: int, tune_rounds: int | None,
            trackers: tuple[str, ...], hardware: Callable[[], tuple[Any, Any]], display: Display | None = None
            ) -> Comparison:
    """`pfl compare`: the finished runs of `sources` (run or comparison directories), or every entry of
    `methods` (`parse_entries`) on `recipe` for `seeds` seeds (each tuned first with `tune_trials` trials when
    > 0); then the table and plots in `out`, rows in the entries' order (--from: in the order of the sources'
    comparison.csv, or those of `methods` in its order). `hardware()` gives (Hardware, Resources) once runs
    need them, so that options are checked in the order the command always did. RunFailed when every run failed."""
    if seeds < 1:
        raise PflUserError(f"--seeds: must be an integer >= 1, got {seeds}")
    if tune_trials < 0:
        raise PflUserError(f"--tune-trials: must be an integer >= 0, got {tune_trials}")
    if tune_rounds is not None and (tune_rounds < 1 or not tune_trials):
        raise PflUserError(f"--tune-rounds: must be an integer >= 1 and goes with --tune-trials, got {tune_rounds}")
    failures: list[tuple[str, int, str]] = []
    if sources:
        if overrides or seed is not None or seeds != 1 or tune_trials or trackers:
            raise PflUserError("--from: --set, --seed, --seeds, --tune-trials and --logger apply only with --recipe")
        records = collect_runs(sources)
        order = table_order(sources)
        if methods:  # a view of finished runs: these entries, in this order, the first the reference
            order = [e.label for e in parse_entries(methods)]
            found = {r.label for r in records}
            missing = [label for label in order if label not in found]
            if missing:
                raise PflUserError(f"--methods: {missing[0]!r} has no finished run in --from; the runs there: "
                                   f"{', '.join(ordered_labels(sorted(found)))}")
            records = [r for r in records if r.label in order]
        if out is None:
            out = sources[0] if len(sources) == 1 and (sources[0] / "runs").is_dir() and not methods else \
                Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    else:
        records, failures, out, order = _run_methods(recipe, methods, overrides, seeds, seed, out, tune_trials,
                                                     tune_rounds, trackers, hardware, display or Display())
    rows = summarise(records, failures, order)
    return Comparison(records, failures, rows, write_outputs(out.expanduser().absolute(), records, rows))


def _run_methods(recipe, methods, overrides, seeds, seed, out, tune_trials, tune_rounds, trackers, hardware,
                 display: Display) -> tuple[list[RunRecord], list[tuple[str, int, str]], Path, list[str]]:
    from pfl.trackers import check_trackers

    trackers = check_trackers(trackers)
    entries, left_out = applicable(recipe, overrides, parse_entries(methods))
    for note in left_out:
        display.message(note)
    labels = [e.label for e in entries]
    hw, resources = hardware()
    runs = plan(recipe, overrides, entries, seeds, seed)
    base = runs[0][2]
    if base.engine == "flower" and (resources.jobs > 1 or resources.ray_address):
        raise PflUserError("--jobs: runs on the flower engine use Ray themselves; run them with --jobs 1 "
                           "or use engine=local for parallel runs")
    out = out or Path("runs") / f"compare-{base.name}-{datetime.now():%Y%m%d-%H%M%S}"
    tuned = None
    if tune_trials:
        tuned = _tune_each(recipe, overrides, entries, seed, tune_trials, tune_rounds, out, hw, resources, display)
        runs = plan(recipe, overrides, entries, seeds, seed,
                    tuned_values={label: t["values"] for label, t in tuned.items()})
    check_reuse(out, runs)
    display.message(f"{', '.join(labels)} on {base.dataset}: N={base.num_clients}, C={base.participation}, "
                    f"T={base.rounds}, {base.partition} partition, {len(runs) // len(entries)} seed(s), "
                    f"{resources.jobs} at once ({resources.threads} thread(s) each) -> {out}")
    with display.runs("runs done", len(runs)) as (on_event, on_outcome):
        records, failures = run_comparison(out, runs, hw, resources, on_event, on_outcome, tuned, trackers)
    if not records:
        raise RunFailed("every run failed: " + "; ".join(f"{m} seed {s}: {why}" for m, s, why in failures))
    return records, failures, out, labels


def _tune_each(recipe, overrides, entries: list[Entry], seed, trials, rounds, out, hw, resources, display: Display
               ) -> dict[str, dict[str, Any]]:
    """Every entry tuned with the same budget (pfl.tune.plan_comparison: its method's space without the keys
    it fixes); per entry label its best values and where its study is, or that it had nothing to tune."""
    from pfl import tune as tune_mod

    studies = tune_mod.plan_comparison(recipe, overrides, entries, seed, trials, rounds, out.expanduser().absolute())
    planned = [study for study in studies if study is not None]
    if planned:
        display.message(f"tuning {', '.join(study.label for study in planned)}: {trials} trials each, "
                        f"{planned[0].rounds} rounds per trial, objective: {tune_mod.OBJECTIVE_TEXT}")
    tuned = {}
    for entry, study in zip(entries, studies):
        if study is None:
            display.message(f"{entry.label}: {NOT_TUNED}")
            tuned[entry.label] = {"values": {}, "not_tuned": NOT_TUNED}
            continue
        with display.runs(f"tuning {entry.label}", trials) as (on_event, on_outcome):
            result = tune_mod.run_study(study, hw, resources, on_event, on_outcome)
        display.tuned(result)
        tuned[entry.label] = {"values": result.best_values, "from": str(study.out)}
    return tuned
