"""Seconds per round of a real loopback Flower deployment (`pfl deploy`) against the local engine, and how
much of a deployed round is Flower's own messaging.

    python benchmarks/deploy.py                                  # smoke, 2 SuperNodes, 5 rounds, both modes
    python benchmarks/deploy.py --modes warm --set rounds=10

For each mode (`warm`: one long-running ClientApp process per SuperNode; `per-message`: Flower's default,
a fresh ClientApp process per message) it runs `pfl deploy`, then reads metrics.csv (train_seconds +
eval_seconds per round) and the ServerApp's per-round log line, which gives every message wave's wall time
(push to last reply) and the time the busiest node's ClientApp spent handling its messages of that wave.
wall - ClientApp = Flower's messaging: the SuperNode's polling of the SuperLink (every 3 s when idle) and of
its ClientApp's reply (every 0.5 s), the ServerApp's polling (pfl: 0.2 s), transfers, and, per message,
the start of a ClientApp process in `per-message` mode. The local engine runs the same recipe in this
process with one torch thread, as each ClientApp does (flower.client_cpus = 1).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WAVE = re.compile(r"(train|evaluate \w+) ([\d.]+) s wall, ([\d.]+) s in the busiest ClientApp")


def per_round(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train_seconds"]) + float(r["eval_seconds"]) for r in csv.DictReader(f)]


def waves(run_dir: Path) -> list[tuple[float, float]]:
    """(wall, busiest ClientApp) per round, summed over the round's message waves."""
    out = []
    for line in (run_dir / "flower-logs" / "flwr-run.log").read_text(errors="replace").splitlines():
        if "pfl: round" in line and "| messages:" in line:
            found = WAVE.findall(line)
            out.append((sum(float(w) for _, w, _ in found), sum(float(b) for _, _, b in found)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smoke")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--modes", default="warm,per-message", help="comma-separated: warm, per-message")
    args = parser.parse_args()
    overrides = ["rounds=5", *args.overrides]

    from pfl import config
    from pfl.build import Hardware
    from pfl.run import train

    torch.set_num_threads(1)
    cfg, _ = config.load(args.recipe, overrides)
    with tempfile.TemporaryDirectory(prefix="pfl-bench-deploy-") as tmp:
        train(cfg, Path(tmp) / "local", Hardware(threads=1))
        local = per_round(Path(tmp) / "local")
        results = {}
        for mode in args.modes.split(","):
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "cli.main", "deploy", "--recipe", args.recipe, "--supernodes",
                   str(args.supernodes), "--out", str(out), f"--{mode}"] + [f"--set={o}" for o in overrides]
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"pfl deploy --{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
            results[mode] = (time.perf_counter() - started, per_round(out), waves(out))

    later = statistics.median(local[1:])
    print(f"recipe {args.recipe}, {args.supernodes} SuperNodes, {len(local)} rounds; medians over rounds 2..T")
    print(f"local engine (this process, 1 thread): {later:.3f} s/round (train + eval)")
    for mode, (wall, rounds, timing) in results.items():
        s_round = statistics.median(rounds[1:])
        msg_wall = statistics.median(w for w, _ in timing[1:])
        busy = statistics.median(b for _, b in timing[1:])
        print(f"deploy --{mode}: {wall:.1f} s in all; round 1 {rounds[0]:.2f} s; later rounds {s_round:.2f} s/round "
              f"({s_round / later:.0f}x the local engine): message waves {msg_wall:.2f} s wall, of which "
              f"{busy:.2f} s in the busiest ClientApp and {msg_wall - busy:.2f} s ({(msg_wall - busy) / msg_wall:.0%}) "
              f"Flower's messaging")


if __name__ == "__main__":
    main()
