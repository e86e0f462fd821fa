"""FD, FedTGP, FedMRL, pFedES, FedSSA, pFedAFM: losses, server steps and inference rules computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_baselines import C, D, method_cfg, setup

from pfl.algorithms import ALGORITHMS, Upload
from pfl.algorithms.base import payload_params
from pfl.algorithms.fedssa import fusion_weight
from pfl.algorithms.fedtgp import adaptive_margin, class_gaps, margin_loss
from pfl.data.partition import ClientData
from pfl.models import build_model, count_parameters


def _algo(make_cfg, method, **extra):
    algo, _, _ = setup(method_cfg(make_cfg, method, **extra))
    return algo


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % C


# --- FD ---------------------------------------------------------------------------------------------------
def test_fd_server_takes_the_unweighted_mean_logit_per_class_over_its_senders(make_cfg):
    algo = _algo(make_cfg, "fd", **{"synthetic.num_classes": 2})
    empty = algo.initial_global()
    a = Upload(0, 500, {"labels": torch.tensor([0, 1]), "logits": torch.tensor([[1.0, 0.0], [0.0, 2.0]])})
    b = Upload(1, 10, {"labels": torch.tensor([0]), "logits": torch.tensor([[3.0, 0.0]])})
    out = algo.aggregate(empty, [a, b])  # not weighted by sample counts
    assert out["labels"].tolist() == [0, 1]
    assert torch.equal(out["logits"], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # a class nobody sends this round keeps its global logit
    later = algo.aggregate(out, [Upload(2, 5, {"labels": torch.tensor([0]), "logits": torch.tensor([[5.0, 1.0]])})])
    assert torch.equal(later["logits"], torch.tensor([[5.0, 1.0], [0.0, 2.0]]))


def test_fd_loss_distils_to_the_softmax_of_known_class_logits_and_uploads_training_logit_means(make_cfg):
    algo = _algo(make_cfg, "fd", **{"fd.lambda": 0.3})
    m = algo.make_client("cnn2")
    targets = torch.randn(2, C)
    m.receive({"labels": torch.tensor([1, 3]), "logits": targets})
    m.on_train_start()
    x, y = _batch()
    z = m.model(x).detach()
    loss = m.phase_named("local").loss(x, y)
    full = torch.zeros(C, C)
    full[[1, 3]] = targets
    has = (y == 1) | (y == 3)
    distill = -(F.softmax(full[y[has]], 1) * F.log_softmax(z[has], 1)).sum(1).mean()
    assert torch.allclose(loss, F.cross_entropy(z, y) + 0.3 * distill, atol=1e-5)
    x2, y2 = _batch(4, seed=1)
    z2 = m.model(x2).detach()
    m.phase_named("local").loss(x2, y2)
    up = m.upload()
    zs, ys = torch.cat([z, z2]), torch.cat([y, y2])
    assert up["labels"].tolist() == sorted(set(ys.tolist()))
    for c, row in zip(up["labels"], up["logits"]):
        assert torch.allclose(row, zs[ys == c].mean(0), atol=1e-5)


# --- FedTGP -----------------------------------------------------------------------------------------------
def test_fedtgp_gaps_and_margin_by_hand():
    q = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 10.0]])
    assert torch.allclose(class_gaps(q), torch.tensor([5.0, 5.0, math.sqrt(45)], dtype=torch.float64))
    assert adaptive_margin(q, 100.0) == pytest.approx(math.sqrt(45))
    assert adaptive_margin(q, 6.0) == 6.0
    assert adaptive_margin(q[:1], 7.0) == 7.0  # one class: no gap, the largest margin


def test_fedtgp_server_loss_and_step_by_hand(make_cfg):
    algo = _algo(make_cfg, "fedtgp", **{"fedtgp.server_epochs": 1, "batch_size": 64, "lr": 0.1})
    g = algo.initial_global()
    generator = algo._generator()
    generator.load_state_dict({k[len("generator."):]: v for k, v in g.items() if k.startswith("generator.")})
    torch.manual_seed(0)
    protos, labels = torch.randn(5, D), torch.tensor([0, 1, 1, 2, 3])
    prototypes = generator(torch.arange(C))
    distance = torch.cdist(protos, prototypes)
    expected = F.cross_entropy(-(distance + 2.5 * F.one_hot(labels, C)), labels)
    loss = margin_loss(generator, protos, labels, 2.5, C)
    assert torch.allclose(loss, expected, atol=1e-4)
    # the server step: margin from the class means, one full-batch SGD step (5 items < batch size)
    ups = [Upload(0, 9, {"labels": labels[:2], "protos": protos[:2]}),
           Upload(1, 9, {"labels": torch.tensor([1, 2, 3]), "protos": protos[2:]})]
    means = torch.stack([protos[0], (protos[1] + protos[2]) / 2, protos[3], protos[4]])
    margin = adaptive_margin(means, 100.0)
    margin_loss(generator, protos, labels, margin, C).backward()
    with torch.no_grad():
        for p in generator.parameters():
            p -= 0.1 * p.grad
        expected_protos = generator(torch.arange(C))
    out = algo.aggregate(g, ups)
    assert float(out["margin"]) == pytest.approx(margin)
    assert torch.allclose(out["protos"], expected_protos, atol=1e-5)
    assert set(algo.download(out, 0)) == {"protos"} and algo.download(g, 0) == {}


def test_fedtgp_client_loss_and_nearest_prototype_inference(make_cfg):
    algo = _algo(make_cfg, "fedtgp", **{"fedtgp.lambda": 2.0})
    m = algo.make_client("cnn1")
    x, y = _batch()
    m.receive({})  # before the first server step: CE only
    assert torch.allclose(m.phase_named("local").loss(x, y), F.cross_entropy(m.model(x), y), atol=1e-6)
    protos = torch.randn(C, D)
    m.receive({"protos": protos})
    r = m.model.phi(x)
    expected = F.cross_entropy(m.model.head(r), y) + 2.0 * F.mse_loss(r, protos[y])
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-5)
    distances = ((r[:, None, :] - protos[None]) ** 2).sum(-1)
    assert torch.equal(m.predict(x).argmax(1), distances.argmin(1))


# --- FedMRL -----------------------------------------------------------------------------------------------
def test_fedmrl_nested_representation_loss_and_weighted_mean(make_cfg):
    algo = _algo(make_cfg, "fedmrl", **{"fedmrl.small_dim": 100})
    m = algo.make_client("cnn3")
    assert m.small.head.in_features == 100 and m.projector.in_features == 100 + D and m.projector.out_features == D
    x, y = _batch()
    r = m.projector(torch.cat([m.small.phi(x), m.model.phi(x)], 1))
    assert r.shape == (6, D)
    expected = F.cross_entropy(m.model.head(r), y) + F.cross_entropy(m.small.head(r[:, :100]), y)
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-6)
    assert torch.equal(m.predict(x), m.model.head(r))
    g = algo.initial_global()
    a = {k: torch.full_like(v, 1.0) for k, v in g.items()}
    b = {k: torch.full_like(v, 5.0) for k, v in g.items()}
    out = algo.aggregate(g, [Upload(0, 100, a), Upload(1, 300, b)])  # weights 0.25 / 0.75
    assert all(torch.allclose(v, torch.full_like(v, 4.0)) for v in out.values())
    assert payload_params(g) == count_parameters(build_model("cnn5", (1, 16, 16), C, 100))


def test_fedmrl_small_dim_above_d_is_refused(make_cfg):
    from pfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fedmrl\.small_dim"):
        method_cfg(make_cfg, "fedmrl", **{"fedmrl.small_dim": 501})


# --- pFedES -----------------------------------------------------------------------------------------------
def test_pfedes_extractor_keeps_the_shape_and_its_two_phase_losses(make_cfg):
    from pfl.algorithms.pfedes import make_extractor

    assert count_parameters(make_extractor(3)) == 443
    algo = _algo(make_cfg, "pfedes", **{"pfedes.mu": 0.3, "pfedes.extra_epochs": 4, "local_epochs": 2})
    m = algo.make_client("cnn4")
    assert [(p.name, p.epochs) for p in m.phases()] == [("local", 2), ("extractor", 6)]
    x, y = _batch()
    assert m.extractor(x).shape == x.shape
    expected = 0.7 * F.cross_entropy(m.model(x), y) + 0.3 * F.cross_entropy(m.model(m.extractor(x)), y)
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-6)
    assert torch.allclose(m.phase_named("extractor").loss(x, y), F.cross_entropy(m.model(m.extractor(x)), y), atol=1e-6)
    assert torch.equal(m.predict(x), m.model(x))  # inference on the raw input
    g = algo.initial_global()
    out = algo.aggregate(g, [Upload(0, 1, {k: torch.zeros_like(v) for k, v in g.items()}),
                             Upload(1, 3, {k: torch.full_like(v, 2.0) for k, v in g.items()})])
    assert all(torch.allclose(v, torch.full_like(v, 1.5)) for v in out.values())


# --- FedSSA -----------------------------------------------------------------------------------------------
def test_fedssa_server_averages_rows_over_owners_with_stale_rows(make_cfg):
    algo = _algo(make_cfg, "fedssa")
    g = algo.initial_global()
    row = lambda v: torch.full((D,), float(v))  # noqa: E731
    a = Upload(0, 10, {"labels": torch.tensor([0, 1]), "weight": torch.stack([row(1), row(2)]),
                       "bias": torch.tensor([1.0, 2.0])})
    b = Upload(1, 99, {"labels": torch.tensor([1, 2]), "weight": torch.stack([row(4), row(6)]),
                       "bias": torch.tensor([4.0, 6.0])})
    out = algo.aggregate(g, [a, b])
    assert torch.equal(out["weight"][0], row(1)) and torch.equal(out["weight"][1], row(3))  # unweighted mean
    assert torch.equal(out["weight"][2], row(6)) and torch.equal(out["weight"][3], g["weight"][3])  # unowned: init
    assert out["bias"].tolist()[:3] == [1.0, 3.0, 6.0] and int(out["round"]) == 1
    # next round only A is sampled: B's stale row of class 1 still counts
    a2 = Upload(0, 10, {"labels": torch.tensor([0, 1]), "weight": torch.stack([row(0), row(8)]),
                        "bias": torch.tensor([0.0, 8.0])})
    out2 = algo.aggregate(out, [a2])
    assert torch.equal(out2["weight"][1], row(6)) and torch.equal(out2["weight"][2], row(6))


def test_fedssa_client_fuses_owned_rows_with_a_decaying_weight(make_cfg):
    algo = _algo(make_cfg, "fedssa", **{"fedssa.mu0": 0.5, "fedssa.decay_rounds": 2})
    assert fusion_weight(algo.settings, 0) == 0.5 and fusion_weight(algo.settings, 3) == 0.0
    assert fusion_weight(algo.settings, 1) == pytest.approx(0.5 * math.cos(math.pi / 4))
    m = algo.make_client("cnn1")
    m.data = ClientData(0, torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.tensor([0, 1, 1, 0]),
                        torch.zeros(0, 1, 16, 16, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    local_w, local_b = m.model.head.weight.detach().clone(), m.model.head.bias.detach().clone()
    gw, gb = torch.randn(C, D), torch.randn(C)
    m.receive({"weight": gw, "bias": gb, "round": torch.tensor(0)})
    assert torch.allclose(m.model.head.weight[:2], 0.5 * local_w[:2] + gw[:2])
    assert torch.allclose(m.model.head.bias[:2], 0.5 * local_b[:2] + gb[:2])
    assert torch.equal(m.model.head.weight[2:], local_w[2:])  # rows of classes it does not own stay local
    m.receive({"weight": gw, "bias": gb, "round": torch.tensor(5)})  # t > T: owned rows are the global rows
    assert torch.equal(m.model.head.weight[:2], gw[:2])


# --- pFedAFM ----------------------------------------------------------------------------------------------
def test_pfedafm_mixing_clamp_and_inference_with_the_received_extractor(make_cfg):
    algo = _algo(make_cfg, "pfedafm", **{"pfedafm.alpha_lr": 1000.0})
    m = algo.make_client("cnn2")
    x, y = _batch()
    with torch.no_grad():
        m.mix.alpha.fill_(1.0)
        assert torch.allclose(m(x), m.model.head(m.model.phi(x)), atol=1e-6)
        m.mix.alpha.fill_(0.0)
        assert torch.allclose(m(x), m.model.head(m.received(x)), atol=1e-6)
        m.mix.alpha.fill_(1.0)
    assert torch.allclose(m.phase_named("shared").loss(x, y), F.cross_entropy(m.model.head(m.shared(x)), y))
    # one "local" step with a huge alpha learning rate: alpha stays in [0, 1]
    m.set_phase("local")
    optimiser = m.configure_optimizers()
    assert [g["lr"] for g in optimiser.param_groups] == [m.cfg.lr, 1000.0]
    loss = m.phase_named("local").loss(x, y)
    loss.backward()
    optimiser.step()
    m.on_train_batch_end(loss, None, 0)  # the phase's after-step projection, as the engine calls it
    alpha = m.mix.alpha.detach()
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0 and float(alpha.min()) < 1.0
    # inference uses phi_S as received, not the one trained in the "shared" phase
    g = algo.initial_global()
    m.receive(g)
    m.set_phase("shared")
    optimiser = m.configure_optimizers()
    m.phase_named("shared").loss(x, y).backward()
    optimiser.step()
    state = m.private_state()
    assert all(torch.equal(state[k], v) for k, v in g.items())
    assert not all(torch.equal(m.upload()[k], v) for k, v in g.items())
    out = algo.aggregate(g, [Upload(0, 1, {k: torch.zeros_like(v) for k, v in g.items()}),
                             Upload(1, 1, {k: torch.full_like(v, 2.0) for k, v in g.items()})])
    assert all(torch.allclose(v, torch.full_like(v, 1.0)) for v in out.values())


# --- all methods ------------------------------------------------------------------------------------------
METHODS = sorted(ALGORITHMS)


@pytest.mark.parametrize("method", METHODS)
def test_each_phase_changes_exactly_its_parameters(make_cfg, method):
    """One optimiser step per phase, through the method's own optimiser and hooks."""
    algo = _algo(make_cfg, method)
    arch = "cnn1" if method == "fedavg" else "cnn2"
    m = algo.make_client(arch)
    x, y = _batch(8)
    m.data = ClientData(0, x, torch.arange(8) % C, x[:0], y[:0])
    m.start(algo.download(algo.initial_global(), 0))
    names = {id(p): n for n, p in m.named_parameters()}
    for phase in m.phases():
        m.set_phase(phase)
        trainable = {names[id(p)] for p in phase.parameters()}
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        optimiser = m.configure_optimizers()
        loss = phase.loss(x, y)
        loss.backward()
        optimiser.step()
        m.on_train_batch_end(loss, None, 0)
        changed = {n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed == trainable, (method, phase.name)
        optimiser.zero_grad()
    with pytest.raises(ValueError, match="no phase 'nonsense'"):
        m.phase_named("nonsense").loss(x, y)
    with pytest.raises(ValueError, match="no phase 'nonsense'"):
        m.set_phase("nonsense")


# A malformed update of each method's payload, and the words its rejection must contain.
def _bad_uploads(method, good):
    if "labels" in good:
        yield {**good, "labels": good["labels"] + 100}, "distinct classes"
        name = next(k for k in good if k not in ("labels", "counts"))
        yield {**good, name: good[name][..., :1] if good[name].ndim > 1 else good[name][:0]}, "shape"
    else:
        name = next(iter(good))
        yield {**good, name: good[name].flatten()[:-1]}, "shape"
        yield {k: v for k, v in good.items() if k != name}, "names differ"
    name = next(k for k, v in good.items() if v.is_floating_point() and v.numel())
    bad = good[name].clone()
    bad.view(-1)[0] = math.nan
    yield {**good, name: bad}, "non-finite"


@pytest.mark.parametrize("method", ["fd", "fedtgp", "fedmrl", "pfedes", "fedssa", "pfedafm"])
def test_upload_problem_rejects_malformed_updates_of_the_new_methods(make_cfg, method):
    algo = _algo(make_cfg, method)
    g = algo.initial_global()
    m = algo.make_client("cnn3")
    x, y = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 1])
    m.data = ClientData(0, x, y, x[:0], y[:0])
    m.start(algo.download(g, 0))
    m.set_phase(m.phases()[0])
    m.on_train_start()
    m.phase.loss(m.transform(x, train=False), y)
    good = m.upload()
    assert algo.upload_problem(Upload(0, 4, good), g) is None
    for bad, words in _bad_uploads(method, good):
        problem = algo.upload_problem(Upload(0, 4, bad), g)
        assert problem and words in problem, (method, problem)
    assert "training samples" in algo.upload_problem(Upload(0, 0, good), g)


def test_bytes_per_round_of_the_new_methods_equal_the_tensors_sent_computed_by_hand(make_cfg):
    """One round of 4 clients (N=4, C=1): counted bytes against sizes from the shapes (float32 4 B, int64 8 B)."""
    from pfl.federation import FederatedRun, MemoryStore, make_runner

    cnn5 = lambda d: count_parameters(build_model("cnn5", (1, 16, 16), C, d))  # noqa: E731
    extractor = 8 * 1 * 9 + 8 + 1 * 8 * 9 + 1  # Conv(1, 8, 3) and Conv(8, 1, 3) with biases
    for method in ("fd", "fedtgp", "fedmrl", "pfedes", "fedssa", "pfedafm"):
        cfg = method_cfg(make_cfg, method, rounds=1)
        algo, clients, archs = setup(cfg)
        run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
        run.initialise()
        record = run.run_round()
        held = [int(torch.unique(c.y_train).numel()) for c in clients]
        expected = {
            "fd": (sum(m * (8 + 4 * C) for m in held), 0),  # labels + mean logits up; nothing known yet down
            "fedtgp": (sum(m * (8 + 4 * D) for m in held), 0),  # prototypes up; no global prototypes yet
            "fedmrl": (4 * 4 * cnn5(D),) * 2,  # the small model (d1 = d) each way
            "pfedes": (4 * 4 * extractor,) * 2,
            "fedssa": (sum(m * (8 + 4 * D + 4) for m in held), 4 * (4 * (C * D + C) + 8)),  # rows up; head + round
            "pfedafm": (4 * 4 * (cnn5(D) - (C * D + C)),) * 2,  # the extractor phi_S only
        }[method]
        assert (record["bytes_up"], record["bytes_down"]) == expected, method
        if method in ("fd", "fedtgp"):  # round 2: the server's tables go down to each of the 4 clients
            known = len(run.state.global_state["labels"]) if method == "fd" else C
            per_client = known * (8 + 4 * C) if method == "fd" else 4 * C * D
            assert run.run_round()["bytes_down"] == 4 * per_client, method
