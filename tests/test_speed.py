"""The speed machinery changes no result: the lean Fabric loop computes what a plain PyTorch loop computes,
a run with client data and states resident on the device equals one without, diagnostics are sampled
(`diagnostics_every`), threads are set from the run's resources, and the cross-device partition keeps its
minimum client size. No timing is asserted here (benchmarks/overhead.py measures speed)."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pfl import config
from pfl.build import Hardware, build
from pfl.data import TensorBatches
from pfl.data.partition import dirichlet
from pfl.federation import Callbacks, make_runner
from pfl.federation.store import client_file
from pfl.run import train
from pfl.seeding import derive_seed

TIMING = {"train_seconds", "eval_seconds"}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lean_loop_step_for_step_equals_a_plain_pytorch_loop(make_cfg):
    """One pFedLoRA client round through ClientRunner.fit_phases (Lightning hooks under Fabric) ends with
    exactly the parameters of the same two phases written as a plain loop: same batches, SGD with momentum
    and weight decay, gradient-norm clip, the adapter phase with the model frozen in eval mode."""
    cfg = make_cfg({"grad_clip": 0.05})  # small, so that clipping acts
    setup = build(cfg)
    data, arch = setup.clients[0], setup.architectures[0]
    torch.manual_seed(0)
    module = setup.algorithm.make_client(arch)
    with torch.no_grad():
        module.adapter.B.normal_()  # the adapter contributes in phase 1
    start = module.private_state()
    seed = 7

    plain = setup.algorithm.make_client(arch)
    plain.load_private_state(start)
    for phase, params in (("local", list(plain.model.parameters())), ("adapter", list(plain.adapter.parameters()))):
        plain.set_phase(phase)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        plain.train()
        if phase == "adapter":
            plain.model.eval()
        for x, y in TensorBatches(data.x_train, data.y_train, cfg.batch_size, True, derive_seed(seed, phase, "order")):
            x = setup.algorithm.spec.transform(x, train=True)
            loss = plain.phase_named(phase).loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()

    losses, flops = make_runner(grad_clip=cfg.grad_clip).fit_phases(module, data, cfg.batch_size, seed, arch)
    assert set(losses) == {"local", "adapter"} and flops > 0
    mine, theirs = module.private_state(), plain.private_state()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert not all(torch.equal(mine[n], start[n]) for n in mine)


@pytest.mark.parametrize("method", ["pfedlora", "fedproto"])
def test_resident_store_gives_identical_results_on_the_cpu(tmp_path, method):
    """`--resident on` (client data and states kept where training runs, states copied there by
    ClientModule.keep) and `off` (the CPU store) give the same metrics and the same final states."""
    cfg = config.resolve({**config.read_recipe_file("smoke")[0], "method": method, "rounds": 2})
    summaries = {mode: train(cfg, tmp_path / mode, Hardware(resident=mode)) for mode in ("on", "off")}
    assert summaries["on"]["hardware"]["resident"] == "on"
    on, off = rows(tmp_path / "on" / "metrics.csv"), rows(tmp_path / "off" / "metrics.csv")
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in on] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in off]
    for k in range(cfg.num_clients):
        name = f"state/clients/client_{k:05d}.safetensors"
        a, b = load_file(str(tmp_path / "on" / name)), load_file(str(tmp_path / "off" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_diagnostics_are_measured_every_n_rounds_only(tmp_path):
    cfg = config.resolve({**config.read_recipe_file("smoke")[0], "rounds": 3, "diagnostics_every": 2})
    train(cfg, tmp_path / "run", Hardware())
    ratio = [r["adapter_logit_ratio"] for r in rows(tmp_path / "run" / "metrics.csv")]
    assert ratio[0] == "" and ratio[2] == "" and float(ratio[1]) > 0


def test_threads_come_from_the_run_and_are_recorded(tmp_path):
    before = torch.get_num_threads()
    try:
        summary = train(config.resolve({**config.read_recipe_file("smoke")[0], "rounds": 1}), tmp_path / "run",
                        Hardware(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert summary["hardware"]["torch_threads"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["hardware"]["torch_threads"] == 1


def test_dirichlet_partition_keeps_min_client_samples():
    labels = np.repeat(np.arange(10), 700)  # 7000 samples over 200 clients, 35 on average
    parts = dirichlet(labels, 200, 0.3, 10, np.random.default_rng(0), min_samples=5)
    assert min(len(p) for p in parts) >= 5
    assert sorted(np.concatenate(parts).tolist()) == list(range(7000))  # a partition: every sample once
    with pytest.raises(Exception, match="min_client_samples"):
        dirichlet(labels, 200, 0.3, 10, np.random.default_rng(0), min_samples=30)
    assert config.resolve({**config.read_recipe_file("smoke")[0], "min_client_samples": 3})["min_client_samples"] == 3


def test_cross_device_recipe_resolves():
    cfg, _ = config.load("fmnist-xdevice", [])
    assert (cfg.num_clients, cfg.participation, cfg.batch_size, cfg.dirichlet_alpha) == (1000, 0.05, 10, 0.3)



class _CheckpointInodes(Callbacks):
    """After each round's checkpoint: the inode of every client's file in it, and who was sampled."""

    def __init__(self, root):
        self.root, self.inodes, self.sampled = root, {}, {}

    def on_round_start(self, round_idx, sampled):
        self.sampled[round_idx] = set(sampled)

    def on_round_end(self, record):
        staging = next(self.root.parent.glob(f".{self.root.name}.partial-*"))
        latest = json.loads((staging / "checkpoint.json").read_text())["latest"]
        self.inodes[record["round"]] = {k: os.stat(staging / latest / "clients" / client_file(k)).st_ino
                                        for k in range(4)}


def test_checkpoint_links_the_files_of_clients_not_sampled_since_the_last_one(tmp_path):
    """participation 0.5: a checkpoint writes only the clients sampled since the previous one; the others'
    files are the previous checkpoint's (same inode), and the final states equal a run without checkpoints."""
    base = {**config.read_recipe_file("smoke")[0], "participation": 0.5, "rounds": 5}
    probe = _CheckpointInodes(tmp_path / "run")
    train(config.resolve({**base, "checkpoint_every": 1}), tmp_path / "run", Hardware(), callbacks=probe)
    train(config.resolve({**base, "checkpoint_every": 0}), tmp_path / "plain", Hardware())
    linked = 0
    for t in range(2, 5):  # checkpoints after rounds 1-4 (none after the last round)
        for k in range(4):
            same = probe.inodes[t][k] == probe.inodes[t - 1][k]
            assert same == (k not in probe.sampled[t]), (t, k)
            linked += same
    assert linked == 6  # 2 of 4 clients sampled per round
    for k in range(4):
        name = f"state/clients/{client_file(k)}"
        a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "plain" / name))
        assert all(torch.equal(a[n], b[n]) for n in a)
