"""FedGen: the generator's server step and the clients' regulariser computed by hand on small tensors, what travels,
and what the server refuses."""

import math

import pytest
import torch
from test_baselines import C, D, setup

from pfl.algorithms import ALGORITHMS, TaskSpec, Upload
from pfl.algorithms.base import unprefixed
from pfl.algorithms.fedgen import diversity_loss
from pfl.data.partition import ClientData
from pfl.errors import ConfigError
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.seeding import derive_seed

TINY = {"method": "fedgen", "representation_dim": 3, "fedgen.noise_dim": 2, "fedgen.hidden_dim": 3}


def _algo(make_cfg, **extra):
    """The method on the smoke task with a 3-dimensional representation (test_baselines' setup fixes d = 500)."""
    cfg = make_cfg({**TINY, **extra})
    spec = setup(cfg)[0].spec
    return ALGORITHMS["fedgen"](cfg, TaskSpec(spec.image_shape, spec.num_classes, 3, spec.transform))


def _upload(client_id, labels, counts, weight, bias):
    return Upload(client_id, sum(counts), {"head.weight": weight, "head.bias": bias,
                                           "labels": torch.tensor(labels), "counts": torch.tensor(counts)})


def _generator_by_hand(p, noise, labels, train):
    """G(eps, y) = W2 relu(BN(W1 [eps; onehot(y)] + b1)) + b2, BN on the batch (train) or its running stats."""
    a = torch.cat([noise, torch.eye(C)[labels]], 1) @ p["hidden.0.weight"].T + p["hidden.0.bias"]
    if train:
        mean, var = a.mean(0), a.var(0, unbiased=False)
    else:
        mean, var = p["hidden.1.running_mean"], p["hidden.1.running_var"]
    h = torch.relu((a - mean) / torch.sqrt(var + 1e-5) * p["hidden.1.weight"] + p["hidden.1.bias"])
    return h @ p["out.weight"].T + p["out.bias"]


def _ce_by_hand(logits, labels):
    return -(logits - logits.exp().sum(1, keepdim=True).log())[torch.arange(len(labels)), labels].mean()


def _server_step_by_hand(start, uploads, weights, prior, round_idx, lr, eta, batch):
    """One SGD step of CE(label-weighted ensemble) + eta * diversity on the round's draws, and the BN statistics."""
    draws = torch.Generator().manual_seed(derive_seed(0, "fedgen-server", round_idx))
    labels = torch.multinomial(prior, batch, replacement=True, generator=draws)
    noise = torch.randn(batch, 2, generator=draws)
    p = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in start.items()}
    g = _generator_by_hand(p, noise, labels, train=True)
    logits = sum(weights[k, labels][:, None] * (g @ u.tensors["head.weight"].T + u.tensors["head.bias"])
                 for k, u in enumerate(uploads))
    pairs = [(i, j) for i in range(batch) for j in range(batch)]
    diversity = torch.exp(-sum(((noise[i] - noise[j]) ** 2).mean() * (g[i] - g[j]).abs().mean()
                               for i, j in pairs) / len(pairs))
    (_ce_by_hand(logits, labels) + eta * diversity).backward()
    trained = ("hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias", "out.weight", "out.bias")
    out = {k: (p[k] - lr * p[k].grad).detach() for k in trained}
    a = torch.cat([noise, torch.eye(C)[labels]], 1) @ start["hidden.0.weight"].T + start["hidden.0.bias"]
    out["hidden.1.running_mean"] = 0.9 * start["hidden.1.running_mean"] + 0.1 * a.mean(0)
    out["hidden.1.running_var"] = 0.9 * start["hidden.1.running_var"] + 0.1 * a.var(0, unbiased=True)
    return out


def test_diversity_loss_by_hand():
    noise = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    features = torch.tensor([[0.0, 0.0, 0.0], [3.0, -3.0, 6.0]])
    # the two off-diagonal pairs: mean squared noise gap 5, mean absolute feature gap 4, over 4 pairs
    assert diversity_loss(noise, features).item() == pytest.approx(math.exp(-2 * 5 * 4 / 4))


def test_one_generator_step_is_sgd_on_the_label_weighted_ensemble_and_diversity_and_continues(make_cfg):
    algo = _algo(make_cfg, **{"fedgen.server_steps": 1, "fedgen.server_batch_size": 5, "fedgen.server_lr": 0.3,
                              "fedgen.diversity": 0.5})
    g = algo.initial_global()
    gen = torch.Generator().manual_seed(1)
    heads = [(torch.randn(C, 3, generator=gen), torch.randn(C, generator=gen)) for _ in range(2)]
    # client 0 (cnn1) holds classes 0 and 1 (3 and 1 samples), client 1 (cnn2) classes 1 and 2 (1 and 2)
    uploads = [_upload(0, [0, 1], [3, 1], *heads[0]), _upload(1, [1, 2], [1, 2], *heads[1])]
    assert all(algo.upload_problem(u, g) is None for u in uploads)
    prior = torch.tensor([3.0, 2.0, 2.0, 0.0]) / 7
    weights = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0]])  # client k's share of class y
    torch.manual_seed(0)
    global_stream = torch.get_rng_state()
    out = algo.aggregate(g, uploads)
    assert torch.equal(torch.get_rng_state(), global_stream)  # the server draws from its own seeded stream
    assert torch.allclose(out["prior"], prior) and int(out["round"]) == 1
    expected = _server_step_by_hand(unprefixed("generator", g), uploads, weights, prior, 1, 0.3, 0.5, 5)
    for name, value in expected.items():
        assert torch.allclose(out[f"generator.{name}"], value, atol=1e-5), name
    # the next round trains the kept generator on, with the next round's draws
    later = algo.aggregate(out, uploads)
    expected = _server_step_by_hand(unprefixed("generator", out), uploads, weights, prior, 2, 0.3, 0.5, 5)
    for name, value in expected.items():
        assert torch.allclose(later[f"generator.{name}"], value, atol=1e-5), name
    assert int(later["round"]) == 2
    again = algo.aggregate(g, uploads)
    assert all(torch.equal(again[k], out[k]) for k in out)  # reproducible


def test_the_client_regulariser_is_ce_of_its_head_on_generated_features_drawn_from_the_prior(make_cfg):
    algo = _algo(make_cfg, **{"fedgen.alpha": 0.7, "fedgen.generated_batch": 6})
    m = algo.make_client("cnn2")
    x = torch.randn(5, 1, 16, 16)
    y = torch.tensor([0, 1, 1, 2, 0])
    m.set_phase("local")
    m.on_train_start()
    m.on_train_epoch_start()
    assert algo.download(algo.initial_global(), 0) == {}  # round 1: no trained generator, CE only
    m.receive({})
    assert torch.allclose(m.phase.loss(x, y), _ce_by_hand(m.model(x), y), atol=1e-6)
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in m.generator.state_dict().items()}
    state["hidden.1.running_var"] = state["hidden.1.running_var"].abs() + 0.5
    prior = torch.tensor([0.0, 0.25, 0.75, 0.0])
    m.receive({**{f"generator.{k}": v for k, v in state.items()}, "prior": prior})
    torch.manual_seed(3)
    loss = m.phase.loss(x, y)
    torch.manual_seed(3)
    labels = torch.multinomial(prior, 6, replacement=True)
    noise = torch.randn(6, 2)
    assert set(labels.tolist()) <= {1, 2}  # only classes the generator was trained on
    features = _generator_by_hand(state, noise, labels, train=False)  # G frozen in eval mode
    head = m.model.head
    expected = _ce_by_hand(m.model(x), y) + 0.7 * _ce_by_hand(features @ head.weight.T + head.bias, labels)
    assert torch.allclose(loss, expected, atol=1e-5)
    # the generated features feed the head only
    m.generated_loss().backward()
    assert all(p.grad is None for p in m.model.phi.parameters()) and all(p.grad is None for p in
                                                                          m.generator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_a_smoke_run_learns_and_sends_exactly_head_labels_counts_up_and_generator_prior_down(make_cfg):
    cfg = make_cfg({"method": "fedgen"})
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
    run.initialise()
    held = [int(torch.unique(c.y_train).numel()) for c in clients]
    up = sum(4 * (C * D + C) + 8 * 2 * m for m in held)  # head (float32) + labels and counts (int64)
    first = run.run_round()
    assert (first["bytes_up"], first["bytes_down"]) == (up, 0)  # nothing to send before the first server step
    second = run.run_round()
    s = algo.settings
    generator_floats = ((s.noise_dim + C) * s.hidden_dim + s.hidden_dim + 4 * s.hidden_dim
                        + s.hidden_dim * D + D)  # linear, BN weight/bias/running mean/var, linear
    down = 4 * (4 * generator_floats + 8 + 4 * C)  # + BN's batch counter (int64) + the prior
    assert (second["bytes_up"], second["bytes_down"]) == (up, down)
    assert second["acc_mean"] > 0.5  # each client holds 2 of 4 classes: chance is 0.5
    state = run.state.global_state
    assert int(state["round"]) == 2 and int(state["generator.hidden.1.num_batches_tracked"]) == 2 * s.server_steps


def test_upload_problem_checks_the_head_against_the_clients_architecture_and_the_class_table(make_cfg):
    algo = _algo(make_cfg, num_clients=2, model_zoo=["cnn1", "cnn2+h8"])
    g = algo.initial_global()
    deep = {f"head.{k}": v for k, v in algo.private_model("cnn2+h8").head.state_dict().items()}
    linear = {"head.weight": torch.zeros(C, 3), "head.bias": torch.zeros(C)}
    table = {"labels": torch.tensor([0, 2]), "counts": torch.tensor([4, 5])}
    assert algo.upload_problem(Upload(0, 9, {**linear, **table}), g) is None
    assert algo.upload_problem(Upload(1, 9, {**deep, **table}), g) is None
    cases = [
        (Upload(0, 9, {**linear, "head.weight": torch.zeros(C, 2), **table}), "architecture cnn1"),
        (Upload(1, 9, {**linear, **table}), "architecture cnn2+h8"),
        (Upload(0, 9, {**linear, "labels": torch.tensor([0, 9]), "counts": table["counts"]}), "distinct classes"),
        (Upload(0, 8, {**linear, **table}), "more than the client's 8"),
        (Upload(0, 9, {**linear, "labels": torch.zeros(0, dtype=torch.int64),
                       "counts": torch.zeros(0, dtype=torch.int64)}), "no class"),
        (Upload(0, 9, {**linear, "labels": table["labels"]}), "tensor names"),
        (Upload(5, 9, {**linear, **table}), "not one of the run's 2 clients"),
    ]
    for upload, words in cases:
        problem = algo.upload_problem(upload, g)
        assert problem and words in problem, (words, problem)
    # heads of different structures teach one generator
    out = algo.aggregate(g, [Upload(0, 9, {**linear, **table}), Upload(1, 9, {**deep, **table})])
    assert not torch.equal(out["generator.out.weight"], g["generator.out.weight"])


def test_a_client_with_a_deep_head_trains_on_generated_features(make_cfg):
    algo = _algo(make_cfg, num_clients=2, model_zoo=["cnn1", "cnn2+h8"])
    m = algo.make_client("cnn2+h8")
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    m.data = ClientData(1, x, y, x[:0], y[:0])
    g = algo.aggregate(algo.initial_global(), [Upload(1, 4, m.upload())])
    m.receive(algo.download(g, 1))
    m.set_phase("local")
    m.on_train_start()
    m.on_train_epoch_start()
    assert float(m.active) == 1.0 and torch.isfinite(m.phase.loss(m.transform(x, train=True), y))


@pytest.mark.parametrize("key, value", [("fedgen.server_batch_size", 1), ("fedgen.server_lr", 0.0),
                                        ("fedgen.alpha", -1.0), ("fedgen.noise_dim", 0)])
def test_bad_settings_are_refused_with_one_line_naming_the_key(make_cfg, key, value):
    with pytest.raises(ConfigError) as info:
        make_cfg({"method": "fedgen", key: value})
    assert key in str(info.value) and "\n" not in str(info.value)
