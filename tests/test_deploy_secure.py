"""Secure deployments: the keys pfl makes are what Flower reads, `pfl deploy` starts every process with TLS,
registered SuperNode keys and a runtime secret unless `--insecure`, and the per-host commands reject bad
input with one line and exit code 2. The end-to-end runs are tests/test_flower.py (loopback, secure by
default) and tests/test_multihost.py (network namespaces)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install '.[flower]'")

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from pfl import config
from pfl.errors import PflUserError
from pfl.flower import deploy as dep
from pfl.flower.security import Security, certificate_files, certificate_names, make_certificates, make_node_key
from tests.conftest import SMOKE

REPO = Path(__file__).resolve().parents[1]


def test_certificates_and_node_keys_are_what_flower_reads(tmp_path):
    make_certificates(tmp_path, ["10.1.2.3", "link.example"])
    ca, cert, key = certificate_files(tmp_path)
    server = x509.load_pem_x509_certificate(cert.read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    assert set(certificate_names(cert)) == {"10.1.2.3", "127.0.0.1", "link.example", "localhost"}
    for private in (key, tmp_path / "ca.key"):
        assert private.stat().st_mode & 0o777 == 0o600
    # Flower's own loaders: the SuperNode's private key and `flwr supernode register`'s public key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, public = make_node_key(tmp_path, "node-0")
    loaded = load_ssh_private_key(private.read_bytes(), None)
    assert loaded.curve.name == "secp384r1" and private.stat().st_mode & 0o777 == 0o600
    assert try_load_public_key(public) == public_key_to_bytes(loaded.public_key())
    (tmp_path / "server.key").unlink()
    with pytest.raises(PflUserError, match=r"--certificates: .* missing server.key"):
        certificate_files(tmp_path)


class FakeProcess:
    """Stands in for a Flower process: records its command line, never runs anything."""

    started: list[list[str]] = []

    def __init__(self, cmd, **kwargs):
        FakeProcess.started.append([str(c) for c in cmd])
        self.pid, self.returncode = 0, None

    def poll(self):
        return self.returncode

    def terminate(self):
        self.returncode = -15

    def wait(self, timeout=None):
        return self.returncode


@pytest.fixture
def fake_flower(monkeypatch):
    """`pfl.flower.deploy.deploy` with its processes recorded instead of started; `flwr run` replaced by a
    check of the keys while the deployment lives, and a summary.json as the ServerApp would write."""
    FakeProcess.started = []
    seen = {"registered": []}
    monkeypatch.setattr(dep.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(dep, "_wait_for_port", lambda *a, **k: None)
    monkeypatch.setattr(dep, "become_subreaper", lambda: None)
    monkeypatch.setattr(dep, "stop_all_descendants", lambda *a, **k: None)
    monkeypatch.setattr(dep, "register_node", lambda public, name, env: seen["registered"].append(Path(public)))

    def run_app(self, run_config, on_line=None):
        seen["run_config"] = run_config
        seen["flwr_config"] = (self.workdir / "flwr-home" / "config.toml").read_text()
        if self.security.tls:
            keys = self.security.directory
            seen["keys"] = keys
            assert keys.stat().st_mode & 0o777 == 0o700
            for private in [self.security.server_key, self.security.secret,
                            *(p for p, _ in self.security.node_keys)]:
                assert private.is_file() and private.stat().st_mode & 0o777 == 0o600, private
        Path(run_config["out"]).mkdir(parents=True)
        (Path(run_config["out"]) / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(dep.LoopbackDeployment, "run_app", run_app)
    return seen


def _commands(name: str) -> list[list[str]]:
    return [c for c in FakeProcess.started if Path(c[0]).name == name or (len(c) > 2 and c[2] == name)]


def test_pfl_deploy_is_secure_by_default(tmp_path, fake_flower):
    cfg = config.resolve({**SMOKE, "engine": "flower"})
    dep.deploy(cfg, tmp_path / "run", 2, keep_logs=False)
    (superlink,) = _commands("flower-superlink")
    supernodes = _commands("flower-supernode")
    warm = _commands("pfl.flower.warm")
    assert len(supernodes) == 2 and len(warm) == 2
    for cmd in [superlink, *supernodes, *warm]:
        assert "--insecure" not in cmd, cmd
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth"} <= set(superlink)
    keys = fake_flower["keys"]
    for i, cmd in enumerate(supernodes):
        assert cmd[cmd.index("--root-certificates") + 1] == str(keys / "ca.crt")
        assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(keys / f"node-{i}.key")
        assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(keys / "runtime.secret")
        assert cmd[cmd.index("--isolation") + 1] == "process"
        assert f"partition-id={i} num-partitions=2" in cmd[cmd.index("--node-config") + 1]
    for cmd in warm:
        assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(keys / "runtime.secret")
    # every node's key registered before any SuperNode started
    assert fake_flower["registered"] == [keys / "node-0.pub", keys / "node-1.pub"]
    assert f'root-certificates = "{keys / "ca.crt"}"' in fake_flower["flwr_config"]
    assert "insecure" not in fake_flower["flwr_config"]
    assert fake_flower["run_config"]["tls"] is True and fake_flower["run_config"]["node-auth"] is True
    assert not keys.exists()  # the private directory is gone with the deployment


def test_pfl_deploy_insecure_and_own_certificates(tmp_path, fake_flower):
    cfg = config.resolve({**SMOKE, "engine": "flower"})
    dep.deploy(cfg, tmp_path / "plain", 2, keep_logs=False, insecure=True)
    assert all("--insecure" in c for c in _commands("flower-superlink") + _commands("flower-supernode"))
    assert not any("--ssl-certfile" in c or "--root-certificates" in c for c in FakeProcess.started)
    assert fake_flower["registered"] == [] and "insecure = true" in fake_flower["flwr_config"]
    assert fake_flower["run_config"]["tls"] is False and fake_flower["run_config"]["node-auth"] is False

    FakeProcess.started = []
    mine = tmp_path / "mine"
    make_certificates(mine, ["127.0.0.1"])
    dep.deploy(cfg, tmp_path / "own", 1, keep_logs=False, certificates=mine)
    (superlink,) = _commands("flower-superlink")
    assert superlink[superlink.index("--ssl-certfile") + 1] == str(mine / "server.crt")
    (node,) = _commands("flower-supernode")
    assert node[node.index("--root-certificates") + 1] == str(mine / "ca.crt")
    assert (mine / "server.key").is_file()  # the user's files are used, never removed
    with pytest.raises(PflUserError, match="--certificates: not with --insecure"):
        dep.deploy(cfg, tmp_path / "both", 1, insecure=True, certificates=mine)


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "keys"
    make_certificates(directory, ["10.1.2.3"])
    make_node_key(directory, "node-0")
    return directory


def _bad_cases(keys: Path, tmp_path: Path):
    node = ["supernode", "--superlink", "10.1.2.3:9092", "--root-certificates", str(keys / "ca.crt")]
    empty = tmp_path / "empty"
    empty.mkdir()
    return [
        (["deploy", "--recipe", "smoke", "--insecure", "--certificates", str(keys)],
         "--certificates: not with --insecure"),
        (["deploy", "--recipe", "smoke", "--certificates", str(empty)], "--certificates: "),
        ([*node, "--key", str(keys / "node-0.key"), "--partition-id", "2", "--num-partitions", "2"],
         "--partition-id: must be 0..1 (--num-partitions 2), got 2"),
        ([*node, "--key", str(keys / "node-0.key"), "--partition-id", "0", "--num-partitions", "0"],
         "--num-partitions: must be >= 1, got 0"),
        ([*node, "--partition-id", "0", "--num-partitions", "2"], "--key: required"),
        ([*node, "--key", str(keys / "ca.crt"), "--partition-id", "0", "--num-partitions", "2"],
         "--key: "),
        (["supernode", "--superlink", "nohost", "--partition-id", "0", "--num-partitions", "1", "--insecure"],
         "--superlink: expected HOST:PORT"),
        (["superlink", "--host", "10.1.2.3"], "--certificates: required"),
        (["superlink", "--host", "10.9.9.9", "--certificates", str(keys)],
         "--host: '10.9.9.9' is not among the names server.crt is valid for"),
        (["superlink", "--host", "10.1.2.3", "--certificates", str(keys), "--port", "0"], "--port: must be 1..65535"),
        (["submit", "--recipe", "smoke", "--superlink", "10.1.2.3:9092", "--root-certificates", str(keys / "ca.crt"),
          "--supernodes", "2", "--out", "relative/run"], "--out: an absolute path"),
        (["submit", "--recipe", "smoke", "--superlink", "10.1.2.3:9092", "--supernodes", "2", "--out", "/x"],
         "--root-certificates: required"),
        (["certificates", "--out", str(keys), "--address", "10.1.2.3"], "--out: "),
    ]


def test_bad_deployment_input_exits_2_with_one_line(tmp_path, keys):
    from typer.testing import CliRunner

    from cli.main import app

    for args, message in _bad_cases(keys, tmp_path):
        res = CliRunner().invoke(app, args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2, (args, res.stdout, res.stderr, res.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, res.stderr)


def test_pfl_certificates_writes_a_private_directory(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "certs"
    res = CliRunner().invoke(app, ["certificates", "--out", str(out), "--address", "192.0.2.7", "--nodes", "2"])
    assert res.exit_code == 0, res.stderr
    assert out.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "node-0.key", "node-0.pub", "node-1.key",
                                                     "node-1.pub", "server.crt", "server.key"]
    assert "192.0.2.7" in certificate_names(out / "server.crt")


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.flower
def test_insecure_loopback_deploy_still_runs(tmp_path):
    """`pfl deploy --insecure`: the plain-HTTP loopback demo completes and says so in summary.json."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "cli.main", "deploy", "--recipe", "smoke", "--supernodes", "2",
                           "--insecure", "--out", str(out), "--set", "rounds=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "insecure: no TLS" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deployment"] == {"tls": False, "node_auth": False, "supernodes": 2}


def test_security_flags_of_each_side():
    plain = Security.insecure()
    assert plain.superlink_args() == ["--insecure"] and not plain.tls and "insecure = true" in \
        plain.connection_toml("x", "1.2.3.4:9092")
