"""Seconds per round of a real loopback Flower deployment (TLS and node keys, as `pfl deploy` runs by default)
against a bare Flower app that exchanges messages of the same sizes with the same SuperNodes, and against
the local engine.

    python benchmarks/deploy.py                                  # smoke, 2 SuperNodes, 5 rounds, warm ClientApps
    python benchmarks/deploy.py --per-message --set rounds=10

One deployment (a SuperLink, K SuperNodes, their warm ClientApp processes) serves two `flwr run`s in turn:
pfl's app on the recipe, then benchmarks/bare_flower.py (no training: each round one message per client with
pfl's download size and run-record size, replies of pfl's upload size, polled like pfl's ServerApp polls).
pfl's seconds per round come from metrics.csv (train_seconds + eval_seconds); its ServerApp's per-round log
line splits each round's message wave into the time the busiest node's ClientApp spent in pfl's handlers and
the rest, which is Flower's messaging (the SuperNode polls the SuperLink every 3 s when idle and its
ClientApp's reply every 0.5 s in flwr 1.42, transfers, TLS); what is left of the round is pfl's server side
(aggregation, checks, metrics). The local engine runs the same recipe in this process with one torch
thread, as each ClientApp does (flower.client_cpus = 1). Medians over rounds 2..T.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WAVE = re.compile(r"(train \+ evaluate|train|evaluate \w+) ([\d.]+) s wall, ([\d.]+) s in the busiest ClientApp")


def per_round(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train_seconds"]) + float(r["eval_seconds"]) for r in csv.DictReader(f)]


def first_row(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        return next(csv.DictReader(f))


def waves(log: Path) -> list[tuple[int, float, float]]:
    """(message waves, wall, busiest ClientApp) per round, summed over the round's waves."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "pfl: round" in line and "| messages:" in line:
            found = WAVE.findall(line)
            out.append((len(found), sum(float(w) for _, w, _ in found), sum(float(b) for _, _, b in found)))
    return out


SERVED = re.compile(r"served a (train|evaluate) message in ([\d.]+) s")


def served(deployment, nodes: int) -> list[list[float]]:
    """Per node, the seconds its warm ClientApp spent per train/evaluate message, pull to push (Flower's
    runtime calls around the handler)."""
    return [[float(m.group(2)) for m in SERVED.finditer(deployment.log(f"clientapp-{i}").read_text(errors="replace"))]
            for i in range(nodes)]


def flwr_run(deployment, app_dir: Path, run_config: dict, log_name: str) -> None:
    from pfl.flower.deploy import _toml_value, flower_bin

    items = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    with open(deployment.log(log_name), "wb") as log:
        code = subprocess.run([flower_bin("flwr"), "run", str(app_dir), "--stream", "--run-config", items],
                              stdout=log, stderr=subprocess.STDOUT, env=deployment.env, cwd=deployment.workdir,
                              stdin=subprocess.DEVNULL).returncode
    if code != 0:
        sys.exit(f"flwr run {app_dir.name} failed (exit {code}); log:\n"
                 f"{deployment.log(log_name).read_text(errors='replace')[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smoke")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--per-message", action="store_true", help="Flower's ClientApp process per message")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node keys")
    args = parser.parse_args()

    from benchmarks import bare_flower
    from pfl import config
    from pfl.build import Hardware
    from pfl.flower.deploy import LoopbackDeployment
    from pfl.flower.security import Security, private_directory
    from pfl.run import train

    torch.set_num_threads(1)
    cfg, _ = config.load(args.recipe, ["rounds=5", *args.overrides])
    tmp = Path(tempfile.mkdtemp(prefix="pfl-bench-deploy-"))
    keys = None
    try:
        train(cfg, tmp / "local", Hardware(threads=1))
        local = per_round(tmp / "local")
        keys = None if args.insecure else private_directory()
        security = Security.insecure() if keys is None else Security.create(keys, ["127.0.0.1"], args.supernodes)
        config_path = tmp / "config.toml"
        config_path.write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
        workdir = tmp / "deployment"
        workdir.mkdir()
        with LoopbackDeployment(args.supernodes, workdir, warm=not args.per_message, security=security) as dep:
            code = dep.run_app({"config": str(config_path), "out": str(tmp / "pfl"), "num-supernodes": args.supernodes,
                                "accelerator": "cpu", "precision": "32-true", "tls": security.tls,
                                "node-auth": security.node_auth})
            if code != 0:
                sys.exit(f"pfl's run failed; log:\n{dep.log('flwr-run').read_text(errors='replace')[-3000:]}")
            pfl_served = served(dep, args.supernodes) if not args.per_message else []
            row = first_row(tmp / "pfl")
            clients = int(row["clients"])
            bare_app = workdir / "bare-app"
            bare_flower.write_app(bare_app)
            flwr_run(dep, bare_app, {"rounds": cfg.rounds, "clients": clients, "nodes": args.supernodes,
                                     "down-floats": int(row["bytes_down"]) // 4 // clients,
                                     "up-floats": int(row["bytes_up"]) // 4 // clients,
                                     "config-bytes": len(config_path.read_text()) + 120,
                                     "out": str(tmp / "bare.json")}, "bare-run")
            pfl_waves = waves(dep.log("flwr-run"))
            bare_served = ([after[len(before):] for before, after in zip(pfl_served, served(dep, args.supernodes))]
                           if not args.per_message else [])
            if not (tmp / "bare.json").is_file():
                sys.exit(f"the bare Flower run wrote no timings; its log:\n"
                         f"{dep.log('bare-run').read_text(errors='replace')[-3000:]}")
        bare = json.loads((tmp / "bare.json").read_text())["seconds_per_round"]
        pfl = per_round(tmp / "pfl")
    finally:
        if keys is not None:
            shutil.rmtree(keys, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    mode = "per-message ClientApps" if args.per_message else "warm ClientApps"
    print(f"recipe {args.recipe}, {args.supernodes} SuperNodes ({mode}, "
          f"{'insecure' if args.insecure else 'TLS + node keys'}), {cfg.rounds} rounds, {clients} clients per round; "
          f"medians over rounds 2..T")
    local_s, pfl_s, bare_s = (statistics.median(x[1:]) for x in (local, pfl, bare))
    count = statistics.median(n for n, _, _ in pfl_waves[1:])
    wall = statistics.median(w for _, w, _ in pfl_waves[1:])
    busy = statistics.median(b for _, _, b in pfl_waves[1:])
    print(f"local engine (this process, 1 thread): {local_s:.3f} s/round")
    print(f"bare Flower (same nodes, same message sizes, no training): {bare_s:.2f} s/round")
    print(f"pfl deployed: {pfl_s:.2f} s/round, {count:g} message wave(s) per round: {wall:.2f} s wall, of which "
          f"{busy:.2f} s in the busiest ClientApp (pfl's handlers) and {wall - busy:.2f} s Flower's messaging; "
          f"{pfl_s - wall:.2f} s pfl's server side")
    if not args.per_message:
        for name, per_node in (("pfl", pfl_served), ("bare Flower", bare_served)):
            times = [t for node in per_node for t in node]
            print(f"{name}: a warm ClientApp spends {statistics.median(times):.3f} s per message (median of "
                  f"{len(times)}; pulling the message, the handler, pushing the reply)")
    print(f"pfl / bare Flower round ratio: {pfl_s / bare_s:.2f}")
    print(f"pfl deployed / local engine: {pfl_s / local_s:.0f}x")


if __name__ == "__main__":
    main()
