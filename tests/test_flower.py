"""The flower engine with real Flower: a Ray simulation in this process, and a loopback deployment of
separate SuperLink/SuperNode/ClientApp processes started by `pfl deploy`. Faults are injected with Flower
client mods (middleware around pfl's ClientApp), so the code under test is the production ClientApp."""

import contextlib
import csv
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install '.[flower]'")

from flwr.app import Message, RecordDict
from safetensors.torch import load_file, save_file

from pfl import config
from pfl.errors import RunFailed
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.federation.engine import LocalWorkers
from pfl.flower.app import from_record, to_record
from pfl.flower.deploy import descendants
from pfl.run import FlowerTarget, Hardware, build, train
from tests.conftest import SMOKE

pytestmark = pytest.mark.flower
REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(autouse=True)
def nothing_left_running(monkeypatch, no_ray_left):
    """Every test starts and ends with no Flower or Ray process alive; Ray workers can import the tests'
    client mods."""
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    yield


def _cfg(**overrides):
    return config.resolve({**SMOKE, "num_clients": 3, "engine": "flower", "flower.client_cpus": 1.0,
                           **overrides})


# ---------------------------------------------------------------- client mods for the tests

def record_mod(directory: str, msg: Message, context, call_next) -> Message:
    """Saves what each train message brought (the download) and what the server got back (the upload)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type == "train":
        run = msg.content["run"]
        tag = f"{int(run['round'])}_{int(run['client_id'])}"
        save_file(from_record(msg.content["download"]), f"{directory}/down_{tag}.safetensors")
        if not reply.has_error():
            save_file(from_record(reply.content["upload"]), f"{directory}/up_{tag}.safetensors")
    return reply


def fault_mod(plan: dict, msg: Message, context, call_next) -> Message:
    """Injects the fault `plan[(round, client)]` into a train message: crash, hang, nan or shape."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    run = msg.content["run"]
    fault = plan.get((int(run["round"]), int(run["client_id"])))
    if fault == "crash":
        raise RuntimeError("injected crash")
    if fault == "hang":
        time.sleep(plan["hang_seconds"])
    reply = call_next(msg, context)
    if fault in ("nan", "shape"):
        tensors = from_record(reply.content["upload"])
        name = sorted(tensors)[0]
        tensors[name] = torch.full_like(tensors[name], math.nan) if fault == "nan" else tensors[name][:-1]
        metrics = reply.content["metrics"]
        reply = Message(RecordDict({"upload": to_record(tensors), "metrics": metrics}), reply_to=msg)
    return reply


def weighted_mean(paths_and_weights):
    total = sum(w for _, w in paths_and_weights)
    out = {}
    for path, w in paths_and_weights:
        for k, v in load_file(str(path)).items():
            out[k] = out.get(k, 0) + v.double() * (w / total)
    return out


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


# ---------------------------------------------------------------- simulation

BIT_FOR_BIT = {"pfedlora": {}, "fedkd": {}, "fedssa": {}, "pfedafm": {},
               **{f"pfedlora-{how}-ranks": {"method": "pfedlora", "pfedlora.aggregation": how,
                                            "pfedlora.ranks": {"cnn1": 2, "cnn2": 4}}
                  for how in ("mean", "svd", "stack", "freeze_a", "share_a")}}


# the default run keeps one case per kind of state (pFedLoRA, FedKD's server state, heterogeneous ranks); -m heavy
# runs every case
DEFAULT_BIT_FOR_BIT = {"pfedlora", "fedkd", "pfedlora-svd-ranks"}


@pytest.mark.parametrize("case", [c if c in DEFAULT_BIT_FOR_BIT else pytest.param(c, marks=pytest.mark.heavy)
                                  for c in sorted(BIT_FOR_BIT)])
def test_simulation_equals_local_run_bit_for_bit(tmp_path, case):
    """3 clients, 2 rounds through Flower's simulation (Ray actors, 1 thread each; the server with 1 thread)
    end exactly where the local engine ends with 1 thread: private states survive between rounds on the nodes,
    and the server state (FedKD: mentee, compressed update, per-client versions) travels exactly; FedSSA's
    owned head rows and pFedAFM's alpha and received extractor stay on the nodes; every pFedLoRA aggregation
    with ranks 2, 4, 8: HetLoRA's padded mean, FlexLoRA's per-client truncated SVD, FLoRA's stacked sum
    under a fresh adapter, FFA-LoRA's seeded A (drawn on each node), FedSA-LoRA's private B (kept on it)."""
    cfg = _cfg(**{"method": case, **BIT_FOR_BIT[case]})
    flower_dir, local_dir = tmp_path / "flower", tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server step (FedKD: SVD) runs in this process under either engine
    try:
        summary = train(cfg, flower_dir, Hardware())
        train(config.resolve({**cfg.as_flat(), "engine": "local"}), local_dir, Hardware())
    finally:
        torch.set_num_threads(threads)
    assert summary["engine"]["name"] == "flower" and summary["engine"]["supernodes"] == 3
    timing = {"train_seconds", "eval_seconds"}
    flower_rows, local_rows = read_rows(flower_dir / "metrics.csv"), read_rows(local_dir / "metrics.csv")
    assert len(flower_rows) == 2
    for f, loc in zip(flower_rows, local_rows):
        assert {k: v for k, v in f.items() if k not in timing} == {k: v for k, v in loc.items() if k not in timing}
    assert read_rows(flower_dir / "per_client.csv") == read_rows(local_dir / "per_client.csv")
    for k in range(3):
        name = f"state/clients/client_{k:05d}.safetensors"
        flower_state, local_state = load_file(str(flower_dir / name)), load_file(str(local_dir / name))
        assert flower_state.keys() == local_state.keys()
        assert all(torch.equal(flower_state[n], local_state[n]) for n in flower_state)
    if case not in ("pfedlora", "pfedlora-mean-ranks", "pfedlora-svd-ranks"):
        return  # the other variants' bytes: tests/test_lora_variants.py
    # pFedLoRA's wire: each client sends and receives A (r x d) and B (C x r) in float32, at its own rank
    ranks = [2, 4, 8] if case.endswith("-ranks") else [cfg["pfedlora.rank"]] * 3
    d, c = cfg.representation_dim, cfg.num_classes
    assert int(flower_rows[0]["bytes_up"]) == 4 * sum(r * d + c * r for r in ranks) == int(flower_rows[0]["bytes_down"])


@pytest.mark.heavy
def test_simulation_drops_crashed_hung_nan_and_misshaped_clients(tmp_path, caplog):
    """Round 2: client 1 returns NaN, client 2 crashes, client 3 hangs past the timeout, client 4 sends a
    mis-shaped update. Only client 0's update is aggregated; round 1's aggregate is the weighted mean of all."""
    record = tmp_path / "record"
    record.mkdir()
    plan = {(2, 1): "nan", (2, 2): "crash", (2, 3): "hang", (2, 4): "shape", "hang_seconds": 25.0}
    cfg = _cfg(num_clients=5, **{"synthetic.num_samples": 500, "flower.round_timeout": 20.0})
    mods = [functools.partial(record_mod, str(record)), functools.partial(fault_mod, plan)]
    summary = train(cfg, tmp_path / "run", Hardware(), flower=FlowerTarget(client_mods=mods))
    sizes = {int(r["client_id"]): int(r["num_train"]) for r in read_rows(tmp_path / "run" / "per_client.csv")}
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert [int(r["clients_dropped"]) for r in rows] == [0, 4]
    assert summary["clients_dropped_total"] == 4
    reasons = {r.getMessage().split(":", 1)[1] for r in caplog.records
               if "dropped from the aggregate" in r.getMessage()}
    assert any("client 1 dropped" in r and "'adapter.A' has non-finite values" in r for r in reasons), reasons
    assert any("client 2 dropped" in r and "the client failed" in r and "injected crash" in r for r in reasons)
    assert any("client 3 dropped" in r and "no reply within 20 s" in r for r in reasons), reasons
    assert any("client 4 dropped" in r and "'adapter.A' has shape [7, 500], expected [8, 500]" in r for r in reasons)

    # round 2's download is the server's aggregate of round 1: the sample-weighted mean of all 5 uploads
    expected = weighted_mean([(record / f"up_1_{k}.safetensors", sizes[k]) for k in range(5)])
    got = load_file(str(record / "down_2_0.safetensors"))
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=0, atol=1e-6)
    # after round 2 only client 0's update is in the aggregate (a mean of one update is that update)
    final = load_file(str(tmp_path / "run" / "state" / "global.safetensors"))
    client0 = load_file(str(record / "up_2_0.safetensors"))
    assert all(torch.equal(final[n], client0[n]) for n in final)
    assert torch.isnan(load_file(str(record / "up_2_1.safetensors"))["adapter.A"]).all()  # it was sent


def test_simulation_stops_when_fewer_than_min_clients_answer(tmp_path):
    plan = {(1, 0): "crash", (1, 1): "crash"}
    cfg = _cfg(min_clients=2)
    with pytest.raises(RunFailed, match=r"round 1: 1 of 3 sampled clients .* min_clients=2 .*injected crash"):
        train(cfg, tmp_path / "run", Hardware(),
              flower=FlowerTarget(client_mods=[functools.partial(fault_mod, plan)]))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ---------------------------------------------------------------- bad input

BAD = [
    (["train", "--engine", "flower", "--devices", "2"], "--devices: the flower engine places clients on GPUs"),
    (["train", "--engine", "flower", "--set", "flower.client_gpus=0.25"],
     "recipe key 'flower.client_gpus': this machine has no CUDA GPU"),
    (["deploy", "--supernodes", "0"], "--supernodes: must be 1..64"),
    (["deploy", "--supernodes", "100000", "--set", "num_clients=100000"], "--supernodes: must be 1..64"),
    (["deploy", "--supernodes", "5"], "--supernodes: must be <= num_clients (4), got 5"),
    (["deploy", "--set", "flower.client_cpus=-1"], "recipe key 'flower.client_cpus'"),
    (["deploy", "--set", "dataset=cifar10", "--set", "download=false", "--set", "data_dir=/nonexistent/x"],
     "dataset 'cifar10': cifar-10-batches-py/ not found in /nonexistent/x"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flower_input_exits_2_with_one_line_and_starts_nothing(tmp_path, args, message):
    if "flower.client_gpus=0.25" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, [*args, "--recipe", "smoke", "--out", str(out)])  # in-process, as `pfl` runs it
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


# ---------------------------------------------------------------- deployment

def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _deployed_supernode(deploy_pid: int, partition: int) -> int:
    for pid in descendants(deploy_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-supernode" in cmdline and f"partition-id={partition} " in cmdline:
            return pid
    raise AssertionError(f"no SuperNode with partition-id={partition} under pid {deploy_pid}")


class _LosesNode1AfterRound1(LocalWorkers):
    """The local engine with clients 1 and 3 (SuperNode 1 of 2) gone from round 2 on, as if their machine
    had died."""

    GONE = (1, 3)

    def train(self, round_idx, downloads, on_done, evaluate=()):
        gone = self.GONE if round_idx > 1 else ()
        outcomes = super().train(round_idx, {k: d for k, d in downloads.items() if k not in gone}, on_done, evaluate)
        outcomes.update(dict.fromkeys(gone, "gone"))
        return outcomes

    def evaluate(self, downloads, split="test"):
        return super().evaluate({k: d for k, d in downloads.items() if k not in self.GONE}, split)


@pytest.mark.heavy
@pytest.mark.slow
def test_deployment_survives_a_killed_supernode_and_equals_the_local_engine(tmp_path):
    """`pfl deploy`: a SuperLink, 2 SuperNodes, their warm ClientApp processes and flwr run as separate
    processes on loopback; 4 clients, node p serves clients p and p + 2. SuperNode 1 is killed (SIGKILL) after
    round 1 (its ClientApp process follows it); rounds 2 and 3 complete with clients 0 and 2. Everything the
    deployment computed equals the local engine losing clients 1 and 3 at the same point; node 0's one warm
    ClientApp process served all of its messages (several clients, several rounds); every process `pfl
    deploy` started is gone afterwards."""
    out = tmp_path / "run"
    overrides = {"num_clients": 4, "rounds": 3, "eval_every": 3, "flower.round_timeout": 30.0}
    cmd = [sys.executable, "-m", "cli.main", "deploy", "--recipe", "smoke", "--supernodes", "2", "--out", str(out)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "COLUMNS": "200"})
    lines, killed, commands = [], False, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if not killed and "pfl: round 1:" in line:
                commands = [_cmdline(pid) for pid in descendants(proc.pid)]
                os.kill(_deployed_supernode(proc.pid, 1), signal.SIGKILL)
                killed = True
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert killed, text[-3000:]
    # secure by default: the real SuperLink and SuperNodes run with TLS and node keys, none with --insecure
    superlink = [c for c in commands if "flower-superlink" in c]
    supernodes = [c for c in commands if "flower-supernode" in c]
    assert len(superlink) == 1 and len(supernodes) == 2, commands
    assert not any("--insecure" in c for c in superlink + supernodes), commands
    assert all(f in superlink[0] for f in ("--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"))
    assert all("--root-certificates" in c and "--auth-supernode-private-key" in c for c in supernodes)
    assert json.loads((out / "summary.json").read_text())["deployment"] == \
        {"tls": True, "node_auth": True, "supernodes": 2}
    assert "in the busiest ClientApp" in text  # each round's message timing is reported
    assert "messages: train + evaluate " in text and "evaluate test" not in text  # one wave per round
    rows = read_rows(out / "metrics.csv")
    assert [int(r["clients_dropped"]) for r in rows] == [0, 2, 2]
    per_client = {int(r["client_id"]): r["accuracy"] for r in read_rows(out / "per_client.csv")}
    assert math.isnan(float(per_client[1])) and math.isnan(float(per_client[3]))  # their node is gone
    assert float(per_client[0]) > 0.5 and float(per_client[2]) > 0.5  # 2-class clients: above chance
    # node 0: 1 query, 2 clients x 3 rounds of training (round 3's evaluation inside its training messages: one
    # message wave per round), all served by one process
    served = [line for line in (out / "flower-logs" / "clientapp-0.log").read_text().splitlines()
              if " served a " in line]
    assert len(served) == 7, served
    assert len({line.split(" pid ")[1].split()[0] for line in served}) == 1
    assert sum(" train message " in line for line in served) == 6

    # the same recipe on the local engine, clients 1 and 3 lost after round 1, with one torch thread like
    # the ClientApps (flower.client_cpus = 1)
    raw, _ = config.read_recipe_file("smoke")
    cfg = config.resolve(raw, overrides)
    setup = build(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = FederatedRun(cfg, setup.clients, setup.algorithm,
                             _LosesNode1AfterRound1(cfg, setup.clients, setup.architectures, setup.algorithm,
                                                    MemoryStore(), make_runner(grad_clip=cfg.grad_clip)))
        local.initialise()
        local.run()
    finally:
        torch.set_num_threads(threads)
    same = ("train_loss", "loss_local", "loss_adapter", "bytes_up", "acc_mean", "acc_min", "acc_max")
    for deployed, mine in zip(rows, local.state.history):
        for column in same:
            value = mine[column]
            assert deployed[column] == ("" if isinstance(value, float) and math.isnan(value) else str(value)), column
    final = load_file(str(out / "state" / "global.safetensors"))
    assert all(torch.equal(final[n], local.state.global_state[n]) for n in final)
    for k in (0, 2):
        deployed_state = load_file(str(out / "state" / "clients" / f"client_{k:05d}.safetensors"))
        assert all(torch.equal(deployed_state[n], local.workers.store.get(k)[n]) for n in deployed_state)


# ---------------------------------------------------------------- resuming a simulation

@pytest.mark.heavy
@pytest.mark.slow
def test_simulation_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """`pfl train --engine flower` (Ray simulation; 4 clients, half sampled per round, so a checkpoint lacks
    the clients never contacted yet and links the others' files) is SIGKILLed after its round-2 checkpoint;
    `pfl train --resume` continues it. Metrics (timing aside), per-client accuracies and every final state
    equal an uninterrupted run (on the local engine, which computes exactly what the simulation computes with
    one thread everywhere: test_simulation_equals_local_run_bit_for_bit); Ray's processes of the killed run
    are gone (the fixture checks)."""
    from tests.test_resume import checkpoint_round, rows, same_state, staging_of, start

    settings = ["--recipe", "smoke", "--engine", "flower", "--threads", "1", "--set", "rounds=4",
                "--set", "checkpoint_every=1", "--set", "participation=0.5", "--set", "eval_every=2"]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "cli.main", "train", *settings, "--engine", "local", "--out",
                           str(reference)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = start("train", *settings, "--out", str(out))
    deadline = time.monotonic() + 300
    while checkpoint_round(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    # the machine dies: the run and its local Ray cluster (which would otherwise linger ~1 min) at once
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    resumed_from = checkpoint_round(out)
    assert 2 <= resumed_from < 4 and not out.exists()
    pointer = json.loads((staging_of(out) / "checkpoint.json").read_text())

    resumed = subprocess.run([sys.executable, "-m", "cli.main", "train", "--resume", str(out), "--threads", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == resumed_from and summary["engine"]["name"] == "flower"
    assert rows(out / "metrics.csv") == rows(reference / "metrics.csv")
    assert read_rows(out / "per_client.csv") == read_rows(reference / "per_client.csv")
    assert same_state(out, reference)
    assert staging_of(out) is None
    assert pointer["clients"] == sorted(pointer["clients"]) and len(pointer["clients"]) >= 2

