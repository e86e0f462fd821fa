"""The ServerApp of a Flower deployment (`flwr run`, started by `pfl deploy`): pfl's usual run
(pfl.run.train) on the flower engine, its messages sent through the deployment's Grid. It sits above
pfl.run, which the rest of pfl.flower sits below."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pfl import config as config_mod
from pfl.federation import Callbacks
from pfl.run import FlowerTarget, Hardware, train

log = logging.getLogger("pfl")

server_app = ServerApp()


@server_app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    """`flwr run` entry point: the run config holds the resolved recipe (`recipe`: its TOML text, or
    `config`: a file on this machine) and names the output directory on this machine, and
    says how the deployment was secured (`tls`, `node-auth`: recorded in summary.json's `deployment`);
    everything else is pfl's usual run."""
    run_config: dict[str, Any] = dict(context.run_config)
    supernodes = int(run_config.get("num-supernodes", 0))
    deployment = {"tls": bool(run_config.get("tls", False)), "node_auth": bool(run_config.get("node-auth", False)),
                  "supernodes": supernodes}
    if run_config.get("recipe"):  # `pfl submit`: the resolved recipe itself, from the submitting machine
        cfg = config_mod.resolve(config_mod.from_toml(str(run_config["recipe"])).as_flat(), {"engine": "flower"})
        source = "submitted with the run (pfl submit)"
    else:  # `pfl deploy`: a recipe file on this machine
        raw, source = config_mod.read_recipe_file(str(run_config["config"]))
        cfg = config_mod.resolve(raw, {"engine": "flower"})
    hw = Hardware(accelerator=str(run_config.get("accelerator", "cpu")),
                  precision=str(run_config.get("precision", "32-true")))
    summary = train(cfg, Path(str(run_config["out"])), hw, recipe_source=source,
                    flower=FlowerTarget(grid, expected_nodes=supernodes), callbacks=LogRounds(),
                    extra_summary={"deployment": deployment})
    log.warning("pfl: run finished: final mean accuracy %.4f, written to %s (TLS %s, SuperNode authentication "
                "%s)", summary["final"]["acc_mean"], run_config["out"], "on" if deployment["tls"] else "off",
                "on" if deployment["node_auth"] else "off")


class LogRounds(Callbacks):
    """Progress of a deployed run as log lines (the ServerApp has no terminal of its own), with each message
    wave's wall time against the time the busiest node's ClientApp spent on it (the rest is Flower's
    messaging: its polling intervals and transfers)."""

    def __init__(self):
        self.run = None

    def on_run_start(self, run) -> None:
        self.run = run

    def on_round_end(self, record):
        acc = record.get("acc_mean", math.nan)
        timing = getattr(self.run.workers, "round_timing", {}) if self.run is not None else {}
        waves = "; ".join(f"{wave} {wall:.2f} s wall, {busy:.2f} s in the busiest ClientApp"
                          for wave, (wall, busy) in timing.items())
        log.warning("pfl: round %d: %d clients, %d dropped, mean accuracy %s%s", record["round"], record["clients"],
                    record["clients_dropped"], "-" if math.isnan(acc) else f"{acc:.4f}",
                    f" | messages: {waves}" if waves else "")
