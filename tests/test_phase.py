"""The method seam: a `Phase` carries what trains, its loss and its options, and the base ClientModule and the
runner honour every option; the `start` extension point; the "write a method" walkthrough in
docs/architecture.md runs as written."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_baselines import C, method_cfg, setup
from torch import nn

from pfl import config
from pfl.algorithms import ALGORITHMS
from pfl.algorithms.base import ClientModule, Phase
from pfl.data import BatchTransform, TensorBatches
from pfl.federation import make_runner
from pfl.run import Hardware, train

ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"


class Toy(ClientModule):
    """Two parts and every Phase option, recording what the loss saw."""

    def __init__(self, make_cfg):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, C), nn.Dropout(0.5))
        super().__init__(model, make_cfg(), BatchTransform((0.0,), (1.0,), False), C)
        self.extra = nn.Linear(C, C)
        self.scale = nn.Parameter(torch.ones(C))
        self.seen_modes: list[tuple[bool, bool]] = []
        self.projections = 0

    def phases(self):
        return [Phase("first", 2, trains=[self.model, self.scale], loss=self.loss,
                      own_lr=[(self.scale, 0.5)], after_step=self.project),
                Phase("second", 1, trains=[self.extra], loss=self.loss, lr=0.25, eval_mode=[self.model])]

    def loss(self, x, y):
        self.seen_modes.append((self.model.training, self.extra.training))
        return F.cross_entropy(self.extra(self.model(x)) * self.scale, y)

    def project(self):
        self.projections += 1


def _data(n=10):
    return torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8), torch.arange(n) % C


def test_a_phase_trains_exactly_its_parts_with_its_learning_rates(make_cfg):
    m = Toy(make_cfg)
    first, second = m.phases()
    m.set_phase("first")
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in first.parameters()}
    groups = m.configure_optimizers().param_groups
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(2, m.cfg.lr), (1, 0.5)]  # Linear's 2, then scale
    m.set_phase(second)
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in m.extra.parameters()}
    assert [g["lr"] for g in m.configure_optimizers().param_groups] == [0.25]
    with pytest.raises(ValueError, match="Toy has no phase 'third'; its phases are first, second"):
        m.set_phase("third")


def test_the_runner_calls_after_step_per_step_and_keeps_eval_mode_modules_in_eval_mode(make_cfg):
    m = Toy(make_cfg)
    runner = make_runner()
    x, y = _data(10)
    batches = TensorBatches(x, y, 4, shuffle=True, seed=0)  # 3 steps per epoch
    m.set_phase("first")
    runner.fit(m, batches, epochs=2)
    assert m.projections == 6 and m.steps_in_phase == 6
    assert set(m.seen_modes) == {(True, True)}
    m.seen_modes.clear()
    m.set_phase("second")
    runner.fit(m, batches, epochs=1)
    assert m.projections == 6  # "second" has no projection
    assert set(m.seen_modes) == {(False, True)}  # the frozen model in eval mode (its dropout off), extra training


def test_start_is_receive_by_default_and_fedssa_keeps_a_fresh_clients_own_head(make_cfg):
    """`start` (the extension point for a method whose `receive` is an update, not a load)."""
    algo, clients, _ = setup(method_cfg(make_cfg, "pfedlora"))
    m = algo.make_client("cnn2")
    g = {k: torch.full_like(v, 0.5) for k, v in algo.initial_global().items()}
    m.start(g)
    assert torch.equal(m.adapter.B, g["adapter.B"])
    algo, clients, _ = setup(method_cfg(make_cfg, "fedssa"))
    m = algo.make_client("cnn2")
    m.data = clients[0]
    head = {k: v.clone() for k, v in m.model.head.state_dict().items()}
    download = algo.download(algo.initial_global(), 0)
    m.start(download)
    assert all(torch.equal(m.model.head.state_dict()[k], v) for k, v in head.items())
    m.receive(download)  # the first round's fusion changes the rows of the classes it owns
    owned = torch.unique(clients[0].y_train)
    assert not torch.equal(m.model.head.weight[owned], head["weight"][owned])


def _walkthrough_code() -> str:
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Write a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_write_a_method_walkthrough_runs_and_learns(tmp_path):
    path = tmp_path / "logit_prior.py"
    path.write_text(_walkthrough_code())
    spec = importlib.util.spec_from_file_location("logit_prior", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # registers the method
        raw, _ = config.read_recipe_file("smoke")
        cfg = config.resolve(raw, {"method": "logit_prior"})
        summary = train(cfg, tmp_path / "run", Hardware(threads=1))
    finally:
        ALGORITHMS.pop("logit_prior", None)
    assert summary["method"] == "logit_prior"
    assert summary["final"]["acc_mean"] > 0.7  # two classes per client: chance is 0.5
    # the prior b (one float32 per class) goes up and comes down for each of the 4 clients every round
    assert summary["bytes_up_total"] == summary["bytes_down_total"] == cfg.rounds * 4 * cfg.num_classes * 4
