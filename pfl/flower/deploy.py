"""A complete Flower deployment on loopback: one SuperLink, K SuperNodes (partition-id 0..K-1), and
`flwr run` of pfl's Flower app against them; every process started here is stopped here.

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
out = ""
num-supernodes = 0
accelerator = "cpu"
precision = "32-true"
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


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"{what} exited with code {proc.returncode} at start; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
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

    def __enter__(self) -> LoopbackDeployment:
        # orphans of detached Flower processes become our children, so that stopping finds them
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        bin_dir = str(Path(sys.executable).parent)
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "pfl-loopback"\n\n[superlink.pfl-loopback]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        try:
            self._start("superlink", [f"{bin_dir}/flower-superlink", "--insecure", "--host", "127.0.0.1",
                                      "--port", str(self.port)])
            _wait_for_port(self.port, self.processes["superlink"], 60, "the SuperLink", self.log("superlink"))
            for i in range(self.supernodes):
                runtime_port = free_port()  # the SuperNode's runtime API, where ClientApp processes connect
                node = self._start(f"supernode-{i}", [
                    f"{bin_dir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(runtime_port),
                    "--node-config", f"partition-id={i} num-partitions={self.supernodes}",
                    *(["--isolation", "process"] if self.warm else [])])
                if self.warm:
                    self._start(f"clientapp-{i}", [sys.executable, "-m", "pfl.flower.warm", "--runtime-api-address",
                                                   f"127.0.0.1:{runtime_port}", "--parent-pid", str(node.pid)])
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
        cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "--stream", "--run-config", items]
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
           on_line=None, keep_logs: bool = True, warm: bool = True) -> Path:
    """Run `cfg` on a loopback Flower deployment with `supernodes` SuperNodes; the run directory is `out`.
    `warm`: one long-running ClientApp process per SuperNode (else one per message, Flower's default).
    Returns `out`. Raises RunFailed (with the logs' location) when the run did not complete."""
    import tomli_w

    from pfl.rundir import prepare_output

    out = out.expanduser().absolute()
    prepare_output(out)
    if supernodes > cfg.num_clients:
        raise PflUserError(f"--supernodes: must be <= num_clients ({cfg.num_clients}), got {supernodes}")
    workdir = Path(tempfile.mkdtemp(prefix="pfl-deploy-"))
    config_path = workdir / "config.toml"
    config_path.write_text(tomli_w.dumps(cfg.as_nested()), encoding="utf-8")
    failed = False  # a failed run keeps its logs (and says where); success and interrupts leave nothing
    try:
        with LoopbackDeployment(supernodes, workdir, warm=warm) as deployment:
            code = deployment.run_app({"config": str(config_path), "out": str(out), "num-supernodes": supernodes,
                                       "accelerator": accelerator, "precision": precision}, on_line)
        if code != 0 or not (out / "summary.json").is_file():
            failed = True
            raise RunFailed(f"the deployed run did not complete (flwr run exit code {code}); logs of the "
                            f"SuperLink, SuperNodes and flwr run are in {workdir}")
        if keep_logs:
            shutil.copytree(workdir, out / "flower-logs", ignore=shutil.ignore_patterns("flwr-home", "app"))
    finally:
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    return out
