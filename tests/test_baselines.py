"""The six baselines and FedAvg: what trains, what travels, and what the server computes, checked by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from pfl import config
from pfl.algorithms import ALGORITHMS, LATER_METHODS, PAPER_METHODS, TaskSpec, Upload
from pfl.algorithms.base import payload_bytes
from pfl.algorithms.fedkd import compress, decompress
from pfl.data import BatchTransform, build_clients, make_synthetic
from pfl.errors import ConfigError
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.models import CNN_SPECS, assign_architectures, build_model, count_parameters

D, C = 500, 4  # representation size, classes of the synthetic task in conftest.SMOKE


def setup(cfg):
    data = make_synthetic(cfg["synthetic.num_samples"], cfg.num_classes, tuple(cfg["synthetic.image_shape"]),
                          0.5, cfg.seed)
    spec = TaskSpec(data.image_shape, data.num_classes, D, BatchTransform(data.mean, data.std, False))
    algo = ALGORITHMS[cfg.method](cfg, spec)
    clients = build_clients(data, cfg)
    archs = assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
    return algo, clients, archs


def method_cfg(make_cfg, method, **extra):
    over = {"method": method, **extra}
    if method == "fedavg":
        over["model_setting"] = "homogeneous"
    return make_cfg(over)


def one_client_round(cfg):
    """Receive the initial broadcast, train every phase once on client 0; return what changed and the upload."""
    algo, clients, _ = setup(cfg)
    arch = "cnn1" if cfg.method == "fedavg" else "cnn2"
    torch.manual_seed(0)
    global_state = algo.initial_global()
    module = algo.make_client(arch)
    module.data = clients[0]
    download = algo.download(global_state, 0)
    module.receive(download)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    runner = make_runner(grad_clip=cfg.grad_clip)
    runner.fit_phases(module, clients[0], cfg.batch_size, seed=1, arch=arch)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    upload = module.upload()
    return algo, module, clients[0], download, changed, upload, global_state


# what each method trains in a round (parameter-name prefixes of its client module)
TRAINS = {
    "standalone": ("model.",), "lg_fedavg": ("model.",), "fedavg": ("model.",), "fedproto": ("model.",),
    "fedgh": ("model.",), "fml": ("model.", "meme."), "fedkd": ("model.", "mentee."),
}


@pytest.mark.parametrize("method", sorted(TRAINS))
def test_one_round_changes_exactly_the_parameters_the_method_trains(make_cfg, method):
    _, module, _, _, changed, _, _ = one_client_round(method_cfg(make_cfg, method))
    names = {n for n, _ in module.named_parameters()}
    expected = {n for n in names if n.startswith(TRAINS[method])}
    assert changed == expected


def _cnn5_shapes(prefix):
    return {f"{prefix}.{k}": tuple(v.shape) for k, v in build_model("cnn5", (1, 16, 16), C, D).state_dict().items()}


def test_uploads_have_the_documented_shapes(make_cfg):
    shapes = {}
    for method in TRAINS:
        _, _module, client, download, _, upload, _ = one_client_round(method_cfg(make_cfg, method))
        shapes[method] = ({k: tuple(v.shape) for k, v in upload.items()},
                          {k: tuple(v.shape) for k, v in download.items()}, client)
    present = int(torch.unique(shapes["fedproto"][2].y_train).numel())
    assert shapes["standalone"][:2] == ({}, {})
    head = {"head.weight": (C, D), "head.bias": (C,)}
    assert shapes["lg_fedavg"][:2] == (head, head)
    assert shapes["fedgh"][:2] == ({"labels": (present,), "protos": (present, D)}, head)
    assert shapes["fedproto"][0] == {"labels": (present,), "protos": (present, D), "counts": (present,)}
    assert shapes["fedproto"][1] == {"labels": (0,), "protos": (0, D)}  # round 1: no global prototypes yet
    assert shapes["fml"][:2] == (_cnn5_shapes("meme"), _cnn5_shapes("meme"))
    fedavg_model = {k: tuple(v.shape) for k, v in build_model("cnn1", (1, 16, 16), C, D).state_dict().items()}
    assert shapes["fedavg"][:2] == (fedavg_model, fedavg_model)
    # FedKD: round 1 sends the whole mentee down (and the round's energy threshold); the update goes up
    # as SVD factors (U S, V^T) for matrices where that is smaller, raw tensors otherwise
    up, down = shapes["fedkd"][:2]
    assert down == {**_cnn5_shapes("mentee"), "energy": ()}
    for name, shape in _cnn5_shapes("update").items():
        if name in up:
            assert up[name] == shape
        else:
            m, n = shape[0], math.prod(shape[1:])
            k = up[name + ".us"][1]
            assert up[name + ".us"] == (m, k) and up[name + ".vh"] == (k, n) and k * (m + n) < m * n


def test_fedgh_client_trains_from_the_global_head(make_cfg):
    cfg = method_cfg(make_cfg, "fedgh")
    algo, _, _ = setup(cfg)
    module = algo.make_client("cnn3")
    state = algo.initial_global()
    module.receive(algo.download(state, 0))
    assert torch.equal(module.model.head.weight, state["head.weight"])


def test_fedproto_loss_is_ce_plus_lambda_mse_to_the_global_prototype_of_known_classes(make_cfg):
    cfg = method_cfg(make_cfg, "fedproto", **{"fedproto.lambda": 0.7})
    algo, _, _ = setup(cfg)
    m = algo.make_client("cnn1")
    protos = torch.randn(2, D)
    m.receive({"labels": torch.tensor([0, 2]), "protos": protos})
    x, y = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 3, 2])
    h = m.model.phi(x)
    known = torch.tensor([0, 2, 4])
    full = torch.zeros(C, D)
    full[[0, 2]] = protos
    expected = F.cross_entropy(m.model.head(h), y) + 0.7 * F.mse_loss(h[known], full[y[known]])
    assert torch.allclose(m.phase_named("local").loss(x, y), expected, atol=1e-6)


def test_fml_loss_is_mutual_learning_with_alpha_and_beta(make_cfg):
    cfg = method_cfg(make_cfg, "fml", **{"fml.alpha": 0.3, "fml.beta": 0.8})
    algo, _, _ = setup(cfg)
    m = algo.make_client("cnn4")
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    zl, zm = m.model(x), m.meme(x)
    pl, pm = zl.softmax(1), zm.softmax(1)
    kl_m_l = (pm * (pm.log() - pl.log())).sum(1).mean()  # KL(meme || local)
    kl_l_m = (pl * (pl.log() - pm.log())).sum(1).mean()
    expected = 0.3 * F.cross_entropy(zl, y) + 0.7 * kl_m_l + 0.8 * F.cross_entropy(zm, y) + 0.2 * kl_l_m
    assert torch.allclose(m.phase_named("mutual").loss(x, y), expected, atol=1e-5)


def test_weighted_mean_methods_aggregate_to_the_hand_computed_mean(make_cfg):
    for method in ("lg_fedavg", "fml", "fedavg"):
        cfg = method_cfg(make_cfg, method)
        algo, _, _ = setup(cfg)
        g = algo.initial_global()
        a = {k: torch.full_like(v, 1.0) for k, v in g.items()}
        b = {k: torch.full_like(v, 5.0) for k, v in g.items()}
        out = algo.aggregate(g, [Upload(0, 30, a), Upload(1, 10, b)])
        for k in g:  # (30 * 1 + 10 * 5) / 40 = 2
            assert torch.allclose(out[k], torch.full_like(g[k], 2.0)), (method, k)


def test_fedproto_server_takes_per_class_weighted_means_and_keeps_unsent_classes(make_cfg):
    cfg = method_cfg(make_cfg, "fedproto")
    algo, _, _ = setup(cfg)
    p = lambda v: torch.full((D,), float(v))  # noqa: E731
    previous = {"labels": torch.tensor([1, 3]), "protos": torch.stack([p(9), p(7)])}
    u0 = Upload(0, 50, {"labels": torch.tensor([0, 1]), "protos": torch.stack([p(1), p(2)]),
                        "counts": torch.tensor([10, 40])})
    u1 = Upload(1, 30, {"labels": torch.tensor([1, 2]), "protos": torch.stack([p(4), p(6)]),
                        "counts": torch.tensor([20, 10])})
    out = algo.aggregate(previous, [u0, u1])
    assert out["labels"].tolist() == [0, 1, 2, 3]
    expected = [1.0, (40 * 2 + 20 * 4) / 60, 6.0, 7.0]  # class 1 weighted by counts; class 3 kept
    for row, value in zip(out["protos"], expected):
        assert torch.allclose(row, p(value))


def test_fedgh_server_trains_the_head_on_the_prototypes_by_ce(make_cfg):
    cfg = method_cfg(make_cfg, "fedgh", **{"fedgh.server_epochs": 1, "fedgh.server_lr": 0.5})
    algo, _, _ = setup(cfg)
    g = algo.initial_global()
    torch.manual_seed(3)
    protos = [torch.randn(2, D), torch.randn(3, D)]
    labels = [torch.tensor([0, 1]), torch.tensor([1, 2, 3])]
    out = algo.aggregate(g, [Upload(k, 10, {"labels": labels[k], "protos": protos[k]}) for k in range(2)])
    # one SGD step (momentum has no history yet) of mean CE over the 5 (prototype, class) pairs, by hand:
    P, Y = torch.cat(protos), torch.cat(labels)
    z = P @ g["head.weight"].T + g["head.bias"]
    dz = (z.softmax(1) - F.one_hot(Y, C).float()) / len(Y)
    assert torch.allclose(out["head.weight"], g["head.weight"] - 0.5 * dz.T @ P, atol=1e-5)
    assert torch.allclose(out["head.bias"], g["head.bias"] - 0.5 * dz.sum(0), atol=1e-6)
    # and many epochs fit the prototypes
    trained = ALGORITHMS["fedgh"](method_cfg(make_cfg, "fedgh", **{"fedgh.server_epochs": 200}), algo.spec)
    out = trained.aggregate(g, [Upload(k, 10, {"labels": labels[k], "protos": protos[k]}) for k in range(2)])
    assert ((P @ out["head.weight"].T + out["head.bias"]).argmax(1) == Y).all()


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_fedkd_compression_keeps_the_energy_threshold_and_is_smaller(energy):
    torch.manual_seed(0)
    delta = {"w": torch.randn(64, 8) @ torch.randn(8, 120) + 0.1 * torch.randn(64, 120),
             "conv": torch.randn(32, 16, 5, 5), "b": torch.randn(64)}
    packed = compress(delta, energy)
    assert torch.equal(packed["b"], delta["b"])  # vectors travel as they are
    restored = decompress(packed, {k: v.shape for k, v in delta.items()})
    for name in ("w", "conv"):
        if name in packed:  # not compressible at this threshold: sent exactly
            assert torch.equal(restored[name], delta[name])
            continue
        lost = (restored[name] - delta[name]).pow(2).sum() / delta[name].pow(2).sum()
        assert lost <= 1 - energy + 1e-5
        kept = payload_bytes({k: v for k, v in packed.items() if k.startswith(name)})
        assert kept < payload_bytes({name: delta[name]})
    # the low-rank matrix compresses far below its size at 90% energy
    if energy == 0.9:
        assert packed["w.us"].shape[1] <= 8


def test_fedkd_server_averages_updates_and_clients_track_the_global_mentee_exactly(make_cfg):
    cfg = method_cfg(make_cfg, "fedkd", rounds=3)
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(),
                             make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    run.run_round()
    state = run.state.global_state
    assert int(state["version"]) == 1 and state["client_version"].tolist() == [0] * cfg.num_clients
    # round 2: every client took part in round 1, so it receives only the compressed aggregate update
    download = algo.download(state, 2)
    assert not any(k.startswith("mentee.") for k in download) and any(k.startswith("update.") for k in download)
    assert payload_bytes(download) < payload_bytes({k: v for k, v in state.items() if k.startswith("mentee.")})
    module = run.workers.worker.module_for(2)
    module.receive(download)
    for k, v in module.mentee.state_dict().items():
        assert torch.equal(v, state[f"mentee.{k}"]), k


def test_fedkd_aggregate_is_the_weighted_mean_update_when_nothing_is_discarded(make_cfg):
    cfg = method_cfg(make_cfg, "fedkd", **{"fedkd.energy_start": 1.0, "fedkd.energy_end": 1.0})
    algo, _, _ = setup(cfg)
    g = algo.initial_global()
    mentee = {k[len("mentee."):]: v for k, v in g.items() if k.startswith("mentee.")}
    torch.manual_seed(1)
    d0 = {k: torch.randn_like(v) for k, v in mentee.items()}
    d1 = {k: torch.randn_like(v) for k, v in mentee.items()}
    ups = [Upload(0, 10, {f"update.{k}": v for k, v in compress(d0, 1.0).items()}),
           Upload(3, 30, {f"update.{k}": v for k, v in compress(d1, 1.0).items()})]
    out = algo.aggregate(g, ups)
    for k, v in mentee.items():
        assert torch.allclose(out[f"mentee.{k}"], v + 0.25 * d0[k] + 0.75 * d1[k], atol=1e-4), k
    assert out["client_version"].tolist() == [0, -1, -1, 0]


def test_fedavg_refuses_a_heterogeneous_zoo(make_cfg):
    with pytest.raises(ConfigError, match=r"model_setting.*fedavg.*homogeneous"):
        make_cfg({"method": "fedavg"})
    make_cfg({"method": "fedavg", "model_zoo": ["cnn3"]})  # one architecture is fine whatever the setting


@pytest.mark.parametrize("key,value", [("fml.alpha", 1.5), ("fml.shared_model", "vgg"), ("fedkd.energy_start", 0.0),
                                       ("fedproto.lambda", -1.0), ("fedgh.server_epochs", 0),
                                       ("fedgh.server_lr", 0.0), ("fd.lambda", -1.0), ("fedtgp.server_epochs", 0),
                                       ("fedtgp.margin_max", -1.0), ("fedmrl.shared_model", "vgg"),
                                       ("pfedes.mu", 1.5), ("pfedes.extra_epochs", -1), ("fedssa.decay_rounds", 0),
                                       ("pfedafm.alpha_lr", 0.0), ("fedproto.inference", "mean"),
                                       ("fedgh.inference", "both"), ("evaluate_at", "later"),
                                       ("model_zoo", "htfe9")])
def test_method_settings_are_validated(make_cfg, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_cfg({key: value})


def test_fedkd_energy_must_not_fall_over_the_rounds(make_cfg):
    with pytest.raises(ConfigError, match=r"fedkd.energy_end"):
        make_cfg({"method": "fedkd", "fedkd.energy_start": 0.99, "fedkd.energy_end": 0.9})


def test_bytes_per_round_equal_the_sizes_of_the_tensors_sent(make_cfg):
    """Counted bytes against sizes computed from the shapes by hand (float32 = 4 bytes, int64 = 8)."""
    k = 4  # clients per round (N=4, C=1)
    meme = count_parameters(build_model("cnn5", (1, 16, 16), C, D))
    expected = {"pfedlora": (k * 4 * (8 * D + C * 8),) * 2, "standalone": (0, 0),
                "lg_fedavg": (k * 4 * (C * D + C),) * 2, "fml": (k * 4 * meme,) * 2}
    for method, (up, down) in expected.items():
        cfg = method_cfg(make_cfg, method, rounds=1)
        algo, clients, archs = setup(cfg)
        run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
        run.initialise()
        record = run.run_round()
        assert (record["bytes_up"], record["bytes_down"]) == (up, down), method
        assert record["params_up"] * 4 == up
    # FedProto: per client, the classes it holds: m x d prototypes (float32) + m labels + m counts (int64)
    cfg = method_cfg(make_cfg, "fedproto", rounds=1)
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
    run.initialise()
    record = run.run_round()
    held = [int(torch.unique(c.y_train).numel()) for c in clients]
    assert record["bytes_up"] == sum(m * (4 * D + 8 + 8) for m in held)
    assert record["bytes_down"] == 0  # no global prototypes exist before round 1
    # FedGH: the same prototypes without counts up; the global head (C x d + C float32) down
    cfg = method_cfg(make_cfg, "fedgh", rounds=1)
    algo, clients, archs = setup(cfg)
    run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
    run.initialise()
    record = run.run_round()
    assert record["bytes_up"] == sum(m * (4 * D + 8) for m in held)
    assert record["bytes_down"] == k * 4 * (C * D + C)


def test_every_method_runs_a_round_and_measures_flops(make_cfg):
    for method in PAPER_METHODS + LATER_METHODS:
        cfg = method_cfg(make_cfg, method, rounds=1)
        algo, clients, archs = setup(cfg)
        run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
        run.initialise()
        record = run.run_round()
        assert record["flops_client"] > 0 and record["flops_cumulative"] == record["flops_client"] + \
            record["flops_server"], method
        assert not math.isnan(record["acc_mean"])
    assert set(PAPER_METHODS) | set(LATER_METHODS) | {"fedavg"} == set(ALGORITHMS)
    assert set(CNN_SPECS) >= {"cnn5"}


def test_fmnist_dir_recipe_is_the_dirichlet_setting_of_the_issue():
    cfg, _ = config.load("fmnist-dir")
    assert (cfg.dataset, cfg.partition, cfg.dirichlet_alpha, cfg.num_clients, cfg.participation,
            cfg.test_fraction, cfg.model_setting) == ("fmnist", "dirichlet", 0.1, 20, 1.0, 0.2, "heterogeneous")
    assert cfg.rounds >= 20 and 0 < cfg.target_accuracy < 1
