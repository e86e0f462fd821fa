"""A deployment across "machines" without leaving this one: the SuperLink and every SuperNode run in their
own Linux network namespace, joined by veth pairs to a bridge in a hub namespace (10.213.7.0/24 exists only
on those veths, inside namespaces this test creates; nothing is routed anywhere else). The processes are
started with pfl's per-host commands (`pfl certificates`, `pfl superlink`, `pfl supernode`, `pfl submit`),
as a user would on real hosts: TLS with a certificate for the SuperLink's namespace address, registered
P-384 node keys, a runtime secret between each SuperNode and its warm ClientApp.

Needs root (namespaces); skipped with the reason otherwise."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install '.[flower]'")

from safetensors.torch import load_file

from pfl import config
from pfl.flower.deploy import descendants
from pfl.run import Hardware, train

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.heavy]
REPO = Path(__file__).resolve().parents[1]
TAG = f"{os.getpid()}"
HUB, LINK = f"pfl-hub-{TAG}", f"pfl-link-{TAG}"
SUBNET = "10.213.7"
LINK_ADDRESS, PORT = f"{SUBNET}.1", 9092
SUPERLINK = f"{LINK_ADDRESS}:{PORT}"


def node_ns(i: int) -> str:
    return f"pfl-node{i}-{TAG}"


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def our_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in listed.splitlines() if line.split() and line.split()[0].endswith(f"-{TAG}")]


@contextlib.contextmanager
def network(nodes: int):
    """The hub (a bridge), the SuperLink's namespace (10.213.7.1) and `nodes` node namespaces (10.213.7.10+i),
    each joined to the bridge by a veth pair created inside the hub; every namespace is deleted at the end,
    also on failure."""
    # CI runs as root with iproute2 (.ci/run installs it): there the test must run, not skip
    cannot = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    if os.geteuid() != 0:
        cannot("network namespaces need root")
    try:
        ip("netns", "add", HUB)
    except (RuntimeError, OSError) as exc:
        cannot(f"`ip netns` is not usable here: {exc}")
    try:
        ip("-n", HUB, "link", "set", "lo", "up")
        ip("-n", HUB, "link", "add", "br0", "type", "bridge")
        ip("-n", HUB, "link", "set", "br0", "up")
        hosts = [(LINK, "vl", LINK_ADDRESS)] + [(node_ns(i), f"v{i}", f"{SUBNET}.{10 + i}") for i in range(nodes)]
        for ns, hub_end, address in hosts:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", HUB, "link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", HUB, "link", "set", hub_end, "master", "br0")
            ip("-n", HUB, "link", "set", hub_end, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield
    finally:
        for ns in our_namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Hosts:
    """Processes started in namespaces (`ip netns exec` execs the command: the pid is the process's own), each
    with its output in a log file; stopped by pid (SIGTERM: pfl's commands then stop what they started)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "COLUMNS": "200",
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, ns: str, *pfl_args: str, stdout=None) -> subprocess.Popen:
        with open(self.log(name), "wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cli.main", *pfl_args],
                                    stdout=stdout or log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=REPO)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)
        # whatever a killed command left (it had no chance to stop its own children)
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def submit(hosts: Hosts, name: str, overrides: dict, out: Path, on_line=None) -> tuple[int, str]:
    args = ["submit", "--recipe", "smoke", "--superlink", SUPERLINK, "--root-certificates",
            str(hosts.workdir / "certs" / "ca.crt"), "--supernodes", "2", "--out", str(out)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    proc = hosts.start(name, LINK, *args, stdout=subprocess.PIPE)
    lines = []
    with open(hosts.log(name), "w") as log:
        for line in proc.stdout:
            text = line.decode(errors="replace")
            lines.append(text)
            log.write(text)
            log.flush()
            if on_line is not None:
                on_line(text)
    return proc.wait(timeout=600), "".join(lines)


def node_states(state_dir: Path) -> dict[int, dict]:
    """The client states a node kept: state-dir/run-<Flower run id>/client_<k>.safetensors."""
    runs = [d for d in state_dir.iterdir() if d.name.startswith("run-")]
    assert len(runs) == 1, runs
    return {int(p.stem.split("_")[1]): load_file(str(p)) for p in runs[0].glob("client_*.safetensors")}


def test_namespaced_deployment_is_exact_refuses_unknown_keys_and_survives_a_dead_link(tmp_path):
    """(a) a run of `smoke` on a SuperLink and 2 SuperNodes in separate network namespaces equals the local
    engine bit for bit; (b) meanwhile a third SuperNode whose key was never registered is refused and the run
    goes on without it; (c) in a second run, SuperNode 1's link goes down during round 2: its clients are
    dropped from that round (flower.round_timeout), the node rejoins when the link is back and later rounds
    have every client; (d) afterwards no process and no namespace of the test is left."""
    started = time.monotonic()
    hosts = Hosts(tmp_path)
    with network(nodes=3):
        try:
            done = subprocess.run([sys.executable, "-m", "cli.main", "certificates", "--out", str(tmp_path / "certs"),
                                   "--address", LINK_ADDRESS, "--nodes", "3"], cwd=REPO, env=hosts.env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            certs = tmp_path / "certs"
            assert (certs.stat().st_mode & 0o777) == 0o700 and (certs / "node-0.key").stat().st_mode & 0o077 == 0
            hosts.start("superlink", LINK, "superlink", "--certificates", str(certs), "--host", LINK_ADDRESS,
                        "--port", str(PORT), "--register", str(certs / "node-0.pub"),
                        "--register", str(certs / "node-1.pub"))
            wait_for(lambda: "pfl: SuperLink serving on" in hosts.text("superlink")
                     or hosts.procs["superlink"].poll() is not None, 120, "the SuperLink")
            assert hosts.procs["superlink"].poll() is None, hosts.text("superlink")[-3000:]
            for i in range(3):  # node 2 holds node-2.key, which nobody registered; it claims partition 0
                hosts.start(f"supernode-{i}", node_ns(i), "supernode", "--superlink", SUPERLINK,
                            "--partition-id", str(i % 2), "--num-partitions", "2",
                            "--root-certificates", str(certs / "ca.crt"), "--key", str(certs / f"node-{i}.key"),
                            "--state-dir", str(tmp_path / f"node-{i}"))

            # (a) + (b)
            overrides = {"rounds": 2, "flower.round_timeout": 120.0, "flower.client_cpus": 1.0}
            run_a = tmp_path / "run-a"
            code, text = submit(hosts, "submit-a", overrides, run_a)
            assert code == 0, text[-3000:] + hosts.text("superlink")[-2000:]
            assert "TLS on, SuperNode authentication on" in text
            # the SuperLink refused node 2's key; its SuperNode gave up and `pfl supernode` exited 1
            assert hosts.procs["supernode-2"].wait(timeout=60) == 1
            assert "Failed to activate SuperNode" in hosts.text("supernode-2"), hosts.text("supernode-2")[-2000:]
            assert "No SuperNode found with the given public key" in hosts.text("superlink")
            assert "two SuperNodes" not in text
            assert not (tmp_path / "node-2" / "flwr-home" / "apps").exists(), "the unregistered node got the app"
            assert not list((tmp_path / "node-2").glob("run-*")), "the unregistered node served clients"

            raw, _ = config.read_recipe_file("smoke")
            cfg = config.resolve(raw, {**overrides, "engine": "local"})
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(cfg, tmp_path / "local", Hardware())
            finally:
                torch.set_num_threads(threads)
            timing = {"train_seconds", "eval_seconds"}
            deployed, local = read_rows(run_a / "metrics.csv"), read_rows(tmp_path / "local" / "metrics.csv")
            assert len(deployed) == 2
            for d, loc in zip(deployed, local):
                assert {k: v for k, v in d.items() if k not in timing} == \
                       {k: v for k, v in loc.items() if k not in timing}
            assert read_rows(run_a / "per_client.csv") == read_rows(tmp_path / "local" / "per_client.csv")
            final = load_file(str(run_a / "state" / "global.safetensors"))
            local_final = load_file(str(tmp_path / "local" / "state" / "global.safetensors"))
            assert final.keys() == local_final.keys() and all(torch.equal(final[n], local_final[n]) for n in final)
            for i in range(2):  # each node kept its own clients' states, exactly the local engine's
                states = node_states(tmp_path / f"node-{i}")
                assert sorted(states) == [i, i + 2]
                for k, state in states.items():
                    mine = load_file(str(tmp_path / "local" / "state" / "clients" / f"client_{k:05d}.safetensors"))
                    assert state.keys() == mine.keys() and all(torch.equal(state[n], mine[n]) for n in state)
            # nodes write only in their own state directories; the server's run directory has no client state
            for i in range(3):
                assert {p.name for p in (tmp_path / f"node-{i}").iterdir() if not p.name.startswith("run-")} <= \
                       {"flwr-home"}
            assert not list(run_a.rglob("client_*.safetensors"))
            summary = json.loads((run_a / "summary.json").read_text())
            assert summary["deployment"] == {"tls": True, "node_auth": True, "supernodes": 2}
            a_done = time.monotonic()

            # (c) node 1's link goes down when round 2 starts and comes back when round 2 has ended
            hosts.stop("supernode-2")
            events = []

            def on_line(line: str) -> None:
                if "pfl: round 1:" in line and not events:
                    ip("-n", node_ns(1), "link", "set", "dev", "eth0", "down")
                    events.append(("down", time.monotonic()))
                elif "pfl: round 2:" in line and len(events) == 1:
                    ip("-n", node_ns(1), "link", "set", "dev", "eth0", "up")
                    events.append(("up", time.monotonic()))

            overrides_c = {"rounds": 5, "flower.round_timeout": 10.0, "eval_every": 1}
            code, text = submit(hosts, "submit-c", overrides_c, tmp_path / "run-c", on_line)
            assert code == 0, text[-3000:]
            assert [e for e, _ in events] == ["down", "up"], text[-3000:]
            dropped = [int(r["clients_dropped"]) for r in read_rows(tmp_path / "run-c" / "metrics.csv")]
            # node 1's clients are dropped from the round its link was down in (round 2, or round 3 when the
            # node had already pulled round 2's messages), and from no round once it is back
            assert dropped[0] == 0 and 2 in dropped[1:3], dropped
            assert dropped[-1] == 0 and dropped[-2] == 0, dropped
            c_done = time.monotonic()
        finally:
            hosts.stop_all()
            left = {ns: subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
                    for ns in our_namespaces()}
        # (d) nothing is left: no process started here, no process inside the namespaces
        assert descendants(os.getpid()) == []
        assert all(not pids for pids in left.values()), left
    assert our_namespaces() == []
    print(f"\nwall time: (a)+(b) {a_done - started:.1f} s, (c) {c_done - a_done:.1f} s, "
          f"total {time.monotonic() - started:.1f} s")
