"""The flower engine against the local engine on one recipe and seed: per-client accuracy side by side,
wall time, training seconds per round, and the ratio flower / local.

    python benchmarks/engines.py --recipe fmnist --out runs/engines          # ~25 min on 2 CPU cores

Runs, one after another (never concurrently, so the timings are not disturbed), `pfl train` with
  flower        --engine flower (Flower simulation: Ray actors, flower.client_cpus each; 1 thread each)
  local         --engine local  (torch's default thread count)
  local-1thread --engine local with OMP_NUM_THREADS=1 (the thread count of a simulated client: its
                results equal the flower run's bit for bit)
Finished runs under --out are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "flower": (["--engine", "flower"], {}),
    "local": (["--engine", "local"], {}),
    "local-1thread": (["--engine", "local"], {"OMP_NUM_THREADS": "1"}),
}


def run_variant(name: str, recipe: str, seed: int, extra: list[str], out: Path) -> dict:
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        print(f"{name}: reusing {run_dir}", flush=True)
    else:
        args, env = VARIANTS[name]
        cmd = [sys.executable, "-m", "cli.main", "train", "--recipe", recipe, "--seed", str(seed), "--out",
               str(run_dir), *args, *extra]
        print(f"{name}: {' '.join(cmd[2:])}", flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        (run_dir / "bench_wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    wall_file = run_dir / "bench_wall_seconds.txt"
    summary["process_wall_seconds"] = float(wall_file.read_text()) if wall_file.is_file() else float("nan")
    with open(run_dir / "per_client.csv", newline="") as f:
        summary["per_client"] = list(csv.DictReader(f))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fmnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, to every run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/engines"))
    args = parser.parse_args()
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = {name: run_variant(name, args.recipe, args.seed, extra, args.out) for name in names}

    print(f"\nper-client personalised accuracy (%), recipe {args.recipe}, seed {args.seed}, final round")
    print("client arch  " + "  ".join(f"{n:>13}" for n in names))
    first = results[names[0]]["per_client"]
    for i, row in enumerate(first):
        cells = []
        for n in names:
            acc = results[n]["per_client"][i]["accuracy"]
            cells.append(f"{100 * float(acc):13.2f}" if acc not in ("", "nan") else f"{'-':>13}")
        print(f"{row['client_id']:>6} {row['arch']:<5} " + "  ".join(cells))
    print("mean         " + "  ".join(f"{100 * results[n]['final']['acc_mean']:13.2f}" for n in names))
    print("\n" + f"{'engine':<14}{'process wall s':>15}{'run wall s':>12}{'train s/round':>15}{'vs local':>10}")
    base = results.get("local")
    for n in names:
        r = results[n]
        ratio = r["process_wall_seconds"] / base["process_wall_seconds"] if base else float("nan")
        print(f"{n:<14}{r['process_wall_seconds']:>15.1f}{r['wall_seconds']:>12.1f}"
              f"{r['train_seconds_per_round']:>15.2f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
