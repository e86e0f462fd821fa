"""`pfl tune`: hyperparameter search for one method on validation data, with Optuna.

Search: Optuna's TPE sampler; trials whose validation accuracy lags are stopped by Optuna's MedianPruner
(a trial is pruned at a round when its value there is below the median of earlier trials' values at the
same round; the first `PRUNER_STARTUP` trials are never pruned). pfl writes neither a search nor a pruning
rule of its own.

Objective (maximised): validation accuracy, the unweighted mean over clients of each client's accuracy on its
own validation split, averaged over the last `OBJECTIVE_ROUNDS` evaluated rounds of a trial's run, then over
the trial's seeds. While tuning, `val_fraction` > 0 (default 0.2 of each client's training data, stratified,
seeded, never trained on) and `eval_test` is false: the test split is never evaluated, so no tuning decision
can depend on it.

Layout of a tune directory:

    study.db          the Optuna study (SQLite): rerunning the same command continues it
    tune.json         what was tuned (method, recipe, space, seeds, rounds): a rerun must match it
    trials/trial-NNNN/seed-S/   an ordinary run directory per trial and seed (validation metrics only)
    trials.csv        one row per trial: state, objective, values, rounds run
    best.toml         a complete recipe with the best values, val_fraction back to 0 and eval_test on
    tune_trials.png   objective per trial (pruned trials marked), best so far
    tune_params.png   objective against each tuned key

Reproducibility: the sampler is seeded from the recipe's seed and the number of trials already in the
study, so with `--jobs 1` the same command gives the same trials, and a continued study draws new ones
instead of repeating the first draws. With `--jobs N`, trials are asked in batches of N / seeds.
"""

from __future__ import annotations

import csv
import fcntl
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from pfl import config as config_mod
from pfl.algorithms import ALGORITHMS
from pfl.build import Hardware
from pfl.config import HYPERPARAMETERS
from pfl.errors import ConfigError, RunDirError, RunFailed, RunStopped
from pfl.federation import Callbacks
from pfl.files import atomic_file, atomic_write
from pfl.parallel import Resources, RunOutcome, RunSpec, run_all
from pfl.pictures import plot_study
from pfl.schema import TABLE_KINDS, Config
from pfl.seeding import derive_seed
from pfl.trackers import check_trackers

if TYPE_CHECKING:
    from pfl.compare import Entry

OBJECTIVE_ROUNDS = 3
PRUNER_STARTUP = 2
DEFAULT_VAL_FRACTION = 0.2
STUDY_NAME = "pfl"
OBJECTIVE_TEXT = (f"validation accuracy (unweighted mean over clients), mean of the last {OBJECTIVE_ROUNDS} "
                  f"evaluated rounds, mean over seeds")


# ---------------------------------------------------------------- search spaces

@dataclass(frozen=True)
class Dimension:
    """One tuned key: `kind` is float, log (float on a log scale), int, int-log or choice."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "int-log"):
            return trial.suggest_int(self.key, self.low, self.high, log=self.kind == "int-log")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def spec(self) -> str:
        if self.kind == "choice":
            return ",".join(str(c) for c in self.choices)
        prefix = {"float": "", "log": "log:", "int": "int:", "int-log": "int:log:"}[self.kind]
        return f"{prefix}{self.low}:{self.high}"


SPEC_HELP = ("KEY=SPEC with SPEC one of: LOW:HIGH (uniform), log:LOW:HIGH (log-uniform), int:LOW:HIGH, "
             "int:log:LOW:HIGH, or V1,V2,... (a choice); e.g. lr=log:1e-3:1e-1, pfedlora.rank=4,8,16")


def tunable_keys(method: str) -> list[str]:
    """The shared hyperparameters and the method's own keys, but for its tables (`pfedlora.ranks`)."""
    return [*HYPERPARAMETERS, *(f"{method}.{k}" for k, f in ALGORITHMS[method].SETTINGS.items()
                                if f.kind not in TABLE_KINDS)]


def parse_dimension(text: str, method: str, base: dict[str, Any]) -> Dimension:
    """One --space entry, validated against the recipe schema: the key must be a hyperparameter of `method`
    and both bounds (or every choice) must be allowed values of it. ConfigError names the entry."""
    if "=" not in text:
        raise ConfigError(f"--space '{text}': expected {SPEC_HELP}")
    key, spec = (part.strip() for part in text.split("=", 1))
    schema = config_mod.full_schema()
    if key not in schema:
        raise ConfigError(f"--space '{text}': unknown recipe key '{key}'; tunable keys of {method}: "
                          f"{', '.join(tunable_keys(method))}")
    if schema[key].kind in TABLE_KINDS:
        raise ConfigError(f"--space '{text}': '{key}' is {schema[key].describe()}, which pfl tune cannot search; "
                          f"set it with --set; tunable keys of {method}: {', '.join(tunable_keys(method))}")
    if key not in tunable_keys(method):
        raise ConfigError(f"--space '{text}': '{key}' is not a hyperparameter of {method} (the protocol stays "
                          f"fixed while tuning); tunable keys: {', '.join(tunable_keys(method))}")
    field_ = schema[key]
    parts = spec.split(":")

    def value(raw: str, kind: str) -> Any:
        try:
            number = int(raw) if kind == "int" else float(raw)
        except ValueError:
            raise ConfigError(f"--space '{text}': {raw!r} is not {'an integer' if kind == 'int' else 'a number'}; "
                              f"expected {SPEC_HELP}") from None
        return _checked(text, key, number, base)

    if len(parts) == 1:  # a choice
        raw_choices = [c.strip() for c in spec.split(",") if c.strip()]
        if len(raw_choices) < 2:
            raise ConfigError(f"--space '{text}': give a range or at least two choices; expected {SPEC_HELP}")
        choices = tuple(_checked(text, key, config_mod.parse_override(f"v={c}")[1], base) for c in raw_choices)
        if len(set(choices)) != len(choices):
            raise ConfigError(f"--space '{text}': a choice is listed twice")
        return Dimension(key, "choice", choices=choices)
    if field_.kind not in ("int", "float"):
        raise ConfigError(f"--space '{text}': '{key}' is {field_.describe()}; give choices V1,V2,...")
    words, bounds = parts[:-2], parts[-2:]
    kind = {(): "float", ("log",): "log", ("int",): "int", ("int", "log"): "int-log"}.get(tuple(words))
    if kind is None:
        raise ConfigError(f"--space '{text}': unknown prefix '{':'.join(words)}'; expected {SPEC_HELP}")
    if field_.kind == "int" and kind in ("float", "log"):
        kind = "int" if kind == "float" else "int-log"
    if field_.kind == "float" and kind in ("int", "int-log"):
        raise ConfigError(f"--space '{text}': '{key}' is a number, not an integer; drop 'int:'")
    low, high = (value(b, "int" if kind.startswith("int") else "float") for b in bounds)
    if not low < high:
        raise ConfigError(f"--space '{text}': LOW must be below HIGH, got {low} and {high}")
    if kind in ("log", "int-log") and low <= 0:
        raise ConfigError(f"--space '{text}': a log scale needs LOW > 0, got {low}")
    return Dimension(key, kind, low, high)


def _checked(text: str, key: str, value: Any, base: dict[str, Any]) -> Any:
    """The value as the schema coerces it, after checking a recipe with it resolves (cross-key checks too)."""
    try:
        return config_mod.resolve(base, {key: value})[key]
    except ConfigError as exc:
        raise ConfigError(f"--space '{text}': {exc}") from None


def parse_space(specs: list[str] | dict[str, str], method: str, base: dict[str, Any]) -> dict[str, Dimension]:
    items = [f"{k}={v}" for k, v in specs.items()] if isinstance(specs, dict) else list(specs)
    space: dict[str, Dimension] = {}
    for text in items:
        dim = parse_dimension(text, method, base)
        if dim.key in space:
            raise ConfigError(f"--space '{text}': '{dim.key}' is given twice")
        space[dim.key] = dim
    if not space:
        raise ConfigError("--space: nothing to tune")
    return space


# ---------------------------------------------------------------- a study

@dataclass
class StudyPlan:
    """Everything one tune needs, validated: the recipe of its trials (validation on, test off, tuning
    rounds), the recipe best.toml starts from (the user's), the space and the budget."""

    method: str
    out: Path
    trial_flat: dict[str, Any]
    final_flat: dict[str, Any]
    source: str
    space: dict[str, Dimension]
    trials: int
    seeds: int
    trackers: tuple[str, ...] = ()  # every trial run is also sent there (pfl.trackers)
    label: str = ""  # what it is called in tables and plots (a comparison's entry); default: the method

    def __post_init__(self) -> None:
        self.label = self.label or self.method

    @property
    def rounds(self) -> int:
        return int(self.trial_flat["rounds"])

    @property
    def seed(self) -> int:
        return int(self.trial_flat["seed"])

    def identity(self) -> dict[str, Any]:
        """What a rerun in the same directory must match (the trial count may grow)."""
        recipe = {k: v for k, v in self.trial_flat.items() if k not in config_mod.RELOCATABLE_KEYS}
        return {"method": self.method, "recipe": recipe,
                "space": {k: d.spec() for k, d in self.space.items()}, "seeds": self.seeds}


def plan_tune(recipe: str, overrides: list[str], method: str, space_specs: list[str] | dict[str, str] | None,
              trials: int, seeds: int, seed: int | None, rounds: int | None, val_fraction: float | None, out: Path,
              trackers: tuple[str, ...] = (), fixed: dict[str, Any] | None = None) -> StudyPlan:
    """Validate a tune before anything runs or is written (ConfigError / RunDirError naming the option).
    `trackers`: where every trial run is also sent (pfl.trackers); `fixed`: recipe keys set on top of --set
    in every trial and in best.toml (a comparison entry's own settings)."""
    if method not in ALGORITHMS:
        raise ConfigError(f"--method: unknown method {method!r}; known: {', '.join(sorted(ALGORITHMS))}")
    if trials < 1:
        raise ConfigError(f"--trials: must be an integer >= 1, got {trials}")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be an integer >= 1, got {seeds}")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds: must be an integer >= 1, got {rounds}")
    if val_fraction is not None and not 0 < val_fraction <= 0.5:
        raise ConfigError(f"--val-fraction: must be a number > 0 and <= 0.5, got {val_fraction}")
    raw, source = config_mod.read_recipe_file(recipe)
    parsed = dict(config_mod.parse_override(o) for o in overrides)
    for key in ("method", "seed", "eval_test"):
        if key in parsed:
            raise ConfigError(f"--set: '{key}' is chosen by pfl tune (--method, --seed; the test split is off)")
    final = config_mod.resolve(raw, {**parsed, **(fixed or {}), "method": method,
                                     **({"seed": seed} if seed is not None else {})})
    if final.engine == "flower":
        raise ConfigError("recipe key 'engine': pfl tune runs trials on the local engine; set engine=local")
    fraction = val_fraction or (final.val_fraction if final.val_fraction > 0 else DEFAULT_VAL_FRACTION)
    trial = config_mod.resolve(final.as_flat(), {"val_fraction": fraction, "eval_test": False,
                                                 "rounds": rounds or final.rounds,
                                                 "eval_every": min(final.eval_every, rounds or final.rounds)})
    space = parse_space(space_specs or ALGORITHMS[method].search_space(), method, trial.as_flat())
    plan = StudyPlan(method, Path(out).expanduser().absolute(), trial.as_flat(),
                     {**final.as_flat(), "val_fraction": 0.0, "eval_test": True}, source, space, trials, seeds)
    check_out(plan)
    plan.trackers = check_trackers(trackers)
    return plan


def check_out(plan: StudyPlan) -> None:
    out = plan.out
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out: '{out}' exists and is not a directory")
    meta = out / "tune.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunDirError(f"--out: '{meta}' is unreadable ({exc})") from None
        mine = json.loads(json.dumps(plan.identity()))
        for part in ("method", "space", "seeds", "recipe"):
            if old.get(part) != mine[part]:
                what = part if part != "recipe" else "recipe key " + (
                    config_mod.first_difference(old["recipe"], mine["recipe"]) or "?")
                raise RunDirError(f"--out: '{out}' holds a tune with a different {what}; use a new --out "
                                  f"directory (or the same command to continue it)")
    elif out.exists() and any(out.iterdir()):
        raise RunDirError(f"--out: '{out}' exists, is not empty and holds no tune; choose a new directory")


def _storage(out: Path):
    import optuna

    return optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 120}})


def _pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP, n_warmup_steps=0)


class PruneLagging(Callbacks):
    """In the process that runs a trial's seed: reports each evaluated round's validation accuracy to the
    study and stops the run (RunStopped) when the pruner says it lags. Step = seed index x rounds + round."""

    def __init__(self, out: str, trial_id: int, seed_index: int, rounds: int):
        import optuna

        study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(Path(out)), pruner=_pruner())
        self.trial = optuna.trial.Trial(study, trial_id)
        self.offset = seed_index * rounds

    def on_round_end(self, record: dict[str, Any]) -> None:
        value = record.get("val_acc_mean", math.nan)
        if math.isnan(value):
            return
        self.trial.report(value, self.offset + record["round"])
        if self.trial.should_prune():
            raise RunStopped(f"pruned at round {record['round']}: validation accuracy {100 * value:.2f}% lags "
                             f"the median of earlier trials")


def _make_pruner_callback(out: str, trial_id: int, seed_index: int, rounds: int) -> Callbacks:
    return PruneLagging(out, trial_id, seed_index, rounds)


def objective_of(run_dir: Path) -> float:
    """Mean validation accuracy over the last OBJECTIVE_ROUNDS evaluated rounds of one finished run."""
    with open(run_dir / "metrics.csv", newline="") as f:
        values = [float(r["val_acc_mean"]) for r in csv.DictReader(f) if r.get("val_acc_mean")]
    return sum(values[-OBJECTIVE_ROUNDS:]) / len(values[-OBJECTIVE_ROUNDS:]) if values else math.nan


@dataclass
class TuneResult:
    plan: StudyPlan
    rows: list[dict[str, Any]]
    best_values: dict[str, Any]
    best_objective: float
    best_trial: int
    written: list[Path] = field(default_factory=list)


def trial_dir(plan: StudyPlan, number: int, seed_index: int) -> Path:
    return plan.out / "trials" / f"trial-{number:04d}" / f"seed-{plan.seed + seed_index}"


def _specs(plan: StudyPlan, trial_id: int, number: int, values: dict[str, Any]) -> list[RunSpec]:
    specs = []
    for i in range(plan.seeds):
        flat = config_mod.resolve(plan.trial_flat, {**values, "seed": plan.seed + i}).as_flat()
        specs.append(RunSpec(f"{plan.label} trial {number}" + (f" seed {plan.seed + i}" if plan.seeds > 1 else ""),
                             flat, plan.source, trial_dir(plan, number, i),
                             extra_callbacks=functools.partial(_make_pruner_callback, str(plan.out), trial_id, i,
                                                               plan.rounds), trackers=plan.trackers))
    return specs


class _Lock:
    """One tune per directory at a time (an advisory lock on DIR/.lock)."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunDirError(f"--out: another pfl tune is running in '{self.path.parent}'") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_study(plan: StudyPlan, hw: Hardware, resources: Resources,
              on_event: Callable[[dict], None] | None = None,
              on_outcome: Callable[[RunOutcome], None] | None = None) -> TuneResult:
    """Run (or continue) the study until it holds `plan.trials` finished trials; write its outputs."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _Lock(plan.out):
        (plan.out / "tune.json").write_text(json.dumps(plan.identity(), indent=1) + "\n", encoding="utf-8")
        storage = _storage(plan.out)
        try:
            existing = optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
        except KeyError:  # a new study
            existing = []
        sampler = optuna.samplers.TPESampler(seed=derive_seed(plan.seed, "tune", len(existing)) % 2**32,
                                             n_startup_trials=max(PRUNER_STARTUP, plan.trials // 3))
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                    sampler=sampler, pruner=_pruner(), load_if_exists=True)
        # trials a killed tune left running: continue them (their runs resume from their checkpoints)
        interrupted = [t for t in study.trials if t.state == TrialState.RUNNING]
        for t in interrupted:
            _finish_trials(plan, study, [(t._trial_id, t.number, t.params)], hw, resources, on_event, on_outcome)
        batch = max(1, resources.jobs // plan.seeds)
        while True:
            done = len([t for t in study.trials if t.state.is_finished()])
            if done >= plan.trials:
                break
            asked = []
            for _ in range(min(batch, plan.trials - done)):
                trial = study.ask()
                values = {key: dim.suggest(trial) for key, dim in plan.space.items()}
                asked.append((trial._trial_id, trial.number, values))
            _finish_trials(plan, study, asked, hw, resources, on_event, on_outcome)
        return write_outputs(plan, study)


def _finish_trials(plan, study, trials, hw, resources, on_event, on_outcome) -> None:
    """Run every seed of the given trials (in parallel up to `resources.jobs`) and tell the study."""
    from optuna.trial import TrialState

    specs = [s for trial_id, number, values in trials for s in _specs(plan, trial_id, number, values)]
    outcomes = run_all(specs, hw, resources, on_event, on_outcome)
    for i, (_trial_id, number, _) in enumerate(trials):
        mine = outcomes[i * plan.seeds:(i + 1) * plan.seeds]
        if any(o.status == "failed" for o in mine):
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        elif any(o.status == "stopped" for o in mine):
            study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            value = sum(objective_of(o.run_dir) for o in mine) / len(mine)
            if math.isnan(value):
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            else:
                study.tell(number, value, skip_if_finished=True)


# ---------------------------------------------------------------- outputs

def _rows(plan: StudyPlan, study) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        steps = sorted(t.intermediate_values)
        last = t.intermediate_values[steps[-1]] if steps else math.nan
        row = {"trial": t.number, "state": t.state.name.lower(),
               "objective": t.value if t.state.name == "COMPLETE" else math.nan,
               "last_val_acc": last, "rounds_run": (steps[-1] - 1) % plan.rounds + 1 if steps else 0,
               "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
               if t.datetime_complete and t.datetime_start else math.nan}
        row.update({key: t.params.get(key, "") for key in plan.space})
        rows.append(row)
    return rows


def load_best(out: Path) -> dict[str, Any]:
    """The best complete trial's values of the study in the tune directory `out`."""
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(Path(out)))
    return _best(study).params


def _best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def write_outputs(plan: StudyPlan, study) -> TuneResult:
    rows = _rows(plan, study)
    _write_csv(out_csv(plan), rows)
    best = _best(study)
    if best is None:
        raise RunFailed(f"no trial of {plan.label} completed (every one was pruned or failed); see "
                        f"{out_csv(plan)}")
    best_values = {key: best.params[key] for key in plan.space}
    out = plan.out
    best_cfg: Config = config_mod.resolve(plan.final_flat, best_values)
    header = (f"# pfl tune: {plan.label}, best of {len(rows)} trials (trial {best.number}, objective "
              f"{best.value:.4f}: {OBJECTIVE_TEXT}, {plan.rounds} rounds per trial)\n"
              f"# tuned: {', '.join(f'{k}={v}' for k, v in best_values.items())}\n")
    atomic_write(out / "best.toml", header + tomli_w.dumps(best_cfg.as_nested()))
    plots = plot_study(out, plan.label, plan.space, rows, best.number)
    return TuneResult(plan, rows, best_values, float(best.value), best.number,
                      [out / "best.toml", out / "trials.csv", *plots])


def out_csv(plan: StudyPlan) -> Path:
    return plan.out / "trials.csv"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                         for r in rows)


# ---------------------------------------------------------------- a fair comparison

def plan_comparison(recipe: str, overrides: list[str], entries: list[Entry], seed: int | None, trials: int,
                    rounds: int | None, out: Path) -> list[StudyPlan | None]:
    """One tune per comparison entry (pfl.compare.Entry) under out/tune/<entry slug>/, each with its
    method's default search space minus the keys the entry fixes (those hold in every trial and in the
    result) and the same budget: trials, rounds per trial, pruner, one seed. None for an entry that fixes
    every key of its space: it has nothing to tune."""
    plans: list[StudyPlan | None] = []
    for entry in entries:
        fixed = entry.overrides
        space = {k: v for k, v in ALGORITHMS[entry.method].search_space().items() if k not in fixed}
        plan = plan_tune(recipe, overrides, entry.method, space, trials, 1, seed, rounds, None,
                         out / "tune" / entry.slug, fixed=fixed) if space else None
        if plan is not None:
            plan.label = entry.label
        plans.append(plan)
    return plans
