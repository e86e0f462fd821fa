"""The Flower deployment commands (`pfl deploy`, `certificates`, `superlink`, `register`, `supernode`,
`submit`): a deployment's processes and keys. cli.main registers them on the one `pfl` app, in this order."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from cli.options import ClientAccelerator, ClientPrecision, NewRunDir, Recipe, RootCertificates, Seed, Sets, SuperLink
from cli.ui import RUN_FAILED, console, exits, interrupt_on_sigterm, print_run, say

MAX_LOOPBACK_SUPERNODES = 64  # pfl deploy: SuperNodes on this one machine


def _show(line: str) -> None:
    """A Flower process's output line worth showing: pfl's own, errors, dropped clients."""
    if "pfl:" in line or "ERROR" in line or "dropped" in line:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def deploy(
    recipe: Recipe,
    set_: Sets = None,
    supernodes: int = typer.Option(3, "--supernodes", "-n", help="SuperNodes to start; node p serves the "
                                   "clients k with k mod SUPERNODES = p"),
    out: NewRunDir = None,
    seed: Seed = None,
    precision: ClientPrecision = "32-true",
    accelerator: ClientAccelerator = "cpu",
    warm: bool = typer.Option(True, "--warm/--per-message", help="one long-running ClientApp process per "
                              "SuperNode (keeps torch, data and models loaded), or Flower's default: a fresh "
                              "ClientApp process per message"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP and any SuperNode accepted (a loopback "
                                  "demo only); default: TLS, registered SuperNode keys and a runtime secret"),
    certificates: Path | None = typer.Option(None, "--certificates", help="directory with your ca.crt, "
                                             "server.crt (valid for 127.0.0.1) and server.key, instead of a "
                                             "throwaway CA"),
) -> None:
    """Run a recipe on a real Flower deployment on this machine: a SuperLink, SUPERNODES SuperNodes and
    `flwr run` of pfl's Flower app, each its own process over loopback; all of them stopped at the end.
    Secure by default: TLS (a throwaway CA, or --certificates), SuperNode keys registered with the
    SuperLink, a runtime secret between each SuperNode and its ClientApp; the keys are removed at the end."""
    interrupt_on_sigterm()
    from pfl import config, rundir
    from pfl import run as run_mod
    from pfl.errors import PflUserError

    with exits(RUN_FAILED, "interrupted: every Flower process was stopped; nothing was written"):
        cfg, _source = config.load(recipe, (set_ or []) + ["engine=flower"], seed)
        if not 1 <= supernodes <= MAX_LOOPBACK_SUPERNODES:
            raise PflUserError(f"--supernodes: must be 1..{MAX_LOOPBACK_SUPERNODES} (each SuperNode is two processes "
                               f"on this machine; more nodes: `pfl supernode` on other hosts), got {supernodes}")
        target = out or Path("runs") / f"{cfg.name}-{cfg.method}-deploy-{datetime.now():%Y%m%d-%H%M%S}"
        rundir.prepare_output(target)
        run_mod.check_engine(cfg, run_mod.Hardware(accelerator, 1, precision), simulated=False)
        if supernodes > cfg.num_clients:
            raise PflUserError(f"--supernodes: must be <= num_clients ({cfg.num_clients}), got {supernodes}")
        if insecure and certificates is not None:
            raise PflUserError("--certificates: not with --insecure (TLS is off), give one or the other")
        if certificates is not None:
            from pfl.flower.security import certificate_files

            certificate_files(certificates)
        run_mod.build(cfg)  # a missing data set or an unfit model is reported here, before any process starts
        from pfl.flower.deploy import deploy as deploy_run

        console.print(f"[bold]pfl deploy[/] {cfg.method} on {cfg.dataset}: N={cfg.num_clients}, T={cfg.rounds}, "
                      f"seed {cfg.seed}; a SuperLink and {supernodes} SuperNodes on 127.0.0.1 "
                      f"({'insecure: no TLS, any SuperNode' if insecure else 'TLS, registered SuperNode keys'})"
                      f" -> {target}")
        run_dir = deploy_run(cfg, Path(target), supernodes, accelerator, precision, on_line=_show, warm=warm,
                             insecure=insecure, certificates=certificates)
    print_run(run_dir, json.loads((run_dir / "summary.json").read_text()))


def _flower_security(insecure: bool, root_certificates: Path | None, key: Path | None = None):
    """The Security of a SuperNode or a submitting machine: TLS against `root_certificates` (a CA file)."""
    from pfl.errors import PflUserError
    from pfl.flower.security import Security, check_node_key

    if insecure:
        if root_certificates is not None or key is not None:
            raise PflUserError("--insecure: not with --root-certificates or --key (TLS is off), give one or the other")
        return Security.insecure()
    if root_certificates is None:
        raise PflUserError("--root-certificates: required (the SuperLink's ca.crt from `pfl certificates`), or "
                           "--insecure for a loopback demo")
    if not root_certificates.expanduser().is_file():
        raise PflUserError(f"--root-certificates: {str(root_certificates)!r} is not a file")
    if key is not None:
        check_node_key(key)
    ca = root_certificates.expanduser().absolute()
    return Security(directory=ca.parent, ca=ca, node_auth=True)


def certificates(
    out: Path = typer.Option(..., "--out", "-o", help="directory to create (must not exist), mode 0700"),
    address: list[str] = typer.Option(..., "--address", "-a", help="an IP address or host name the SuperNodes "
                                      "dial to reach the SuperLink (repeatable); 127.0.0.1 and localhost are "
                                      "always included"),
    nodes: int = typer.Option(0, "--nodes", "-n", help="also make this many SuperNode key pairs, "
                              "node-<i>.key / node-<i>.pub"),
) -> None:
    """Make a deployment's keys: a CA (ca.crt, ca.key), the SuperLink's certificate for ADDRESS (server.crt,
    server.key) and NODES SuperNode key pairs (P-384, OpenSSH). Copy ca.crt and node-<i>.key to SuperNode i;
    ca.key and the .key files never leave the machine they are for."""
    from pfl.errors import PflUserError
    from pfl.flower.security import certificate_names, make_certificates, make_node_key

    with exits():
        if out.exists():
            raise PflUserError(f"--out: {str(out)!r} already exists")
        if nodes < 0:
            raise PflUserError(f"--nodes: must be >= 0, got {nodes}")
        if not all(a.strip() and " " not in a for a in address):
            raise PflUserError(f"--address: an IP address or host name without spaces, got {address}")
        out.mkdir(parents=True, mode=0o700)
        out.chmod(0o700)
        make_certificates(out, address)
        for i in range(nodes):
            make_node_key(out, f"node-{i}")
    console.print(f"wrote {out}: ca.crt, ca.key, server.crt, server.key (valid for "
                  f"{', '.join(certificate_names(out / 'server.crt'))})"
                  f"{f', node-0..{nodes - 1}.key/.pub' if nodes else ''}", markup=False)


def superlink(
    certificates_dir: Path | None = typer.Option(None, "--certificates", help="directory with ca.crt, server.crt "
                                                 "and server.key (`pfl certificates`)"),
    host: str = typer.Option(..., "--host", help="address to serve on (one the certificate names; the SuperNodes "
                             "dial it)"),
    port: int = typer.Option(9092, "--port", help="port of every SuperLink API (fleet, control, runtime)"),
    register: list[Path] | None = typer.Option(None, "--register", help="a SuperNode public key (node-<i>.pub) to "
                                               "register once the SuperLink is up (repeatable)"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP and any SuperNode accepted (a loopback "
                                  "demo only)"),
) -> None:
    """Run the SuperLink of a deployment on this machine, with TLS and SuperNode authentication (only
    registered node keys may join), until Ctrl-C or SIGTERM; prints what the other machines need."""
    from pfl.errors import PflUserError
    from pfl.flower import deploy as dep
    from pfl.flower.security import Security, certificate_files, certificate_names

    with exits("superlink failed: {}"):
        if not 0 < port < 65536:
            raise PflUserError(f"--port: must be 1..65535, got {port}")
        if insecure:
            if certificates_dir is not None or register:
                raise PflUserError("--insecure: not with --certificates or --register (no TLS, no node keys)")
            security = Security.insecure()
        else:
            if certificates_dir is None:
                raise PflUserError("--certificates: required (a directory made by `pfl certificates`), or --insecure")
            ca, cert, key = certificate_files(certificates_dir)
            names = certificate_names(cert)
            if host not in ("0.0.0.0", "::") and host not in names:
                raise PflUserError(f"--host: {host!r} is not among the names server.crt is valid for "
                                   f"({', '.join(names)})")
            security = Security(directory=ca.parent, ca=ca, server_cert=cert, server_key=key, node_auth=True)
        for public in register or []:
            if not public.is_file():
                raise PflUserError(f"--register: {str(public)!r} is not a file")
        address = f"{host}:{port}"

        def ready() -> None:
            tls = "" if insecure else f" --root-certificates {security.ca.name}"
            say(f"pfl: SuperLink serving on {address} ({'INSECURE' if insecure else 'TLS, SuperNode authentication'}"
                f"); {len(register or [])} node keys registered.\n"
                f"  each SuperNode host i of K: pfl supernode --superlink {address}{tls}"
                f"{'' if insecure else ' --key node-<i>.key'} --partition-id i --num-partitions K --state-dir DIR\n"
                f"  more node keys: pfl register --superlink {address}{tls} node-<i>.pub\n"
                f"  submit a run: pfl submit --recipe R --superlink {address}{tls} --supernodes K --out "
                f"DIR-ON-THIS-HOST")

        code = dep.run_superlink(host, port, security, [p.absolute() for p in register or []], on_ready=ready)
    raise typer.Exit(code=1 if code else 0)


def register(
    public_keys: Annotated[list[Path], typer.Argument(help="SuperNode public keys (node-<i>.pub)")],
    superlink_address: SuperLink,
    root_certificates: RootCertificates = None,
) -> None:
    """Register SuperNode public keys with a running SuperLink (`flwr supernode register`), so that the
    SuperNodes holding the private keys may join."""
    import shutil

    from pfl.errors import PflUserError
    from pfl.flower import deploy as dep
    from pfl.flower.security import private_directory

    with exits("register failed: {}"):
        dep.split_address(superlink_address, "--superlink")
        security = _flower_security(False, root_certificates)
        for public in public_keys:
            if not public.is_file():
                raise PflUserError(f"PUBLIC_KEYS: {str(public)!r} is not a file")
        home = private_directory("pfl-flwr-home-")
        try:
            env = dep.flower_env(dep.flwr_home(home, superlink_address, security))
            for public in public_keys:
                dep.register_node(public.absolute(), "pfl", env)
                console.print(f"registered {public}", markup=False)
        finally:
            shutil.rmtree(home, ignore_errors=True)


def supernode(
    superlink_address: SuperLink,
    partition_id: int = typer.Option(..., "--partition-id", help="this node's partition i: it serves the clients "
                                     "k with k mod NUM_PARTITIONS = i"),
    num_partitions: int = typer.Option(..., "--num-partitions", help="K, the number of SuperNodes"),
    root_certificates: RootCertificates = None,
    key: Path | None = typer.Option(None, "--key", help="this node's private key (node-<i>.key), whose public key "
                                    "is registered with the SuperLink"),
    state_dir: Path = typer.Option(Path("pfl-node-state"), "--state-dir", help="where this node keeps its "
                                   "clients' states (and Flower's app files); it writes nowhere else"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="where this node keeps the data set (default: "
                                         "the recipe's data_dir)"),
    warm: bool = typer.Option(True, "--warm/--per-message", help="one long-running ClientApp process, or "
                              "Flower's default: a ClientApp process per message"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP, no node key (a loopback demo only)"),
) -> None:
    """Run a SuperNode of a deployment on this machine (with pfl's warm ClientApp process) until Ctrl-C or
    SIGTERM."""
    from pfl.errors import PflUserError
    from pfl.flower import deploy as dep

    with exits():
        dep.split_address(superlink_address, "--superlink")
        if num_partitions < 1:
            raise PflUserError(f"--num-partitions: must be >= 1, got {num_partitions}")
        if not 0 <= partition_id < num_partitions:
            raise PflUserError(f"--partition-id: must be 0..{num_partitions - 1} (--num-partitions "
                               f"{num_partitions}), got {partition_id}")
        if not insecure and key is None:
            raise PflUserError("--key: required (this node's node-<i>.key from `pfl certificates`), or --insecure")
        security = _flower_security(insecure, root_certificates, key)
        if state_dir.exists() and not state_dir.is_dir():
            raise PflUserError(f"--state-dir: {str(state_dir)!r} exists and is not a directory")
        if data_dir is not None and not data_dir.is_dir():
            raise PflUserError(f"--data-dir: {str(data_dir)!r} is not a directory")
        for text in (str(state_dir.absolute()), str(data_dir.absolute()) if data_dir else ""):
            if "'" in text or "\n" in text:
                raise PflUserError(f"--state-dir/--data-dir: {text!r} contains a quote or newline")
    say(f"pfl: SuperNode {partition_id} of {num_partitions} -> {superlink_address} "
        f"({'INSECURE' if insecure else 'TLS, node key ' + str(key)}), states in {state_dir}")
    code = dep.run_supernode(superlink_address, partition_id, num_partitions, security,
                             key.expanduser().absolute() if key else None, state_dir.absolute(),
                             data_dir.absolute() if data_dir else None, warm=warm)
    raise typer.Exit(code=1 if code else 0)


def submit(
    recipe: str = typer.Option(..., "--recipe", "-r", help="bundled recipe name or a .toml path (on this machine)"),
    set_: Sets = None,
    seed: Seed = None,
    superlink_address: SuperLink = ...,
    root_certificates: RootCertificates = None,
    supernodes: int = typer.Option(..., "--supernodes", "-n", help="K, the SuperNodes the run waits for"),
    out: str = typer.Option(..., "--out", "-o", help="run directory to create ON THE SUPERLINK'S MACHINE"),
    precision: ClientPrecision = "32-true",
    accelerator: ClientAccelerator = "cpu",
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP (a loopback demo only)"),
) -> None:
    """Submit a recipe to a running deployment (`flwr run` of pfl's app with the resolved recipe in the run
    config); streams the run's progress and exits 0 when it finished, 1 when it did not."""
    from pfl import config
    from pfl.errors import PflUserError
    from pfl.flower import deploy as dep

    with exits(RUN_FAILED, "interrupted: `flwr run` was stopped (the run goes on on the SuperLink: `flwr stop`)"):
        cfg, _source = config.load(recipe, (set_ or []) + ["engine=flower"], seed)
        dep.split_address(superlink_address, "--superlink")
        if supernodes < 1 or supernodes > cfg.num_clients:
            raise PflUserError(f"--supernodes: must be 1..num_clients ({cfg.num_clients}), got {supernodes}")
        if not out.startswith("/") or "'" in out or "\n" in out:
            raise PflUserError(f"--out: an absolute path on the SuperLink's machine without quotes, got {out!r}")
        security = _flower_security(insecure, root_certificates)
        security.node_auth = not insecure  # `pfl superlink` requires registered node keys unless --insecure
        dep.submit(cfg, superlink_address, security, supernodes, out, accelerator, precision, on_line=_show)


COMMANDS = (deploy, certificates, superlink, register, supernode, submit)
