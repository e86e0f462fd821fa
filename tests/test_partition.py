import numpy as np
import pytest

from pfl import config
from pfl.data import make_synthetic
from pfl.data.partition import build_clients, dirichlet, iid, partition_indices, pathological

LABELS = np.repeat(np.arange(10), 300)  # 10 classes x 300 samples


def cfg(**kw):
    base = {"dataset": "synthetic", "num_clients": 10, "synthetic.num_classes": 10}
    return config.resolve({**base, **kw})


def test_pathological_gives_each_client_exactly_k_classes_and_balanced_holders():
    parts = pathological(LABELS, 10, 2, 10, np.random.default_rng(0))
    for p in parts:
        assert len(np.unique(LABELS[p])) == 2
    holders = np.zeros(10, int)
    for p in parts:
        holders[np.unique(LABELS[p])] += 1
    assert holders.tolist() == [2] * 10  # 20 slots over 10 classes: each class held twice


def test_pathological_class_shares_follow_normalised_uniform_04_06():
    parts = pathological(LABELS, 10, 2, 10, np.random.default_rng(3))
    for c in range(10):
        counts = [int((LABELS[p] == c).sum()) for p in parts if (LABELS[p] == c).any()]
        assert sum(counts) == 300  # every sample of a held class is used
        for n in counts:  # two holders: s1 / (s1 + s2) with s ~ U(0.4, 0.6) lies in [0.4, 0.6]
            assert 0.4 * 300 - 1 <= n <= 0.6 * 300 + 1


def test_partitions_are_disjoint_and_cover_the_data():
    for parts in (pathological(LABELS, 10, 2, 10, np.random.default_rng(1)),
                  dirichlet(LABELS, 10, 0.3, 10, np.random.default_rng(1)),
                  iid(len(LABELS), 10, np.random.default_rng(1))):
        allidx = np.concatenate(parts)
        assert len(allidx) == len(np.unique(allidx)) == len(LABELS)


def test_dirichlet_every_client_gets_min_samples_and_iid_is_balanced():
    parts = dirichlet(LABELS, 20, 0.1, 10, np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 10
    sizes = [len(p) for p in iid(3001, 7, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def test_train_test_split_is_disjoint_stratified_and_about_8_to_2():
    split = partition_indices(LABELS, cfg(), 10)
    for tr, va, te in split:
        assert len(va) == 0
        assert not set(tr) & set(te)
        assert set(LABELS[tr]) == set(LABELS[te])  # same label distribution
        assert abs(len(te) / (len(tr) + len(te)) - 0.2) < 0.01
    every = np.concatenate([np.concatenate(p) for p in split])
    assert len(every) == len(np.unique(every))


def test_partition_is_deterministic_by_seed():
    a = partition_indices(LABELS, cfg(seed=5), 10)
    b = partition_indices(LABELS, cfg(seed=5), 10)
    c = partition_indices(LABELS, cfg(seed=6), 10)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[2], y[2]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_validation_split_is_stratified_seeded_and_leaves_partition_and_test_split_alone():
    plain = partition_indices(LABELS, cfg(), 10)
    held = partition_indices(LABELS, cfg(val_fraction=0.25), 10)
    again = partition_indices(LABELS, cfg(val_fraction=0.25), 10)
    for (tr0, _, te0), (tr, va, te), (tr2, va2, _) in zip(plain, held, again):
        assert np.array_equal(te, te0)  # the test split is the one without validation
        assert np.array_equal(np.sort(np.concatenate([tr, va])), tr0)  # validation comes out of training data
        assert not set(tr) & set(va)
        assert set(LABELS[va]) <= set(LABELS[tr])  # stratified: every class keeps training samples
        assert abs(len(va) / len(tr0) - 0.25) < 0.02
        assert np.array_equal(va, va2) and np.array_equal(tr, tr2)


def test_build_clients_tensors_match_partition():
    data = make_synthetic(500, 5, (1, 16, 16), 0.5, seed=0)
    c = config.resolve({"dataset": "synthetic", "num_clients": 5, "synthetic.num_classes": 5,
                        "synthetic.num_samples": 500})
    clients = build_clients(data, c)
    assert sum(cl.num_train + len(cl.y_test) for cl in clients) == 500
    assert all(cl.x_train.dtype.is_floating_point is False and cl.x_train.shape[1:] == (1, 16, 16)
               for cl in clients)


def test_too_many_classes_per_client_is_a_config_error():
    with pytest.raises(config.ConfigError, match="classes_per_client"):
        cfg(classes_per_client=11)


def test_data_fraction_partitions_a_class_stratified_seeded_subset():
    labels = np.repeat(np.arange(10), [300, 200, 100, 50, 40, 30, 20, 10, 5, 1])
    whole = partition_indices(labels, cfg(partition="iid"), 10)
    assert partition_indices(labels, cfg(partition="iid", data_fraction=1.0), 10)[0][0].tolist() == \
        whole[0][0].tolist()
    subset = cfg(partition="dirichlet", dirichlet_alpha=1.0, min_client_samples=2, data_fraction=0.2)
    part = partition_indices(labels, subset, 10)
    used = np.concatenate([np.concatenate(client) for client in part])
    assert len(used) == len(np.unique(used))  # disjoint, indices into the pooled labels
    counts = np.bincount(labels[used], minlength=10)
    assert counts.tolist() == [60, 40, 20, 10, 8, 6, 4, 2, 1, 1]  # round(0.2 n_c), at least one per class
    again = partition_indices(labels, subset, 10)
    assert all(a.tolist() == b.tolist() for x, y in zip(part, again) for a, b in zip(x, y))
    with pytest.raises(config.ConfigError, match="data_fraction"):
        cfg(data_fraction=0.0)
