"""Heads deeper than one linear layer (HtFLlib's HtC-img-4): architecture names with a head suffix, the named
zoos, and every method on a zoo whose clients' heads differ: it builds, trains one step of each phase and uploads
what its server accepts, or refuses the zoo with one line."""

import pytest
import torch
from torch import nn

from pfl.algorithms import ALGORITHMS
from pfl.algorithms.base import Upload
from pfl.errors import ConfigError
from pfl.models import ZOOS, build_model, split_architecture

# the methods that exchange (part of) a head, and why they cannot run clients whose heads differ
REFUSE_MIXED_HEADS = {"lg_fedavg": "exchanges its clients' heads", "fedgh": "exchanges its clients' heads",
                      "fedssa": "rows of a single linear head", "fedavg": "needs one architecture"}


def test_a_head_suffix_builds_an_mlp_head_on_the_same_representation():
    model = build_model("cnn2+h64-32", (1, 16, 16), 4, 50)
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model.head if isinstance(m, nn.Linear)] == \
        [(50, 64), (64, 32), (32, 4)]
    assert model.arch == "cnn2+h64-32" and model.representation_dim == 50
    x = torch.randn(3, 1, 16, 16)
    h = model.phi(x)
    assert h.shape == (3, 50)
    # raw logits: no ReLU after the last layer (HtFLlib's Head ends in one), so logits can be negative
    w = model.head[-1]
    assert torch.equal(model(x), w(torch.relu(model.head[2](torch.relu(model.head[0](h))))))
    plain = build_model("cnn2", (1, 16, 16), 4, 50)
    assert isinstance(plain.head, nn.Linear)
    torch.manual_seed(0)
    a = build_model("cnn2+h8", (1, 16, 16), 4, 50)
    torch.manual_seed(0)
    b = build_model("cnn2", (1, 16, 16), 4, 50)
    for (name, p), (_, q) in zip(a.phi.named_parameters(), b.phi.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the extractor is the plain model's, drawn first


def test_the_named_zoos_follow_htflib():
    assert split_architecture("resnet34+h512") == ("resnet34", (512,))
    assert ZOOS["res34-htc4"] == ["resnet34", "resnet34+h512", "resnet34+h256", "resnet34+h128"]
    # HtFE-img-8-HtC-img-4: client k gets extractor k mod 8 and head k mod 4
    assert ZOOS["htfe8-htc4"] == ["cnn1", "googlenet+h512", "mobilenet_v2+h256", "resnet18+h128", "resnet34",
                                  "resnet50+h512", "resnet101+h256", "resnet152+h128"]
    depths = [len(split_architecture(a)[1]) + 1 for a in ZOOS["paper-cnn-htc4"]]
    assert depths == [1, 2, 2, 3, 4]


@pytest.mark.parametrize("zoo, message", [
    (["cnn1+h"], "a head suffix is +h<width>[-<width>...]"),
    (["cnn1+h0"], "a head suffix is +h<width>[-<width>...]"),
    (["cnn1+h64-"], "a head suffix is +h<width>[-<width>...]"),
    (["cnn1+h99999999"], "head widths are at most 65536"),
    (["cnn9+h64"], "unknown model 'cnn9'"),
])
def test_a_bad_head_suffix_is_refused_with_one_line(make_cfg, zoo, message):
    with pytest.raises(ConfigError, match=None) as info:
        make_cfg({"model_zoo": zoo})
    text = str(info.value)
    assert text.startswith("recipe key 'model_zoo': ") and message in text and "\n" not in text


def _one_round_of_every_client(cfg):
    """Every architecture of the zoo: receive the initial broadcast, one step of each phase, upload; the server
    checks every upload and aggregates them all, and every client takes the new broadcast."""
    from pfl.build import build

    setup = build(cfg)
    algo = setup.algorithm
    g = algo.initial_global()
    uploads = []
    for k, client in enumerate(setup.clients):
        torch.manual_seed(k)
        m = algo.make_client(setup.architectures[k])
        m.data = client
        m.start(algo.download(g, k))
        x, y = client.x_train[:8], client.y_train[:8]
        for phase in m.phases():
            m.set_phase(phase)
            m.on_train_start()
            m.on_train_epoch_start()
            optimiser = m.configure_optimizers()
            loss = phase.loss(m.transform(x, train=True), y)
            assert torch.isfinite(loss), (cfg.method, setup.architectures[k], phase.name)
            loss.backward()
            optimiser.step()
            m.on_train_batch_end(loss, None, 0)
        upload = Upload(k, len(client.y_train), m.upload())
        assert algo.upload_problem(upload, g) is None, (cfg.method, setup.architectures[k])
        uploads.append(upload)
    g = algo.aggregate(g, uploads)
    for k in range(len(setup.clients)):
        m = algo.make_client(setup.architectures[k])
        m.data = setup.clients[k]
        m.receive(algo.download(g, k))
        m.eval()
        with torch.no_grad():
            assert m.predict(m.transform(setup.clients[k].x_test, train=False)).shape[1] == cfg.num_classes
    return uploads


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_runs_clients_with_heads_of_depth_1_to_4_or_refuses_them(make_cfg, method):
    over = {"method": method, "num_clients": 5, "model_zoo": "paper-cnn-htc4"}
    if method in REFUSE_MIXED_HEADS:
        with pytest.raises(ConfigError) as info:
            make_cfg(over)
        text = str(info.value)
        assert REFUSE_MIXED_HEADS[method] in text and "\n" not in text, text
        return
    uploads = _one_round_of_every_client(make_cfg(over))
    # what travels does not depend on the head: the same names and shapes as with linear heads only
    plain = _one_round_of_every_client(make_cfg({**over, "model_zoo": "paper-cnn"}))
    if method not in ("fedkd", "fedgen"):  # FedKD's SVD ranks follow the update; FedGen sends each client's head
        assert [{k: v.shape for k, v in u.tensors.items()} for u in uploads] == \
            [{k: v.shape for k, v in u.tensors.items()} for u in plain]


def test_methods_that_exchange_a_head_run_when_every_client_has_the_same_deep_head(make_cfg):
    over = {"num_clients": 3, "model_zoo": ["cnn1+h32", "cnn3+h32", "cnn5+h32"]}
    uploads = _one_round_of_every_client(make_cfg({**over, "method": "lg_fedavg"}))
    assert sorted(uploads[0].tensors) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    cfg = make_cfg({**over, "method": "fedgh"})
    from pfl.build import build

    head = build(cfg).algorithm.common_head()
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [32, cfg.num_classes]
    _one_round_of_every_client(cfg)
    with pytest.raises(ConfigError, match="rows of a single linear head"):
        make_cfg({**over, "method": "fedssa"})


def test_lg_fedavg_averages_deep_heads_by_sample_weights(make_cfg):
    cfg = make_cfg({"method": "lg_fedavg", "num_clients": 2, "model_zoo": ["cnn1+h8", "cnn2+h8"]})
    from pfl.build import build

    algo = build(cfg).algorithm
    g = algo.initial_global()
    a = {k: torch.full_like(v, 1.0) for k, v in g.items()}
    b = {k: torch.full_like(v, 4.0) for k, v in g.items()}
    mean = algo.aggregate(g, [Upload(0, 3, a), Upload(1, 1, b)])
    for name in g:
        assert torch.allclose(mean[name], torch.full_like(g[name], (3 * 1.0 + 1 * 4.0) / 4)), name
