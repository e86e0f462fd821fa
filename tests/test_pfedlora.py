import math

import pytest
import torch
import torch.nn.functional as F

from pfl.algorithms import ALGORITHMS, TaskSpec, Upload
from pfl.algorithms.base import cpu_clone, payload_bytes, weighted_mean
from pfl.data import BatchTransform, build_clients, make_synthetic
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.models import assign_architectures


def setup(cfg):
    data = make_synthetic(cfg["synthetic.num_samples"], cfg.num_classes, tuple(cfg["synthetic.image_shape"]),
                          0.5, cfg.seed)
    spec = TaskSpec(data.image_shape, data.num_classes, 500, BatchTransform(data.mean, data.std, False))
    algo = ALGORITHMS["pfedlora"](cfg, spec)
    clients = build_clients(data, cfg)
    archs = assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
    return algo, clients, archs


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_phase_local_changes_only_the_private_model_and_phase_adapter_only_the_adapter(make_cfg):
    cfg = make_cfg()
    algo, clients, _ = setup(cfg)
    module = algo.make_client("cnn2")
    with torch.no_grad():  # a non-zero B, so that the adapter actually contributes during phase 1
        module.adapter.B.normal_()
    runner = make_runner(grad_clip=cfg.grad_clip)
    all_names = {n for n, _ in module.named_parameters()}
    adapter_names = {n for n in all_names if n.startswith("adapter.")}
    model_names = all_names - adapter_names

    from pfl.data import TensorBatches
    for phase, expect in (("local", model_names), ("adapter", adapter_names)):
        before = snapshot(module)
        module.set_phase(phase)
        runner.fit(module, TensorBatches(clients[0].x_train, clients[0].y_train, 32, True, 0), epochs=1)
        assert module.steps_in_phase == math.ceil(len(clients[0].y_train) / 32)
        assert changed(before, module) == expect, phase


def test_local_phase_loss_is_mu_mix_of_combined_and_head_ce(make_cfg):
    cfg = make_cfg({"pfedlora.mu": 0.3})
    algo, _, _ = setup(cfg)
    m = algo.make_client("cnn1")
    with torch.no_grad():
        m.adapter.B.normal_()
    x, y = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    h = m.model.phi(x)
    expected = 0.3 * F.cross_entropy(m.model.head(h) + m.adapter(h), y) + 0.7 * F.cross_entropy(m.model.head(h), y)
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-6)
    assert torch.allclose(m.phase_named("adapter").loss(x, y), F.cross_entropy(m.model.head(h) + m.adapter(h), y),
                          atol=1e-6)


def test_server_aggregate_is_the_sample_weighted_mean_by_hand(make_cfg):
    algo, _, _ = setup(make_cfg())
    a1, a2, a3 = (torch.full((8, 500), v) for v in (1.0, 2.0, 4.0))
    b1, b2, b3 = (torch.full((4, 8), v) for v in (-1.0, 0.0, 3.0))
    ups = [Upload(0, 10, {"adapter.A": a1, "adapter.B": b1}), Upload(1, 30, {"adapter.A": a2, "adapter.B": b2}),
           Upload(2, 60, {"adapter.A": a3, "adapter.B": b3})]
    out = algo.aggregate({}, ups)
    # by hand: (10*1 + 30*2 + 60*4) / 100 = 3.1 ; (10*-1 + 30*0 + 60*3) / 100 = 1.7
    assert torch.allclose(out["adapter.A"], torch.full((8, 500), 3.1))
    assert torch.allclose(out["adapter.B"], torch.full((4, 8), 1.7))
    # and not the unweighted mean (7/3 ~ 2.33)
    assert not torch.allclose(weighted_mean(ups)["adapter.A"], torch.full((8, 500), 7 / 3))


def test_round_loop_counts_adapter_bytes_times_clients_times_two_and_keeps_state_on_cpu(make_cfg):
    cfg = make_cfg({"num_clients": 6, "participation": 0.5, "rounds": 2, "pfedlora.rank": 4})
    algo, clients, archs = setup(cfg)
    store = MemoryStore()
    run = FederatedRun.local(cfg, clients, archs, algo, store, make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    state = run.run()
    adapter_bytes = (4 * 500 + 4 * 4) * 4  # r*(d+C) float32 parameters
    assert adapter_bytes == payload_bytes(algo.initial_global())
    for record in state.history:
        assert record["clients"] == 3  # K = round(0.5 * 6)
        assert record["bytes_up"] == record["bytes_down"] == adapter_bytes * 3
        assert record["bytes_up"] + record["bytes_down"] == adapter_bytes * 3 * 2
        assert record["params_up"] == 4 * 504 * 3
    assert all(t.device.type == "cpu" for k in range(6) for t in store.get(k).values())
    # the global adapter after the last round is the weighted mean of what the sampled clients hold now
    sampled = [k for k in range(6) if not torch.equal(store.get(k)["adapter.B"], torch.zeros(4, 4))]
    assert len(sampled) >= 3
    assert 0.0 <= state.history[-1]["acc_min"] <= state.history[-1]["acc_mean"] <= 1.0
    # after the adapter phase B is no longer zero, so the adapter contributes to the logits
    assert all(r["adapter_logit_ratio"] > 0 for r in state.history)


def test_global_adapter_equals_weighted_mean_of_last_round_client_adapters(make_cfg):
    cfg = make_cfg({"num_clients": 4, "participation": 1.0, "rounds": 1})
    algo, clients, archs = setup(cfg)
    store = MemoryStore()
    run = FederatedRun.local(cfg, clients, archs, algo, store, make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    run.run()
    n = torch.tensor([c.num_train for c in clients], dtype=torch.float64)
    for name in ("adapter.A", "adapter.B"):
        stacked = torch.stack([store.get(k)[name].double() for k in range(4)])
        by_hand = (stacked * (n / n.sum()).view(-1, 1, 1)).sum(0)
        assert torch.allclose(run.state.global_state[name].double(), by_hand, atol=1e-6)


def test_inference_adapter_switch(make_cfg):
    cfg = make_cfg({"pfedlora.inference_adapter": "global"})
    algo, _, _ = setup(cfg)
    m = algo.make_client("cnn1")
    g = {"adapter.A": torch.ones(8, 500), "adapter.B": torch.ones(4, 8)}
    m.prepare_eval(g)
    assert torch.equal(m.adapter.B, torch.ones(4, 8))
    cfg_own = make_cfg()
    m2 = ALGORITHMS["pfedlora"](cfg_own, algo.spec).make_client("cnn1")
    m2.prepare_eval(g)
    assert torch.count_nonzero(m2.adapter.B) == 0


def test_rank_above_representation_dim_is_rejected(make_cfg):
    from pfl.errors import ConfigError
    with pytest.raises(ConfigError, match=r"pfedlora.rank"):
        make_cfg({"pfedlora.rank": 501})


def test_disk_store_gives_the_same_run_as_the_memory_store(make_cfg, tmp_path):
    from pfl.federation import DiskStore
    cfg = make_cfg({"rounds": 2})
    histories = []
    for store in (MemoryStore(), DiskStore(tmp_path / "clients")):
        algo, clients, archs = setup(cfg)
        run = FederatedRun.local(cfg, clients, archs, algo, store, make_runner(grad_clip=cfg.grad_clip))
        run.initialise()
        histories.append([{k: v for k, v in r.items() if "seconds" not in k} for r in run.run().history])
    assert histories[0] == histories[1]
    assert len(list((tmp_path / "clients").glob("client_*.safetensors"))) == cfg.num_clients


def test_local_engine_rejects_a_non_finite_or_misshaped_update(make_cfg):
    """Whatever the engine, the round loop checks every update before the server step sees it."""
    cfg = make_cfg()
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(),
                             make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    train = run.workers.train

    def corrupting(round_idx, downloads, on_done, evaluate=()):
        outcomes = train(round_idx, downloads, on_done, evaluate)
        outcomes[1].upload.tensors["adapter.A"] = torch.full_like(outcomes[1].upload.tensors["adapter.A"], math.inf)
        outcomes[2].upload.tensors["adapter.B"] = outcomes[2].upload.tensors["adapter.B"][:, :2]
        kept.extend(cpu_clone(outcomes[k].upload.tensors) | {"n": outcomes[k].upload.num_samples} for k in (0, 3))
        return outcomes

    kept = []
    run.workers.train = corrupting
    record = run.run_round()
    assert record["clients_dropped"] == 2
    total = kept[0]["n"] + kept[1]["n"]
    for name in ("adapter.A", "adapter.B"):
        expected = (kept[0][name].double() * kept[0]["n"] + kept[1][name].double() * kept[1]["n"]) / total
        torch.testing.assert_close(run.state.global_state[name].double(), expected, rtol=0, atol=1e-6)
