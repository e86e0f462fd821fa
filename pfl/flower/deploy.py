"""A complete Flower deployment on loopback: one SuperLink, K SuperNodes (partition-id 0..K-1), and
`flwr run` of pfl's Flower app against them; every process started here is stopped here.

Secure by default (pfl.flower.security): the SuperLink serves TLS with a certificate for the address it binds
(a throwaway CA, or the user's `--certificates`), requires SuperNode authentication (one P-384 key pair per
SuperNode, registered with `flwr supernode register` before the node starts), and each SuperNode requires a
runtime secret of the warm ClientApp process that acquires its tasks; `Security.insecure()` is plain HTTP on
loopback with any SuperNode accepted.

This is the real deployment path (separate processes talking over HTTP, ClientApps in their own
processes), only on one machine. By default each SuperNode runs with `--isolation process` and one warm
ClientApp process (pfl/flower/warm.py) that serves all of its messages; `warm=False` is Flower's default,
a fresh `flwr-clientapp` process per message. On several machines the same three commands run on different hosts
(docs/distributed.md). This process makes itself a child subreaper, so that the detached processes
Flower spawns (SuperExec, ServerApp, ClientApps) stay its descendants and are stopped with the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pfl.errors import PflUserError, RunFailed
from pfl.flower.security import Security, make_secret, private_directory

PR_SET_CHILD_SUBREAPER = 36
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "pfl-flower-app"
version = "1.0.0"
description = "pfl's ServerApp and ClientApp (pfl must be installed where they run)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pfl"

[tool.flwr.app.components]
serverapp = "pfl.flower.server:server_app"
clientapp = "pfl.flower.app:client_app"

[tool.flwr.app.config]
config = ""
recipe = ""
out = ""
num-supernodes = 0
accelerator = "cpu"
precision = "32-true"
tls = false
node-auth = false
"""


def write_app(directory: Path) -> Path:
    """The Flower app project `flwr run` submits: only a pyproject.toml naming pfl's components."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path | None = None) -> dict[str, str]:
    """The environment every Flower process of pfl's runs with: this interpreter's bin/ first on PATH,
    telemetry and runtime dependency installation off, flwr's config in `home` (FLWR_HOME)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def flower_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def superlink_command(host: str, port: int, security: Security) -> list[str]:
    """flower-superlink serving every API (fleet, control, runtime) on host:port."""
    return [flower_bin("flower-superlink"), *security.superlink_args(), "--host", host, "--port", str(port)]


def supernode_command(superlink: str, partition: int, partitions: int, runtime_port: int, security: Security,
                      index: int | None = None, warm: bool = True, node_config: str = "",
                      private_key: Path | None = None, secret: Path | None = None) -> list[str]:
    """flower-supernode for partition `partition` of `partitions`, dialing `superlink` (host:port), its
    runtime API on 127.0.0.1:`runtime_port`; `warm`: process isolation (pfl's warm ClientApp serves it)."""
    if security.tls and private_key is None and security.node_auth:
        private_key = security.node_keys[partition if index is None else index][0]
    tls = ["--insecure"] if not security.tls else ["--root-certificates", str(security.ca)]
    auth = ["--auth-supernode-private-key", str(private_key)] if private_key is not None else []
    secret = secret if secret is not None else (security.secret if security.tls else None)
    isolation = ["--isolation", "process"] if warm else []
    runtime_secret = ["--superexec-auth-secret-file", str(secret)] if warm and secret is not None else []
    config = f"partition-id={partition} num-partitions={partitions}" + (f" {node_config}" if node_config else "")
    return [flower_bin("flower-supernode"), *tls, *auth, "--superlink", superlink, "--host", "127.0.0.1",
            "--port", str(runtime_port), "--node-config", config, *isolation, *runtime_secret]


def warm_command(runtime_port: int, supernode_pid: int, secret: Path | None) -> list[str]:
    """pfl's warm ClientApp process for the SuperNode whose runtime API is on 127.0.0.1:`runtime_port`."""
    return [sys.executable, "-m", "pfl.flower.warm", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--parent-pid", str(supernode_pid),
            *(["--superexec-auth-secret-file", str(secret)] if secret is not None else [])]


def register_node(public_key: Path, connection: str, env: dict[str, str], timeout: float = 60) -> str:
    """`flwr supernode register` of a SuperNode's public key with the SuperLink `connection` (an entry of
    $FLWR_HOME/config.toml in `env`). Returns flwr's output; raises RunFailed when flwr refuses."""
    done = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), connection],
                          capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "registered successfully" not in output:
        said = [line.strip(" │╭╮╰╯─\t") for line in output.splitlines()]  # flwr frames its errors in a box
        said = [line for line in said if line]
        raise RunFailed(f"`flwr supernode register {public_key}` failed (exit code {done.returncode}): "
                        f"{' '.join(said[-3:]) if said else 'no output'}")
    return output


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path,
                   host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"{what} exited with code {proc.returncode} at start; see {log}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RunFailed(f"{what} did not open port {port} within {timeout:.0f} s; see {log}")


def descendants(pid: int) -> list[int]:
    """Live (not zombie) descendants of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] == "Z":
            continue
        children.setdefault(int(rest[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _reap() -> None:
    """Collect exited children (as a subreaper, orphans of Flower's processes become ours)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_all_descendants(grace: float = 5.0) -> None:
    """SIGTERM every descendant of this process, SIGKILL what is left after `grace` seconds, reap all."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = descendants(me)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and descendants(me):
            _reap()
            time.sleep(0.1)
        _reap()
        if not descendants(me):
            return


@dataclass
class LoopbackDeployment:
    """SuperLink + SuperNodes + `flwr run`, with logs in `workdir`. Use as a context manager."""

    supernodes: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    port: int = 0
    warm: bool = True
    security: Security = field(default_factory=Security.insecure)

    def __enter__(self) -> LoopbackDeployment:
        become_subreaper()  # orphans of detached Flower processes become our children: stopping finds them
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        address = f"127.0.0.1:{self.port}"
        (home / "config.toml").write_text('[superlink]\ndefault = "pfl-loopback"\n\n'
                                          + self.security.connection_toml("pfl-loopback", address), encoding="utf-8")
        self.env = flower_env(home)
        try:
            self._start("superlink", superlink_command("127.0.0.1", self.port, self.security))
            _wait_for_port(self.port, self.processes["superlink"], 60, "the SuperLink", self.log("superlink"))
            if self.security.node_auth:  # a node whose key is not registered is refused by the SuperLink
                for _, public in self.security.node_keys[:self.supernodes]:
                    register_node(public, "pfl-loopback", self.env)
            for i in range(self.supernodes):
                runtime_port = free_port()  # the SuperNode's runtime API, where ClientApp processes connect
                # on one machine the nodes keep their states in the run directory the server names
                node = self._start(f"supernode-{i}", supernode_command(address, i, self.supernodes, runtime_port,
                                                                       self.security, warm=self.warm,
                                                                       node_config="allow-server-paths=true"))
                if self.warm:
                    self._start(f"clientapp-{i}", warm_command(runtime_port, node.pid, self.security.secret))
        except BaseException:
            self.stop()
            raise
        return self

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.log(name), "wb") as out:
            self.processes[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                    cwd=self.workdir, stdin=subprocess.DEVNULL)
        return self.processes[name]

    def run_app(self, run_config: dict[str, object], on_line=None) -> int:
        """`flwr run` pfl's app with `run_config`; streams its log lines to `on_line`; returns its exit code."""
        app_dir = write_app(self.workdir / "app")
        items = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        cmd = [flower_bin("flwr"), "run", str(app_dir), "--stream", "--run-config", items]
        with open(self.log("flwr-run"), "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.workdir, stdin=subprocess.DEVNULL)
            self.processes["flwr-run"] = proc
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.decode(errors="replace").rstrip())
            return proc.wait()

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        stop_all_descendants()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __exit__(self, *exc) -> None:
        self.stop()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" in text or "\n" in text:
        raise PflUserError(f"path {text!r} cannot be passed to `flwr run` (contains a quote or newline)")
    return f"'{text}'"


def deploy(cfg, out: Path, supernodes: int, accelerator: str = "cpu", precision: str = "32-true",
           on_line=None, keep_logs: bool = True, warm: bool = True, insecure: bool = False,
           certificates: Path | None = None) -> Path:
    """Run `cfg` on a loopback Flower deployment with `supernodes` SuperNodes; the run directory is `out`.
    `warm`: one long-running ClientApp process per SuperNode (else one per message, Flower's default).
    Secure unless `insecure`: TLS (a throwaway CA and certificate for 127.0.0.1, or the user's `certificates`
    directory: ca.crt, server.crt, server.key), registered SuperNode keys and a runtime secret, all in a private
    directory removed at the end. Returns `out`. Raises RunFailed (with the logs' location) when the run did
    not complete."""
    import tomli_w

    from pfl.rundir import prepare_output

    out = out.expanduser().absolute()
    prepare_output(out)
    if supernodes > cfg.num_clients:
        raise PflUserError(f"--supernodes: must be <= num_clients ({cfg.num_clients}), got {supernodes}")
    if insecure and certificates is not None:
        raise PflUserError("--certificates: not with --insecure (TLS is off), give one or the other")
    workdir = Path(tempfile.mkdtemp(prefix="pfl-deploy-"))
    config_path = workdir / "config.toml"
    config_path.write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
    failed = False  # a failed run keeps its logs (and says where); success and interrupts leave nothing
    keys = None
    try:
        if insecure:
            security = Security.insecure()
        else:  # keys, certificates and the runtime secret live only as long as the deployment
            keys = private_directory()
            security = Security.create(keys, ["127.0.0.1"], supernodes, certificates)
        with LoopbackDeployment(supernodes, workdir, warm=warm, security=security) as deployment:
            code = deployment.run_app({"config": str(config_path), "out": str(out), "num-supernodes": supernodes,
                                       "accelerator": accelerator, "precision": precision,
                                       "tls": security.tls, "node-auth": security.node_auth}, on_line)
        if code != 0 or not (out / "summary.json").is_file():
            failed = True
            raise RunFailed(f"the deployed run did not complete (flwr run exit code {code}); logs of the "
                            f"SuperLink, SuperNodes and flwr run are in {workdir}")
        if keep_logs:
            shutil.copytree(workdir, out / "flower-logs", ignore=shutil.ignore_patterns("flwr-home", "app"))
    finally:
        if keys is not None:
            shutil.rmtree(keys, ignore_errors=True)
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---------------------------------------------------------------- several machines: one service per host

def become_subreaper() -> None:
    """Orphans of the detached processes Flower spawns (SuperExec, ServerApp, ClientApps) become children
    of this process, so that stop_all_descendants finds them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def split_address(address: str, option: str) -> tuple[str, int]:
    """'host:port' (IPv6: '[addr]:port') -> (host, port); PflUserError naming `option` otherwise."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PflUserError(f"{option}: expected HOST:PORT (e.g. 10.0.0.5:9092), got {address!r}")
    return host, int(port)


def flwr_home(directory: Path, address: str, security: Security, name: str = "pfl") -> Path:
    """A FLWR_HOME whose config.toml has one SuperLink connection `name` (the default) for `address`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n'
                                           + security.connection_toml(name, address), encoding="utf-8")
    return directory


def _until_stopped(processes: dict[str, subprocess.Popen], main: str, on_ready=None) -> int:
    """Call `on_ready` (if any), then wait until process `main` exits or this process gets SIGTERM / SIGINT;
    then stop every descendant. Returns `main`'s exit code (0 when stopped by a signal)."""
    if on_ready is not None:
        on_ready()
    stopped = []

    def handler(signum, frame):
        stopped.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopped and processes[main].poll() is None:
            _reap_others(processes)
            time.sleep(0.2)
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
        stop_all_descendants()
        for proc in processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0 if stopped else (processes[main].returncode or 0)


def _reap_others(processes: dict[str, subprocess.Popen]) -> None:
    """Collect exited orphans that became this process's children (not the Popen children, whose exit codes
    are read through their Popen objects)."""
    mine = {p.pid for p in processes.values()}
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if rest[0] == "Z" and rest[1] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def run_superlink(host: str, port: int, security: Security, register: list[Path], on_ready=None) -> int:
    """flower-superlink on host:port (TLS + SuperNode authentication, or `Security.insecure()`), the keys in
    `register` registered once it is up; runs until it exits or this process is stopped. Returns its code."""
    become_subreaper()
    dial = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    home = private_directory("pfl-flwr-home-")
    env = flower_env(flwr_home(home, f"{dial}:{port}", security))
    processes = {}
    try:
        processes["superlink"] = subprocess.Popen(superlink_command(host, port, security), env=env,
                                                  stdin=subprocess.DEVNULL)
        _wait_for_port(port, processes["superlink"], 60, "the SuperLink", Path("(its output above)"), host=dial)
        for public in register:
            register_node(public, "pfl", env)
        return _until_stopped(processes, "superlink", on_ready)
    finally:
        if processes:
            stop_all_descendants()
        shutil.rmtree(home, ignore_errors=True)


def run_supernode(superlink: str, partition: int, partitions: int, security: Security, private_key: Path | None,
                  state_dir: Path, data_dir: Path | None = None, warm: bool = True, on_ready=None) -> int:
    """flower-supernode for partition `partition` of `partitions` dialing `superlink`, its clients' states in
    `state_dir` (and the data set in `data_dir`, default: the recipe's), with pfl's warm ClientApp process
    signing its runtime calls with a fresh secret (unless `warm` is off); runs until the SuperNode exits or
    this process is stopped. Returns the SuperNode's exit code."""
    become_subreaper()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_config = f"state-dir={_toml_value(str(state_dir))}"
    if data_dir is not None:
        node_config += f" data-dir={_toml_value(str(data_dir))}"
    keys = private_directory("pfl-node-")
    processes: dict[str, subprocess.Popen] = {}
    try:
        secret = make_secret(keys / "runtime.secret") if warm else None
        env = flower_env(state_dir / "flwr-home")  # Flower unpacks the app there: the node writes nowhere else
        runtime_port = free_port()
        processes["supernode"] = subprocess.Popen(
            supernode_command(superlink, partition, partitions, runtime_port, security, warm=warm,
                              node_config=node_config, private_key=private_key, secret=secret),
            env=env, stdin=subprocess.DEVNULL, cwd=state_dir)
        if warm:
            processes["clientapp"] = subprocess.Popen(
                warm_command(runtime_port, processes["supernode"].pid, secret), env=env, stdin=subprocess.DEVNULL,
                cwd=state_dir)
        return _until_stopped(processes, "supernode", on_ready)
    finally:
        if processes:
            stop_all_descendants()
        shutil.rmtree(keys, ignore_errors=True)


def submit(cfg, superlink: str, security: Security, supernodes: int, out: str, accelerator: str = "cpu",
           precision: str = "32-true", on_line=None) -> None:
    """`flwr run` of pfl's app against `superlink` with the resolved recipe itself in the run config (the
    server machine needs no recipe file); `out` is the run directory on the server machine. Raises RunFailed
    when the run did not finish."""
    import tomli_w

    work = private_directory("pfl-submit-")
    try:
        env = flower_env(flwr_home(work / "flwr-home", superlink, security))
        app_dir = write_app(work / "app")
        run_config = work / "run-config.toml"
        run_config.write_text(tomli_w.dumps({
            "recipe": tomli_w.dumps(cfg.as_nested()), "out": out, "num-supernodes": supernodes,
            "accelerator": accelerator, "precision": precision, "tls": security.tls,
            "node-auth": security.node_auth}), encoding="utf-8")
        proc = subprocess.Popen([flower_bin("flwr"), "run", str(app_dir), "pfl", "--stream", "--run-config",
                                 str(run_config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=work, stdin=subprocess.DEVNULL)
        finished, tail = False, []
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                tail = (tail + [line])[-20:]
                finished = finished or "pfl: run finished" in line
                if on_line is not None:
                    on_line(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        if code != 0 or not finished:
            last = [t for t in tail if t.strip()]
            raise RunFailed(f"the submitted run did not finish (flwr run exit code {code}): "
                            f"{last[-1] if last else 'no output'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
