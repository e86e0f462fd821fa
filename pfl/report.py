"""What a finished run reports: metrics.csv, per_client.csv, summary.json, accuracy.png and clients.png
(drawn by pfl.pictures), and the saved states (via pfl.rundir). Also the versions a run was made with, so
`pfl eval` can warn when they differ."""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import tomli_w
import torch

import pfl
from pfl import rundir
from pfl.build import Hardware, Setup
from pfl.federation import Callbacks
from pfl.federation.costs import first_reaching
from pfl.federation.engine import ACCURACY_COLUMNS
from pfl.pictures import plot_accuracy, plot_clients

BEST_NOTE = "best mean accuracy over evaluated rounds; not the final result"
BEST_IS_FINAL_NOTE = "best mean accuracy over evaluated rounds; reached at the final round, so also the final result"


class MetricsFlusher(Callbacks):
    """Rewrites metrics.csv in the staging directory after every round, so a long run can be followed."""

    def __init__(self, root: Path):
        self.root = root
        self.run = None

    def on_run_start(self, run) -> None:
        self.run = run

    def on_round_end(self, record: dict[str, Any]) -> None:
        write_metrics_csv(self.root / "metrics.csv", self.run.state.history)


def _git_commit() -> str:
    """The commit pfl runs from (with '+dirty' for uncommitted changes), or 'unknown' outside a checkout."""
    root = Path(pfl.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def versions() -> dict[str, str]:
    import lightning

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "pfl": pfl.__version__, "git_commit": _git_commit()}


def version_differences(run_dir: Path) -> list[str]:
    """What differs between the versions a run was made with (summary.json) and the running ones."""
    try:
        recorded = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["summary.json has no readable 'versions'"]
    now = versions()
    return [f"{name} {recorded.get(name, '?')} -> {now[name]}" for name in now
            if str(recorded.get(name, "?")) != str(now[name])]


def final_and_best(history: list[dict[str, Any]], prefix: str = "") -> tuple[dict | None, dict | None]:
    """The last evaluated round's accuracy summary and the best round's mean (None: never evaluated)."""
    evaluated = [r for r in history if not math.isnan(r.get(prefix + "acc_mean", math.nan))]
    if not evaluated:
        return None, None
    final, best = evaluated[-1], max(evaluated, key=lambda r: r[prefix + "acc_mean"])
    return ({"round": final["round"], **{c: final[prefix + c] for c in ACCURACY_COLUMNS}},
            {"round": best["round"], "acc_mean": best[prefix + "acc_mean"],
             "note": BEST_IS_FINAL_NOTE if best["round"] == final["round"] else BEST_NOTE})


def describe_best(final: dict[str, Any], best: dict[str, Any]) -> str:
    """The run summary's line for the best round (`final_and_best`'s pair): flagged as not the final result
    only when the best round is not the final one."""
    where = "the final round" if best["round"] == final["round"] else "not the final result"
    return f"{100 * best['acc_mean']:.2f}% at round {best['round']} ({where})"


def write_report(root: Path, setup: Setup, run, wall: float, hw: Hardware, recipe_source: str,
                 resumed_from: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every file of a finished run into `root`; returns the summary. `extra` goes into summary.json as it
    is (e.g. the tuned values a run was made with)."""
    cfg, state = setup.cfg, run.state
    (root / "config.toml").write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
    write_metrics_csv(root / "metrics.csv", state.history)
    per_client = []
    for k, (c, arch) in enumerate(zip(setup.clients, setup.architectures)):
        row = {"client_id": c.client_id, "arch": arch, "num_train": c.num_train, "num_test": len(c.y_test),
               "accuracy": state.last_accuracies[k] if state.last_accuracies else math.nan}
        if cfg.val_fraction > 0:
            row.update(num_val=len(c.y_val), val_accuracy=state.last_val_accuracies[k])
        per_client.append(row)
    with open(root / "per_client.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_client[0]))
        writer.writeheader()
        writer.writerows(per_client)
    rundir.save_states(root, state.global_state, run.workers.client_states())
    history = state.history
    final, best = final_and_best(history)
    summary = {
        "method": cfg.method, "dataset": cfg.dataset, "recipe": cfg.name, "recipe_source": recipe_source,
        "seed": cfg.seed, "rounds": state.round, "num_clients": cfg.num_clients,
        "evaluation": setup.algorithm.evaluation_label() + (
            "; at round start (what each client holds after receiving the next round's download)"
            if cfg.evaluate_at == "round_start" else "; after training"),
        "final": final,
        "best": best,
        "bytes_up_total": sum(r["bytes_up"] for r in history),
        "bytes_down_total": sum(r["bytes_down"] for r in history),
        "params_up_total": sum(r["params_up"] for r in history),
        "params_down_total": sum(r["params_down"] for r in history),
        "flops_client_total": sum(r["flops_client"] for r in history),
        "flops_server_total": sum(r["flops_server"] for r in history),
        "target_accuracy": cfg.target_accuracy,
        "to_target": first_reaching(history, cfg.target_accuracy),
        "wall_seconds": round(wall, 3),
        "resumed_from_round": resumed_from,
        "train_seconds_per_round": round(sum(r["train_seconds"] for r in history) / len(history), 4),
        "hardware": {"accelerator": hw.accelerator, "devices": str(hw.devices), "precision": hw.precision,
                     "torch_threads": torch.get_num_threads(), "resident": hw.resident},
        "engine": _engine_summary(cfg),
        "aggregation": {**setup.algorithm.rule.describe(), "applies_to": setup.algorithm.AGGREGATED},
        "clients_dropped_total": sum(r["clients_dropped"] for r in history),
        "versions": versions(),
    }
    if cfg.val_fraction > 0:
        val_final, val_best = final_and_best(history, "val_")
        summary["validation"] = {"fraction": cfg.val_fraction, "final": val_final, "best": val_best}
    summary.update(extra or {})
    title = f"{cfg.method} on {cfg.dataset} (N={cfg.num_clients}, C={cfg.participation}, seed {cfg.seed})"
    plot_accuracy(history, root / "accuracy.png", title=title)
    accuracies = [row["accuracy"] for row in per_client]
    plot_clients(setup.architectures, accuracies, state.client_curves, root / "clients.png", title)
    # the last file written: its presence marks a complete run (which no later error deletes, pfl.run)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _engine_summary(cfg) -> dict[str, Any]:
    if cfg.engine != "flower":
        return {"name": "local"}
    return {"name": "flower", "supernodes": cfg["flower.num_supernodes"] or cfg.num_clients,
            "client_cpus": cfg["flower.client_cpus"], "client_gpus": cfg["flower.client_gpus"],
            "round_timeout": cfg["flower.round_timeout"], "min_clients": cfg.min_clients}


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
