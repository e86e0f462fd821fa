"""FedL2G: the guided loss, the learning-to-guide gradient and the server's step computed by hand on a tiny linear
model, the quiz split (tiny clients train), seeding, uploads checked, and a smoke run that learns."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_baselines import C, D, method_cfg, setup
from torch import nn

from pfl.algorithms import ALGORITHMS, TaskSpec, Upload
from pfl.algorithms.fedl2g import GUIDE_GRAD_CLIP, FedL2GClient, quiz_split, twice_differentiable
from pfl.data.partition import ClientData
from pfl.errors import ConfigError
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.models.zoo import SplitModel

CLASSES, IN, WIDTH = 3, 4, 2  # the tiny model: x in R^4 -> h in R^2 -> logits in R^3


def tiny_model(batch_norm: bool = False) -> SplitModel:
    torch.manual_seed(0)
    phi = nn.Sequential(nn.Linear(IN, WIDTH), *([nn.BatchNorm1d(WIDTH)] if batch_norm else []))
    return SplitModel(phi, nn.Linear(WIDTH, CLASSES), "tiny", WIDTH)


def tiny_client(make_cfg, variant: str, lam: float = 0.7, lr: float = 0.1, batch_norm: bool = False, n: int = 8,
                **extra) -> tuple[FedL2GClient, torch.Tensor, torch.Tensor]:
    """A FedL2G client on the tiny model with n float samples (identity transform), batch size 8."""
    cfg = make_cfg({"method": "fedl2g", "fedl2g.variant": variant, "fedl2g.lambda": lam, "lr": lr, "batch_size": 8,
                    **extra})
    settings = ALGORITHMS["fedl2g"].Settings.from_config(cfg, "fedl2g")
    m = FedL2GClient(tiny_model(batch_norm), cfg, lambda x, train: x, CLASSES, settings)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, IN, generator=g), torch.arange(n) % CLASSES
    m.data = ClientData(0, x, y, x[:0], y[:0])
    return m, x, y


def guides_for(variant: str, seed: int = 2) -> torch.Tensor:
    width = WIDTH if variant == "feature" else CLASSES
    return torch.randn(CLASSES, width, generator=torch.Generator().manual_seed(seed))


def ce_by_hand(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]).mean()


def quiz_loss_after_one_step(model: SplitModel, guides: torch.Tensor, study, quiz, variant: str, lam: float,
                             lr: float, create_graph: bool) -> torch.Tensor:
    """The learning-to-guide objective written out for the linear-linear model, in float64: one SGD step of
    theta on CE + lam * MSE(target, g_y) over the study samples, then CE of the stepped model on the quiz."""
    w1, b1 = model.phi[0].weight.detach().double(), model.phi[0].bias.detach().double()
    w2, b2 = model.head.weight.detach().double(), model.head.bias.detach().double()
    theta = [t.clone().requires_grad_(True) for t in (w1, b1, w2, b2)]
    (xs, ys), (xq, yq) = study, quiz
    h = xs.double() @ theta[0].T + theta[1]
    z = h @ theta[2].T + theta[3]
    target = h if variant == "feature" else z
    study_loss = ce_by_hand(z, ys) + lam * ((target - guides[ys]) ** 2).mean()
    grads = torch.autograd.grad(study_loss, theta, create_graph=create_graph)
    w1, b1, w2, b2 = (t - lr * g for t, g in zip(theta, grads))
    return ce_by_hand((xq.double() @ w1.T + b1) @ w2.T + b2, yq)


@pytest.mark.parametrize("variant", ["feature", "logit"])
def test_guided_loss_is_ce_plus_lambda_mse_to_the_guiding_vector_of_y(make_cfg, variant):
    m, x, y = tiny_client(make_cfg, variant, lam=0.7)
    g = guides_for(variant)
    m.receive({"guides": g, "round": torch.tensor(3)})
    h = x @ m.model.phi[0].weight.T + m.model.phi[0].bias
    z = h @ m.model.head.weight.T + m.model.head.bias
    target = h if variant == "feature" else z
    expected = ce_by_hand(z, y) + 0.7 * ((target - g[y]) ** 2).sum() / (len(y) * target.shape[1])
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["feature", "logit"])
def test_guide_gradient_and_server_step_equal_the_look_ahead_computed_by_hand(make_cfg, variant):
    m, x, _ = tiny_client(make_cfg, variant, lam=0.7, lr=0.1)
    g = guides_for(variant)
    m.receive({"guides": g, "round": torch.tensor(4)})
    quiz, train = m.split()
    # 8 samples, batch 8: the quiz is half of them (one batch would be 8), the study batch is the other half
    assert len(quiz) == 4 and sorted(torch.cat([quiz, train]).tolist()) == list(range(8))
    y = torch.zeros(8, dtype=torch.int64)
    y[train], y[quiz] = torch.tensor([0, 1, 0, 1]), torch.tensor([2, 0, 1, 2])  # class 2 is in the quiz only
    m.data = ClientData(0, x, y, x[:0], y[:0])
    upload = m.upload()
    study, quizzes = (x[train], y[train]), (x[quiz], y[quiz])
    guides = g.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(quiz_loss_after_one_step(m.model, guides, study, quizzes, variant, 0.7, 0.1,
                                                               create_graph=True), guides)
    # the hand computation itself, against central differences (no second-order autograd in these)
    eps = 1e-6
    for c, j in ((int(y[train][0]), 0), (int(y[train][1]), 1)):
        bump = torch.zeros_like(guides, dtype=torch.float64)
        bump[c, j] = eps
        diff = (quiz_loss_after_one_step(m.model, g.double() + bump, study, quizzes, variant, 0.7, 0.1, False)
                - quiz_loss_after_one_step(m.model, g.double() - bump, study, quizzes, variant, 0.7, 0.1, False))
        assert float(diff.detach()) / (2 * eps) == pytest.approx(float(expected[c, j]), rel=1e-5, abs=1e-9)
    held = sorted(set(y[train].tolist()))
    assert upload["labels"].tolist() == held and upload["labels"].dtype == torch.int64
    assert upload["grads"].dtype == torch.float32
    assert torch.allclose(upload["grads"].double(), expected[held], rtol=1e-4, atol=1e-7)
    assert held == [0, 1] and float(expected[2].abs().max()) == 0  # g_2 does not reach the quiz: only study classes

    # the server: per class, the mean over the clients that sent it, then g - guide_lr * gradient
    cfg = make_cfg({"method": "fedl2g", "fedl2g.variant": variant, "fedl2g.guide_lr": 0.5})
    algo = ALGORITHMS["fedl2g"](cfg, TaskSpec((1, 2, 2), CLASSES, WIDTH, m.batch_transform))
    other = {"labels": torch.tensor([0]), "grads": torch.full((1, upload["grads"].shape[1]), 0.25)}
    state = {"guides": g, "round": torch.tensor(4)}
    out = algo.aggregate(state, [Upload(0, 8, upload), Upload(1, 100, other)])  # not weighted by sample counts
    mean = torch.zeros_like(g)
    mean[upload["labels"]] += upload["grads"]
    mean[0] = (mean[0] + 0.25) / 2 if 0 in held else 0.25
    assert torch.allclose(out["guides"], g - 0.5 * mean, atol=1e-7)
    assert int(out["round"]) == 5
    # a step against the gradient lowers the quiz loss after the look-ahead: the guides learn to guide
    before = quiz_loss_after_one_step(m.model, g.double(), study, quizzes, variant, 0.7, 0.1, False)
    after = quiz_loss_after_one_step(m.model, g.double() - 1e-2 * expected / expected.norm(), study, quizzes,
                                     variant, 0.7, 0.1, False)
    assert after < before


def test_server_clips_the_aggregated_gradient_to_norm_100_and_starts_from_standard_normal_vectors(make_cfg):
    algo, _, _ = setup(method_cfg(make_cfg, "fedl2g", **{"fedl2g.guide_lr": 2.0}))
    torch.manual_seed(0)
    state = algo.initial_global()
    assert state["guides"].shape == (C, D) and int(state["round"]) == 0
    assert abs(float(state["guides"].mean())) < 0.1 and abs(float(state["guides"].std()) - 1) < 0.1
    big = {"labels": torch.tensor([1, 3]), "grads": torch.full((2, D), 10.0)}  # norm 10 * sqrt(1000) > 100
    out = algo.aggregate(state, [Upload(0, 5, big)])
    norm = 10.0 * math.sqrt(2 * D)
    step = torch.zeros(C, D)
    step[[1, 3]] = 10.0 * GUIDE_GRAD_CLIP / (norm + 1e-6)
    assert torch.allclose(out["guides"], state["guides"] - 2.0 * step, atol=1e-5)
    # nobody sent a gradient (every client too small for a quiz): the guides stay, the round counts
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "grads": torch.zeros(0, D)}
    still = algo.aggregate(out, [Upload(0, 1, empty)])
    assert torch.equal(still["guides"], out["guides"]) and int(still["round"]) == 2
    # the logit variant's vectors live in R^C, the feature variant's default rate is the authors' 100
    logit, _, _ = setup(method_cfg(make_cfg, "fedl2g", **{"fedl2g.variant": "logit"}))
    assert logit.initial_global()["guides"].shape == (C, C) and logit.guide_lr == 0.1
    assert setup(method_cfg(make_cfg, "fedl2g"))[0].guide_lr == 100.0


def test_the_look_ahead_is_seeded_and_leaves_model_buffers_and_random_state_untouched(make_cfg):
    m, _, _ = tiny_client(make_cfg, "feature", batch_norm=True, n=24)
    m.receive({"guides": guides_for("feature"), "round": torch.tensor(7)})
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    m.model.eval()
    rng = torch.get_rng_state()
    first = m.upload()
    assert all(torch.equal(before[k], v) for k, v in m.model.state_dict().items())  # BN statistics included
    assert torch.equal(torch.get_rng_state(), rng) and not m.model.training
    assert all(p.grad is None for p in m.model.parameters())
    torch.manual_seed(123)  # the global stream does not matter
    again = m.upload()
    assert all(torch.equal(first[k], again[k]) for k in first)
    m.receive({"guides": guides_for("feature"), "round": torch.tensor(8)})  # another round draws other batches
    assert not torch.equal(m.upload()["grads"], first["grads"])


def test_quiz_split_is_fixed_per_client_and_leaves_small_clients_training_data():
    quiz, train = quiz_split(100, 10, 2, 1, seed=5)
    assert len(quiz) == 20 and len(train) == 80 and not set(quiz.tolist()) & set(train.tolist())
    assert torch.equal(quiz_split(100, 10, 2, 1, seed=5)[0], quiz)  # every round the same
    assert not torch.equal(quiz_split(100, 10, 2, 1, seed=6)[0], quiz)  # another client, another split
    assert [len(quiz_split(n, 64, 1, 1, 0)[0]) for n in (1, 2, 3, 9, 200)] == [0, 1, 1, 4, 64]  # at most half
    assert [len(quiz_split(n, 64, 1, 2, 0)[0]) for n in (2, 3, 4)] == [0, 0, 2]  # batch norm: 2 per batch


@pytest.mark.parametrize("arch, n", [("cnn2", 1), ("cnn2", 3), ("resnet18", 2), ("resnet18", 5)])
def test_a_client_smaller_than_its_quiz_trains_and_sends_a_valid_update(make_cfg, arch, n):
    cfg = method_cfg(make_cfg, "fedl2g", **{"fedl2g.warm_up_rounds": 0})
    algo, _, _ = setup(cfg)
    x = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(n) % 2
    data = ClientData(0, x, y, x[:0], y[:0])
    m = algo.make_client(arch)
    m.data = data
    state = algo.initial_global()
    m.receive(algo.download(state, 0))
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    make_runner().fit_phases(m, data, cfg.batch_size, seed=1, arch=arch)
    assert any(not torch.equal(before[k], p.detach()) for k, p in m.named_parameters())  # it trained
    upload = m.upload()
    assert algo.upload_problem(Upload(0, n, upload), state) is None
    assert len(upload["labels"]) == (0 if len(m.split()[0]) == 0 else len(set(y[m.split()[1]].tolist())))
    algo.aggregate(state, [Upload(0, n, upload)])


def test_local_training_skips_the_quiz_and_waits_out_the_warm_up(make_cfg):
    m, x, _ = tiny_client(make_cfg, "logit", n=20, **{"fedl2g.warm_up_rounds": 2})
    train = m.split()[1]
    seen = []
    loss = m.local_loss
    m.local_loss = lambda xb, yb: (seen.append(xb.detach().clone()), loss(xb, yb))[1]
    runner = make_runner()
    for server_round, epochs in ((0, 0), (1, 0), (2, 1)):
        m.receive({"guides": guides_for("logit"), "round": torch.tensor(server_round)})
        phase = m.phases()[0]
        assert phase.epochs == epochs and torch.equal(phase.samples, train)
        seen.clear()
        before = {k: p.detach().clone() for k, p in m.model.named_parameters()}
        runner.fit_phases(m, m.data, 8, seed=server_round)
        changed = any(not torch.equal(before[k], p.detach()) for k, p in m.model.named_parameters())
        assert changed == (epochs > 0)
    rows = {tuple(r.tolist()) for r in torch.cat(seen)}
    assert rows == {tuple(r.tolist()) for r in x[train]}  # one epoch over the training part, no quiz sample


@pytest.mark.parametrize("variant", ["feature", "logit"])
def test_a_smoke_run_learns_and_counts_the_bytes_of_the_tensors_sent(make_cfg, variant):
    cfg = method_cfg(make_cfg, "fedl2g", **{"fedl2g.variant": variant, "fedl2g.warm_up_rounds": 0, "lr": 0.05,
                                             "local_epochs": 3})
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    width = D if variant == "feature" else C
    sent = []
    aggregate = algo.aggregate
    algo.aggregate = lambda state, uploads: (sent.append(uploads), aggregate(state, uploads))[1]
    for _ in (1, 2):
        record = run.run_round()
        held = [len(u.tensors["labels"]) for u in sent[-1]]
        assert all(m >= 1 for m in held) and len(held) == 4
        assert record["bytes_up"] == sum(m * (8 + 4 * width) for m in held)  # labels int64, gradients float32
        assert record["bytes_down"] == 4 * (4 * C * width + 8)  # the guiding vectors and the round, per client
    assert int(run.state.global_state["round"]) == 2
    assert record["acc_mean"] > 0.6  # each client holds 2 of 4 classes: chance is 0.5


def test_upload_problem_rejects_malformed_gradient_tables(make_cfg):
    algo, _, _ = setup(method_cfg(make_cfg, "fedl2g"))
    state = algo.initial_global()
    good = {"labels": torch.tensor([0, 2]), "grads": torch.zeros(2, D)}
    assert algo.upload_problem(Upload(0, 3, good), state) is None
    bad = [({**good, "grads": torch.zeros(2, C)}, "shape"),  # a logit-sized gradient for the feature variant
           ({**good, "labels": torch.tensor([0, 4])}, "distinct classes"),
           ({**good, "labels": torch.tensor([2, 2])}, "distinct classes"),
           ({**good, "grads": torch.zeros(2, D, dtype=torch.float64)}, "float32"),
           ({**good, "grads": torch.full((2, D), math.nan)}, "non-finite"),
           ({"grads": good["grads"]}, "tensor names"),
           ({**good, "counts": torch.tensor([1, 1])}, "tensor names")]
    for tensors, words in bad:
        problem = algo.upload_problem(Upload(0, 3, tensors), state)
        assert problem and words in problem, (words, problem)


@pytest.mark.parametrize("key, value, words", [
    ("fedl2g.variant", "both", "must be one of feature, logit"),
    ("fedl2g.lambda", -1.0, "must be a number >= 0"),
    ("fedl2g.quiz_batches", 0, "must be an integer >= 1"),
    ("fedl2g.warm_up_rounds", -1, "must be an integer >= 0")])
def test_bad_settings_are_refused_in_one_line_naming_the_key(make_cfg, key, value, words):
    with pytest.raises(ConfigError) as info:
        make_cfg({"method": "fedl2g", key: value})
    assert f"recipe key '{key}': {words}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.heavy  # a real `pfl` process: seconds of imports alone, more on a shared CPU
def test_the_cli_exits_2_with_one_line_on_a_bad_variant(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cli.main", "train", "--recipe", "smoke", "--set", "method=fedl2g",
                          "--set", "fedl2g.variant=both", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "fedl2g.variant" in lines[0] and "feature, logit" in lines[0]
    assert not (tmp_path / "run").exists()


def test_heads_deeper_than_one_layer_are_guided_through_phi_and_logits(make_cfg):
    for variant in ("feature", "logit"):
        algo, _, _ = setup(method_cfg(make_cfg, "fedl2g", **{"fedl2g.variant": variant}))
        m = algo.make_client("cnn3+h32-16")
        x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
        y = torch.tensor([0, 1, 2, 3, 0, 1])
        m.data = ClientData(0, x, y, x[:0], y[:0])
        g = algo.initial_global()
        m.receive(algo.download(g, 0))
        xt = m.transform(x, train=False)
        h, z = m.model.phi(xt), m.model(xt)
        target = h if variant == "feature" else z
        expected = F.cross_entropy(z, y) + F.mse_loss(target, m.guides[y])
        assert torch.allclose(m.local_loss(xt, y), expected, atol=1e-6)
        assert algo.upload_problem(Upload(0, 6, m.upload()), g) is None


def test_modules_without_a_second_derivative_compute_the_same_values_inside_the_look_ahead():
    """hardsigmoid (MobileNetV3) and embedding bags (text bags) have no double backward in PyTorch: inside the
    look-ahead they are computed from ops that have one, with the same values, and restored afterwards."""
    torch.manual_seed(0)
    ids = torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0], [2, 2, 5, 0]])
    weights = torch.rand(3, 4)
    bags = [nn.EmbeddingBag(6, 3, mode="sum", padding_idx=0), nn.EmbeddingBag(6, 3, mode="mean", padding_idx=0),
            nn.EmbeddingBag(6, 3, mode="sum")]
    model = nn.Sequential(nn.Hardsigmoid(), *bags)
    x = torch.linspace(-5, 5, 41)
    before = [model[0](x), *(b(ids) for b in bags), bags[2](ids, per_sample_weights=weights)]
    with twice_differentiable(model):
        after = [model[0](x), *(b(ids) for b in bags), bags[2](ids, per_sample_weights=weights)]
        weight = bags[0].weight
        (grad,) = torch.autograd.grad(bags[0](ids).pow(2).sum(), weight, create_graph=True)
        assert grad.requires_grad  # differentiable again
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in model)


def test_a_text_bag_and_a_hardsigmoid_model_send_the_gradient_of_the_same_model_written_without_them(make_cfg):
    class Bags(nn.Module):  # an embedding bag, then hardsigmoid
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, WIDTH, mode="mean", padding_idx=0)
            self.gate = nn.Hardsigmoid()

        def forward(self, ids):
            return self.gate(self.bag(ids))

    class Plain(Bags):  # the same function from F.embedding and clamp
        def forward(self, ids):
            keep = (ids != 0).float().unsqueeze(-1)
            mean = (F.embedding(ids, self.bag.weight) * keep).sum(1) / keep.sum(1).clamp_min(1)
            return (mean / 6 + 0.5).clamp(0, 1)

    cfg = make_cfg({"method": "fedl2g", "batch_size": 8})
    settings = ALGORITHMS["fedl2g"].Settings.from_config(cfg, "fedl2g")
    ids = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % CLASSES
    uploads = []
    for phi in (Bags(), Plain()):
        torch.manual_seed(0)
        phi.bag.weight.data.normal_(0, 3)  # spread the gate's inputs over its linear part and both flat ones
        m = FedL2GClient(SplitModel(phi, nn.Linear(WIDTH, CLASSES), "bags", WIDTH), cfg, lambda x, train: x, CLASSES,
                         settings)
        m.data = ClientData(0, ids, y, ids[:0], y[:0])
        m.receive({"guides": guides_for("feature"), "round": torch.tensor(1)})
        uploads.append(m.upload())
    assert uploads[0]["grads"].abs().sum() > 0
    assert torch.equal(uploads[0]["labels"], uploads[1]["labels"])
    assert torch.allclose(uploads[0]["grads"], uploads[1]["grads"], rtol=1e-5, atol=1e-8)


def test_robust_rules_act_per_class_over_the_senders_and_clipping_bounds_each_gradient_table(make_cfg):
    rows = {0: [1.0, 2.0, 30.0], 2: [-4.0]}  # class 0 from three clients, class 2 from one
    uploads = [Upload(0, 9, {"labels": torch.tensor([0, 2]), "grads": torch.tensor([[1.0], [-4.0]]).expand(2, D)}),
               Upload(1, 1, {"labels": torch.tensor([0]), "grads": torch.full((1, D), 2.0)}),
               Upload(2, 1, {"labels": torch.tensor([0]), "grads": torch.full((1, D), 30.0)})]
    for rule, value in (("mean", lambda v: sum(v) / len(v)), ("median", lambda v: sorted(v)[len(v) // 2])):
        algo, _, _ = setup(method_cfg(make_cfg, "fedl2g", aggregation=rule, **{"fedl2g.guide_lr": 1e-3}))
        state = {"guides": torch.zeros(C, D), "round": torch.tensor(0)}
        out = algo.aggregate(state, uploads)
        grad = torch.zeros(C, D)
        for c, v in rows.items():
            grad[c] = value(v)
        grad *= min(1.0, GUIDE_GRAD_CLIP / (float(grad.norm()) + 1e-6))
        assert torch.allclose(out["guides"], -1e-3 * grad, atol=1e-9), rule
    algo, _, _ = setup(method_cfg(make_cfg, "fedl2g", clip_update_norm=1.0, **{"fedl2g.guide_lr": 1.0}))
    out = algo.aggregate({"guides": torch.zeros(C, D), "round": torch.tensor(0)}, uploads[2:])
    assert float(out["guides"].norm()) == pytest.approx(1.0, rel=1e-5)  # 30 x sqrt(500) clipped to norm 1
