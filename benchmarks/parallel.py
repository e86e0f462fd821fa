"""Wall time of one `pfl compare` with its runs one after another (--jobs 1, torch's threads = all cores)
against the same comparison with N runs at once on Ray (--jobs N, cores / N threads each).

    python benchmarks/parallel.py --out runs/bench-parallel -- --recipe fmnist-dir \\
        --methods pfedlora,standalone,fedproto --seeds 2 --set rounds=5          # ~25 min on 2 CPU cores
    python benchmarks/parallel.py --jobs 4 --extra-parallel "--gpus-per-run 0.25 --accelerator gpu" \\
        --extra-sequential "--accelerator gpu" -- --recipe fmnist-dir ...        # on a GPU

The two comparisons run one after another (never concurrently), each in its own process and directory;
finished comparisons under --out are reused. Printed: wall time of each, the ratio parallel / sequential,
and the largest difference in final accuracy between the two tables (runs with different thread counts
differ only by float summation order).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(name: str, args: list[str], out: Path) -> float:
    target = out / name
    wall_file = out / f"{name}.wall_seconds"
    if (target / "comparison.csv").is_file() and wall_file.is_file():
        print(f"{name}: reusing {target}", flush=True)
        return float(wall_file.read_text())
    cmd = [sys.executable, "-m", "cli.main", "compare", *args, "--out", str(target)]
    print(f"{name}: pfl {' '.join(cmd[3:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    wall_file.write_text(f"{wall:.1f}\n")
    return wall


def finals(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {r["method"]: float(r["final_acc_mean"]) for r in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-parallel"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--extra-sequential", default="", help="more options for the --jobs 1 comparison")
    parser.add_argument("--extra-parallel", default="", help="more options for the --jobs N comparison")
    parser.add_argument("compare_args", nargs=argparse.REMAINDER, help="after --: the `pfl compare` options")
    opts = parser.parse_args()
    args = [a for a in opts.compare_args if a != "--"]
    opts.out.mkdir(parents=True, exist_ok=True)
    sequential = run("jobs1", [*args, "--jobs", "1", *shlex.split(opts.extra_sequential)], opts.out)
    parallel = run(f"jobs{opts.jobs}", [*args, "--jobs", str(opts.jobs), *shlex.split(opts.extra_parallel)], opts.out)
    a, b = finals(opts.out / "jobs1" / "comparison.csv"), finals(opts.out / f"jobs{opts.jobs}" / "comparison.csv")
    print(f"pfl compare {' '.join(args)}")
    print(f"--jobs 1: {sequential:.1f} s; --jobs {opts.jobs}: {parallel:.1f} s; "
          f"ratio {parallel / sequential:.3f} (below 1: parallel is faster)")
    print("final mean accuracy per method (jobs 1 / jobs N): "
          + ", ".join(f"{m} {100 * a[m]:.2f}/{100 * b[m]:.2f}" for m in a))
    print(f"largest difference: {100 * max(abs(a[m] - b[m]) for m in a):.3f} points")


if __name__ == "__main__":
    main()
