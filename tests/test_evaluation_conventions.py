"""Evaluation conventions, each against accuracies computed by hand: which model, which download, which rule."""

import pytest
import torch
from test_baselines import method_cfg, setup

from pfl.algorithms import ALGORITHMS
from pfl.federation import FederatedRun, MemoryStore, make_runner


def _run_one_round(cfg):
    algo, clients, archs = setup(cfg)
    store = MemoryStore()
    run = FederatedRun.local(cfg, clients, archs, algo, store, make_runner(grad_clip=cfg.grad_clip))
    run.initialise()
    run.run_round()
    return algo, clients, archs, store, run


def _by_hand(algo, clients, archs, store, predict):
    """Accuracy of every client on its test split: `predict(module, download, x)` -> class scores, with the
    client's module freshly loaded from the store."""
    accs = []
    for k, client in enumerate(clients):
        module = algo.make_client(archs[k])
        module.load_private_state(store.get(k))
        module.data = client
        module.eval()
        with torch.no_grad():
            x = module.transform(client.x_test, train=False)
            scores = predict(module, k, x)
        accs.append(float((scores.argmax(1) == client.y_test).float().mean()))
    return accs


def test_round_start_tests_what_each_client_holds_after_receiving_the_next_download(make_cfg):
    """LG-FedAvg: after training, a client's own head; at round start, the aggregated global head."""
    for at in ("after_training", "round_start"):
        cfg = method_cfg(make_cfg, "lg_fedavg", evaluate_at=at, rounds=1)
        algo, clients, archs, store, run = _run_one_round(cfg)
        global_state = run.state.global_state

        def predict(module, k, x, at=at, algo=algo, global_state=global_state):
            if at == "round_start":
                module.receive(algo.download(global_state, k))  # the head the client would start round 2 with
            return module.model(x)

        expected = _by_hand(algo, clients, archs, store, predict)
        assert run.state.last_accuracies == expected, at
        # and the two conventions test different heads here
        assert not torch.equal(store.get(0)["head.weight"], global_state["head.weight"])


def test_fedproto_prototype_inference_is_the_nearest_global_prototype(make_cfg):
    cfg = method_cfg(make_cfg, "fedproto", **{"fedproto.inference": "prototype"}, rounds=1)
    algo, clients, archs, store, run = _run_one_round(cfg)
    g = run.state.global_state

    def nearest(module, k, x):
        h = module.model.phi(x)
        scores = torch.full((len(x), 4), float("-inf"))
        scores[:, g["labels"]] = -torch.cdist(h, g["protos"]).pow(2)
        return scores

    assert run.state.last_accuracies == _by_hand(algo, clients, archs, store, nearest)


def test_fedgh_global_head_inference_uses_the_aggregated_head(make_cfg):
    for inference in ("own", "global"):
        cfg = method_cfg(make_cfg, "fedgh", **{"fedgh.inference": inference}, rounds=1)
        algo, clients, archs, store, run = _run_one_round(cfg)
        g = run.state.global_state

        def predict(module, k, x, inference=inference, g=g):
            h = module.model.phi(x)
            return h @ g["head.weight"].T + g["head.bias"] if inference == "global" else module.model.head(h)

        assert run.state.last_accuracies == _by_hand(algo, clients, archs, store, predict), inference


# every method and every setting that changes what its evaluation reads
READS_DOWNLOAD_CASES = [(m, {}) for m in sorted(ALGORITHMS)] + [
    ("pfedlora", {"pfedlora.inference_adapter": "global"}), ("fedproto", {"fedproto.inference": "prototype"}),
    ("fedgh", {"fedgh.inference": "global"}), ("lg_fedavg", {"evaluate_at": "round_start"})]


@pytest.mark.parametrize("method, extra", READS_DOWNLOAD_CASES,
                         ids=[m + "".join(f"-{v}" for v in e.values()) for m, e in READS_DOWNLOAD_CASES])
def test_evaluation_reads_download_is_declared_truthfully(make_cfg, method, extra):
    """A method that says its evaluation does not read the server's new download (so a Flower round tests each
    client inside its training message) gets the same accuracy for every client with no download at all. The
    global model (FedAvg), global prototypes (FedTGP, FedProto's prototype rule), global head or adapter, and
    `evaluate_at = "round_start"` are read."""
    cfg = method_cfg(make_cfg, method, rounds=2, **extra)
    algo, clients, _, _, run = _run_one_round(cfg)
    worker = run.workers.worker
    fresh = {k: algo.download(run.state.global_state, k) for k in range(len(clients))}
    with_download = [worker.evaluate(k, fresh[k]) for k in range(len(clients))]
    reads = algo.evaluation_reads_download()
    assert reads == (method in ("fedavg", "fedtgp") or bool(extra))
    if not reads:
        assert [worker.evaluate(k, {}) for k in range(len(clients))] == with_download
