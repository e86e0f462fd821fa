"""Prototype conventions as settings (issue 21): where a client's prototypes come from (`prototypes_from` of
FedProto, FedGH, FedTGP) and how FedProto's server averages them (`fedproto.server_mean`), checked by hand."""

import copy

import pytest
import torch
from test_baselines import D, method_cfg, setup

from pfl.algorithms import Upload
from pfl.algorithms.base import ClassSums
from pfl.errors import ConfigError
from pfl.federation import FederatedRun, MemoryStore, make_runner


def _row(value: float) -> torch.Tensor:
    return torch.full((D,), float(value))


def _fedproto_uploads() -> list[Upload]:
    """Class 1 is sent by all three clients, with very different counts; class 0 by one."""
    return [Upload(0, 50, {"labels": torch.tensor([0, 1]), "protos": torch.stack([_row(1), _row(2)]),
                           "counts": torch.tensor([10, 40])}),
            Upload(1, 20, {"labels": torch.tensor([1]), "protos": torch.stack([_row(5)]),
                           "counts": torch.tensor([20])}),
            Upload(2, 1, {"labels": torch.tensor([1]), "protos": torch.stack([_row(11)]), "counts": torch.tensor([1])})]


def test_fedproto_server_mean_weighted_and_unweighted_by_hand(make_cfg):
    expected = {"weighted": (40 * 2 + 20 * 5 + 1 * 11) / 61, "unweighted": (2 + 5 + 11) / 3}
    for server_mean, class1 in expected.items():
        algo, _, _ = setup(method_cfg(make_cfg, "fedproto", **{"fedproto.server_mean": server_mean}))
        out = algo.aggregate(algo.initial_global(), _fedproto_uploads())
        assert out["labels"].tolist() == [0, 1], server_mean
        assert torch.allclose(out["protos"][0], _row(1)), server_mean  # one sender: its row either way
        assert torch.allclose(out["protos"][1], _row(class1)), server_mean


@pytest.mark.parametrize("rule,class1", [("median", 5.0), ("trimmed_mean", (2 + 5 + 11) / 3)])
def test_robust_rules_are_per_class_unweighted_under_either_server_mean(make_cfg, rule, class1):
    # trimmed_mean at 0.1 of 3 senders drops none: the plain unweighted mean
    for server_mean in ("weighted", "unweighted"):
        algo, _, _ = setup(method_cfg(make_cfg, "fedproto", aggregation=rule, **{"fedproto.server_mean": server_mean}))
        out = algo.aggregate(algo.initial_global(), _fedproto_uploads())
        assert torch.allclose(out["protos"][1], _row(class1)), (rule, server_mean)


@pytest.mark.parametrize("key,value", [("fedproto.server_mean", "median"), ("fedproto.prototypes_from", "eval"),
                                       ("fedgh.prototypes_from", "before_training"),
                                       ("fedtgp.prototypes_from", "last_epoch")])
def test_a_convention_outside_its_choices_is_refused_naming_the_key_and_the_choices(make_cfg, key, value):
    with pytest.raises(ConfigError, match=rf"'{key}': must be one of .*, got '{value}'"):
        make_cfg({"method": key.split(".")[0], key: value})


def test_class_sums_add_per_class_in_float32_or_wider():
    sums = ClassSums(3, 2)
    assert [t.shape for t in sums.means()] == [(0,), (0, 2), (0,)]  # nothing added yet
    sums.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16), torch.tensor([2, 2]))
    sums.add(torch.tensor([[5.0, 0.0]], dtype=torch.bfloat16), torch.tensor([0]))
    assert sums.sums.dtype == torch.float32
    labels, means, counts = sums.means()
    assert labels.tolist() == [0, 2] and counts.tolist() == [1, 2]
    assert torch.equal(means, torch.tensor([[5.0, 0.0], [2.0, 3.0]]))
    sums.reset()
    assert sums.means()[0].numel() == 0


def _client_round(cfg, method: str, record_steps: bool):
    """Client 0 receives the initial broadcast and trains one round (the engine's own runner, FLOP measurement
    included). With `record_steps`, phi's outputs and the labels of every training step are recorded."""
    algo, clients, _ = setup(cfg)
    data = clients[0]
    torch.manual_seed(0)
    module = algo.make_client("cnn2")
    module.data = data
    module.receive(algo.download(algo.initial_global(), 0))
    before = copy.deepcopy(module.model).eval()
    seen_h, seen_y, in_step = [], [], []
    if record_steps:
        module.model.phi.register_forward_hook(
            lambda mod, inp, out: seen_h.append(out.detach().clone()) if in_step else None)
        step = module.training_step

        def recording(batch, i):
            seen_y.append(batch[1].clone())
            in_step.append(True)
            try:
                return step(batch, i)
            finally:
                in_step.pop()

        module.training_step = recording
    make_runner(grad_clip=cfg.grad_clip).fit_phases(module, data, cfg.batch_size, seed=1, arch="cnn2")
    return module, data, before, seen_h, seen_y


def _class_means(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.unique(y)
    return labels, torch.stack([h[y == c].mean(0) for c in labels])


def _eval_pass(model, module, data) -> torch.Tensor:
    with torch.no_grad():
        return model.phi(module.transform(data.x_train, train=False))


@pytest.mark.parametrize("method", ["fedproto", "fedgh", "fedtgp"])
def test_training_pass_prototypes_are_the_class_means_of_what_the_training_steps_computed(make_cfg, method):
    cfg = method_cfg(make_cfg, method, local_epochs=2, batch_size=16, lr=0.05,
                     **{f"{method}.prototypes_from": "training_pass"})
    module, data, _, seen_h, seen_y = _client_round(cfg, method, record_steps=True)
    steps = -(-data.num_train // 16)
    assert len(seen_y) == len(seen_h) == 2 * steps  # every step of both epochs, nothing else
    assert data.num_train % 16 and len(seen_y[steps - 1]) == data.num_train % 16  # a partial batch, counted
    labels, expected = _class_means(torch.cat(seen_h), torch.cat(seen_y))
    up = module.upload()
    assert torch.equal(up["labels"], labels)
    assert torch.allclose(up["protos"], expected, atol=1e-5)
    if method == "fedproto":  # counts are the classes' training samples, not samples x epochs
        assert torch.equal(up["counts"], torch.bincount(data.y_train)[labels])
    # the trained model's eval pass gives other prototypes: the setting changes what travels
    after = _class_means(_eval_pass(module.model, module, data), data.y_train)[1]
    assert not torch.allclose(up["protos"], after, atol=1e-3)


@pytest.mark.parametrize("method", ["fedproto", "fedgh", "fedtgp"])
def test_after_training_prototypes_are_the_trained_models_eval_pass(make_cfg, method):
    cfg = method_cfg(make_cfg, method, lr=0.05)  # the default
    module, data, _, _, _ = _client_round(cfg, method, record_steps=False)
    labels, expected = _class_means(_eval_pass(module.model, module, data), data.y_train)
    up = module.upload()
    assert torch.equal(up["labels"], labels) and torch.allclose(up["protos"], expected, atol=1e-5)


def test_fedtgp_before_training_prototypes_come_from_the_round_start_model(make_cfg):
    cfg = method_cfg(make_cfg, "fedtgp", lr=0.05, **{"fedtgp.prototypes_from": "before_training"})
    module, data, before, _, _ = _client_round(cfg, "fedtgp", record_steps=False)
    trained = {k: v.clone() for k, v in module.model.state_dict().items()}
    labels, expected = _class_means(_eval_pass(before, module, data), data.y_train)
    up = module.upload()
    assert torch.equal(up["labels"], labels) and torch.allclose(up["protos"], expected, atol=1e-5)
    # the client keeps its trained model: the round-start one was only borrowed for the upload
    now = module.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in trained.items())
    after = _class_means(_eval_pass(module.model, module, data), data.y_train)[1]
    assert not torch.allclose(up["protos"], after, atol=1e-3)


def test_fedproto_with_htfllibs_conventions_learns(make_cfg):
    """Unweighted server mean, training-pass prototypes, nearest-prototype inference at round start, plain SGD:
    a short run end to end beats chance (4 classes) and differs from the default conventions' run."""
    accuracies = {}
    for name, over in {"htfllib": {"fedproto.server_mean": "unweighted", "fedproto.prototypes_from": "training_pass"},
                       "default": {}}.items():
        cfg = method_cfg(make_cfg, "fedproto", rounds=3, lr=0.05, momentum=0.0, weight_decay=0.0, grad_clip=0.0,
                         evaluate_at="round_start", **{"fedproto.inference": "prototype"}, **over)
        algo, clients, archs = setup(cfg)
        run = FederatedRun.local(cfg, clients, archs, algo, MemoryStore(), make_runner())
        run.initialise()
        accuracies[name] = [run.run_round()["acc_mean"] for _ in range(cfg.rounds)]
    assert accuracies["htfllib"][-1] > 0.5, accuracies
    assert accuracies["htfllib"] != accuracies["default"]
