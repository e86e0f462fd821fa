"""pFedLoRA's adapter federated every way (`pfedlora.aggregation`), with heterogeneous ranks: every server step
and every payload computed by hand on small tensors."""

import pytest
import torch
from test_baselines import C, D, method_cfg, setup

from pfl import config
from pfl.algorithms import Upload, lora
from pfl.algorithms.pfedlora import shared_a
from pfl.errors import ConfigError
from pfl.run import Hardware, train

RANKS = {"cnn1": 2, "cnn2": 4}  # conftest.SMOKE: 4 clients on cnn1..cnn4; cnn3, cnn4 keep pfedlora.rank = 8


def _algo(make_cfg, aggregation, **extra):
    cfg = method_cfg(make_cfg, "pfedlora", **{"pfedlora.aggregation": aggregation, **extra})
    algo, _, _ = setup(cfg)
    return algo


def _factors(rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, D, generator=g), torch.randn(C, rank, generator=g)


def test_truncated_svd_factors_rebuild_the_product_and_are_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    product = torch.randn(C, 6, generator=g) @ torch.randn(6, D, generator=g)
    a, b = lora.factors_of(product, C, 0.5)  # rank C = min(C, d): exact
    assert torch.allclose(0.5 * b @ a, product.double(), atol=1e-9)
    a, b = lora.factors_of(product, 2, 2.0)
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    assert torch.allclose(2.0 * b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-9)
    a, b = lora.factors_of(product, 6, 1.0)  # a rank above min(C, d): zero-padded components
    assert a.shape == (6, D) and b.shape == (C, 6) and torch.equal(a[C:], torch.zeros(6 - C, D))


def test_svd_server_sends_each_client_the_truncated_svd_of_the_weighted_sum_of_products(make_cfg):
    algo = _algo(make_cfg, "svd", **{"pfedlora.ranks": RANKS, "pfedlora.alpha": 4.0})
    assert algo.client_ranks == [2, 4, 8, 8]
    (a0, b0), (a1, b1) = _factors(2, 1), _factors(4, 2)
    ups = [Upload(0, 30, {"adapter.A": a0, "adapter.B": b0}), Upload(1, 10, {"adapter.A": a1, "adapter.B": b1})]
    g = algo.initial_global()
    assert all(algo.upload_problem(u, g) is None for u in ups)
    state = algo.aggregate(g, ups)
    by_hand = 0.75 * (4.0 / 2) * b0.double() @ a0.double() + 0.25 * (4.0 / 4) * b1.double() @ a1.double()
    assert torch.allclose(state["delta"].double(), by_hand, atol=1e-5)
    for client, rank in ((0, 2), (1, 4), (2, 8)):
        down = algo.download(state, client)
        assert down["adapter.A"].shape == (rank, D) and down["adapter.B"].shape == (C, rank)
        u, s, vh = torch.linalg.svd(state["delta"].double(), full_matrices=False)
        k = min(rank, C)
        expected = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        rebuilt = (4.0 / rank) * down["adapter.B"].double() @ down["adapter.A"].double()
        assert torch.allclose(rebuilt, expected, atol=1e-4)
    # rank 8 >= C: the client holds the aggregate exactly
    assert torch.allclose((4.0 / 8) * algo.download(state, 2)["adapter.B"].double()
                          @ algo.download(state, 2)["adapter.A"].double(), by_hand, atol=1e-4)


def test_stack_holds_the_exact_weighted_sum_of_products_round_after_round(make_cfg):
    algo = _algo(make_cfg, "stack", **{"pfedlora.ranks": RANKS})
    state = algo.initial_global()
    total = torch.zeros(C, D, dtype=torch.float64)
    for round_idx in range(2):
        (a0, b0), (a1, b1) = _factors(2, 3 + round_idx), _factors(4, 5 + round_idx)
        ups = [Upload(0, 20, {"adapter.A": a0, "adapter.B": b0}), Upload(1, 60, {"adapter.A": a1, "adapter.B": b1})]
        assert all(algo.upload_problem(u, state) is None for u in ups)
        state = algo.aggregate(state, ups)
        total += 0.25 * b0.double() @ a0.double() + 0.75 * b1.double() @ a1.double()  # alpha = rank: s = 1
        assert int(state["round"]) == round_idx + 1
        assert state["stack.A"].shape == (C, D)  # 1 + 2 + 4 components stacked, above the cap min(C, d) = C
        assert torch.allclose(state["stack.B"].double() @ state["stack.A"].double(), total, atol=1e-4)
    # a client holds the received product frozen and a fresh adapter (B = 0) on top
    m = algo.make_client("cnn1")
    m.receive(algo.download(state, 0))
    assert torch.allclose(m.base.weight.double(), total, atol=1e-4)
    assert torch.count_nonzero(m.adapter.B) == 0
    assert torch.equal(m.adapter.A, shared_a(algo.cfg.seed, ("stack", 2), (2, D)))
    assert {n for n, p in m.named_parameters() if p.requires_grad} >= {"adapter.A", "adapter.B"}
    assert "base.weight" in m.private_state() and "base.weight" not in dict(m.named_parameters())


def test_stack_below_the_cap_is_the_plain_concatenation():
    b_parts = [torch.ones(C, 1), 2 * torch.ones(C, 2)]
    a_parts = [torch.ones(1, D), torch.ones(2, D)]
    a, b = lora.stacked(b_parts, a_parts, cap=3)
    assert torch.equal(b, torch.cat(b_parts, dim=1).double()) and torch.equal(a, torch.cat(a_parts).double())


def test_hetlora_zero_pads_weights_by_product_norm_and_truncates(make_cfg):
    algo = _algo(make_cfg, "mean", **{"pfedlora.ranks": RANKS})
    a0, b0 = torch.ones(2, D), torch.full((C, 2), 1.0)  # client 0 (cnn1): rank 2
    a1, b1 = torch.full((4, D), 2.0), torch.full((C, 4), 3.0)  # client 1 (cnn2): rank 4
    ups = [Upload(0, 50, {"adapter.A": a0, "adapter.B": b0}), Upload(1, 50, {"adapter.A": a1, "adapter.B": b1})]
    state = algo.aggregate(algo.initial_global(), ups)
    # ||s B A||_F with s = alpha / r = 1: B0 A0 has entries 2 (= 1*1*2), B1 A1 entries 24 (= 3*2*4)
    n0, n1 = 2.0 * (C * D) ** 0.5, 24.0 * (C * D) ** 0.5
    w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
    assert state["adapter.A"].shape == (8, D) and state["adapter.B"].shape == (C, 8)
    assert torch.allclose(state["adapter.A"][:2], torch.full((2, D), w0 * 1 + w1 * 2))
    assert torch.allclose(state["adapter.A"][2:4], torch.full((2, D), w1 * 2))  # client 0's zero padding
    assert torch.equal(state["adapter.A"][4:], torch.zeros(4, D))  # nobody sent ranks 5..8
    assert torch.allclose(state["adapter.B"][:, 2:4], torch.full((C, 2), w1 * 3))
    down = algo.download(state, 0)
    assert torch.equal(down["adapter.A"], state["adapter.A"][:2]) and torch.equal(down["adapter.B"],
                                                                                 state["adapter.B"][:, :2])
    assert algo.download(state, 2)["adapter.A"].shape == (8, D)


def test_equal_ranks_mean_is_the_sample_weighted_mean_of_the_factors(make_cfg):
    algo = _algo(make_cfg, "mean")
    (a0, b0), (a1, b1) = _factors(8, 1), _factors(8, 2)
    state = algo.aggregate(algo.initial_global(), [Upload(0, 10, {"adapter.A": a0, "adapter.B": b0}),
                                                   Upload(1, 30, {"adapter.A": a1, "adapter.B": b1})])
    assert torch.allclose(state["adapter.A"], 0.25 * a0 + 0.75 * a1, atol=1e-6)
    assert torch.allclose(state["adapter.B"], 0.25 * b0 + 0.75 * b1, atol=1e-6)


def test_share_a_averages_a_rank_by_rank_and_keeps_b_private(make_cfg):
    algo = _algo(make_cfg, "share_a", **{"pfedlora.ranks": RANKS})
    a0, a1 = torch.ones(2, D), torch.full((4, D), 3.0)
    ups = [Upload(0, 10, {"adapter.A": a0}), Upload(1, 30, {"adapter.A": a1})]
    assert all(algo.upload_problem(u, algo.initial_global()) is None for u in ups)
    bad = Upload(0, 10, {"adapter.A": a0, "adapter.B": torch.zeros(C, 2)})
    assert "names differ" in algo.upload_problem(bad, algo.initial_global())
    state = algo.aggregate(algo.initial_global(), ups)
    assert set(state) == {"adapter.A"}
    assert torch.allclose(state["adapter.A"][:2], torch.full((2, D), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(state["adapter.A"][2:4], torch.full((2, D), 3.0))  # only client 1 holds ranks 3, 4
    m = algo.make_client("cnn1")
    with torch.no_grad():
        m.adapter.B.fill_(7.0)
    m.receive(algo.download(state, 0))
    assert torch.equal(m.adapter.B, torch.full((C, 2), 7.0))  # B is the client's own
    assert set(m.upload()) == {"adapter.A"} and "adapter.B" in m.private_state()


def test_freeze_a_trains_and_sends_b_only_and_a_is_one_seeded_matrix(make_cfg):
    algo = _algo(make_cfg, "freeze_a", **{"pfedlora.ranks": RANKS, "pfedlora.alpha": 8.0})
    clients = [algo.make_client(a) for a in ("cnn1", "cnn2", "cnn3")]
    full = shared_a(algo.cfg.seed, ("freeze_a",), (8, D))
    for m, rank in zip(clients, (2, 4, 8)):
        assert torch.equal(m.adapter.A, full[:rank])
        assert [p is m.adapter.B for p in m.phase_named("adapter").parameters()] == [True]
        assert set(m.upload()) == {"adapter.B"}
    b0, b1 = torch.ones(C, 2), torch.full((C, 4), 2.0)
    state = algo.aggregate(algo.initial_global(), [Upload(0, 10, {"adapter.B": b0}), Upload(1, 10, {"adapter.B": b1})])
    # the server averages s_k B_k (s = 8 / r) per rank component; a client divides by its own s
    assert torch.allclose(state["adapter.B"][:, :2], torch.full((C, 2), 0.5 * 4 * 1 + 0.5 * 2 * 2))
    assert torch.allclose(state["adapter.B"][:, 2:4], torch.full((C, 2), 2 * 2.0))
    assert torch.allclose(algo.download(state, 0)["adapter.B"], state["adapter.B"][:, :2] / 4)


def _run(tmp_path, name, **overrides):
    raw, _ = config.read_recipe_file("smoke")
    cfg = config.resolve(raw, {"rounds": 2, **overrides})
    summary = train(cfg, tmp_path / name, Hardware(threads=1))
    return cfg, summary, tmp_path / name


def _client_states(run_dir, n):
    from pfl import rundir

    return [rundir.load_tensors(rundir.client_state_path(run_dir, k)) for k in range(n)]


@pytest.mark.parametrize("aggregation", ["mean", "svd", "stack", "freeze_a", "share_a"])
def test_bytes_per_round_are_what_each_variant_sends(tmp_path, aggregation):
    """Smoke: C = 4, d = 500, 4 clients of ranks 2, 4, 8, 8 (22 in all), float32 factors."""
    cfg, summary, run_dir = _run(tmp_path, aggregation, **{"pfedlora.aggregation": aggregation,
                                                            "pfedlora.ranks": RANKS})
    c, d, r, rounds = 4, cfg.representation_dim, 2 + 4 + 8 + 8, cfg.rounds
    floats = {"mean": r * (c + d), "svd": r * (c + d), "stack": r * (c + d), "freeze_a": r * c, "share_a": r * d}
    assert summary["bytes_up_total"] == floats[aggregation] * 4 * rounds
    if aggregation == "stack":
        # every client receives the whole stack (1 component in round 1, then min(C, d) = 4 after the first
        # aggregate) and the round counter (int64)
        assert summary["bytes_down_total"] == 4 * ((c + d) * 1 * 4 + 8) + 4 * ((c + d) * 4 * 4 + 8)
    else:  # each client receives factors of its own rank
        assert summary["bytes_down_total"] == floats[aggregation] * 4 * rounds
    states = _client_states(run_dir, cfg.num_clients)
    if aggregation == "freeze_a":  # A never trained, never sent: the seeded matrix on every client
        full = shared_a(cfg.seed, ("freeze_a",), (8, d))
        for state, rank in zip(states, (2, 4, 8, 8)):
            assert torch.equal(state["adapter.A"], full[:rank])


def test_freeze_a_keeps_a_across_a_resume(tmp_path):
    """A run killed after a checkpoint and resumed holds the seeded A on every client, never trained or sent."""
    import signal
    import time

    from tests.test_resume import checkpoint_round, start

    out = tmp_path / "run"
    proc = start("train", "--recipe", "smoke", "--set", "pfedlora.aggregation=freeze_a", "--set", "rounds=6",
                 "--set", "checkpoint_every=1", "--out", str(out))
    deadline = time.monotonic() + 120
    while checkpoint_round(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint_round(out) >= 1
    resumed = start("train", "--resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    full = shared_a(0, ("freeze_a",), (8, 500))
    for state in _client_states(out, 4):
        assert torch.equal(state["adapter.A"], full)


def test_bad_settings_are_refused_with_the_key(make_cfg):
    with pytest.raises(ConfigError, match=r"pfedlora\.aggregation"):
        make_cfg({"pfedlora.aggregation": "average"})
    with pytest.raises(ConfigError, match=r"pfedlora\.ranks"):
        make_cfg({"pfedlora.ranks": {"cnn99": 2}})
    with pytest.raises(ConfigError, match=r"pfedlora.ranks.cnn1.*\[1, 500\]"):
        make_cfg({"pfedlora.ranks": {"cnn1": 501}})
    with pytest.raises(ConfigError, match=r"pfedlora\.rank_min"):
        make_cfg({"pfedlora.rank_min": 9})
    with pytest.raises(ConfigError, match="stack sums"):
        make_cfg({"pfedlora.aggregation": "stack", "aggregation": "median"})


def test_capacity_ranks_follow_parameter_counts(make_cfg):
    assert lora.capacity_ranks({"a": 100, "b": 50, "c": 1}, 8, 2) == {"a": 8, "b": 4, "c": 2}
    algo = _algo(make_cfg, "svd", **{"pfedlora.rank_policy": "capacity", "pfedlora.ranks": {"cnn4": 3}})
    from pfl.models import build_model, count_parameters

    params = {a: count_parameters(build_model(a, (1, 16, 16), C, D)) for a in ("cnn1", "cnn2", "cnn3")}
    expected = lora.capacity_ranks({**params, "cnn4": count_parameters(build_model("cnn4", (1, 16, 16), C, D))}, 8, 1)
    assert algo.arch_ranks == {**expected, "cnn4": 3}
