"""Robust aggregation (`aggregation`, `aggregation_trim`, `clip_update_norm`): the rules against numbers worked
out by hand, `mean` against the arithmetic every method used before (bit for bit), and short runs end to end."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pfl import config
from pfl.algorithms import ALGORITHMS, TaskSpec, Upload
from pfl.algorithms.aggregation import Rule, class_means, clip_update, combine, dense_class_means, robust_mean
from pfl.algorithms.base import cpu_clone, prefixed, train_on_server, unprefixed, weighted_mean
from pfl.algorithms.fedkd import compress, decompress, energy_at
from pfl.algorithms.fedtgp import adaptive_margin, margin_loss
from pfl.data import BatchTransform
from pfl.errors import ConfigError
from pfl.run import Hardware, train
from pfl.seeding import derive_seed

MEDIAN, TRIMMED = Rule("median"), Rule("trimmed_mean", trim=0.2)
SMOKE = {"dataset": "synthetic", "partition": "pathological", "classes_per_client": 2, "num_clients": 4,
         "rounds": 2, "batch_size": 32, "synthetic.num_samples": 400, "synthetic.num_classes": 4,
         "synthetic.image_shape": [1, 16, 16]}


def algorithm(method, d=3, c=4, **extra):
    over = {**SMOKE, "method": method, "representation_dim": d, "synthetic.num_classes": c, **extra}
    if method == "fedavg":
        over["model_setting"] = "homogeneous"
    if method == "pfedlora":
        over["pfedlora.rank"] = min(2, d)
    cfg = config.resolve(over)
    spec = TaskSpec((1, 16, 16), c, d, BatchTransform((0.5,), (0.25,), False))
    return ALGORITHMS[method](cfg, spec)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ the rules, by hand

def test_median_is_coordinatewise_and_averages_the_middle_pair_for_even_counts():
    odd = t([1, 10], [3, -2], [2, 5])
    assert combine(odd, MEDIAN).tolist() == [2.0, 5.0]
    even = t([1, 0], [4, 0], [2, 1], [10, 7])  # sorted 1 2 4 10 -> (2 + 4) / 2; 0 0 1 7 -> 0.5
    assert combine(even, MEDIAN).tolist() == [3.0, 0.5]
    assert combine(t([[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]), MEDIAN).tolist() == [[5, 6], [7, 8]]


def test_trimmed_mean_drops_floor_trim_n_from_each_end():
    values = t([1, -50], [2, 0], [3, 1], [4, 2], [100, 3])
    # trim 0.2 of 5: k = 1 -> mean(2, 3, 4) = 3 and mean(0, 1, 2) = 1
    assert combine(values, TRIMMED).tolist() == [3.0, 1.0]
    # trim 0.1 of 5: k = 0 -> the plain unweighted mean: 110 / 5 = 22, -44 / 5 = -8.8
    assert combine(values, Rule("trimmed_mean", trim=0.1)).tolist() == [22.0, -8.8]
    # trim 0.4 of 5: k = 2 -> the middle value alone
    assert combine(values, Rule("trimmed_mean", trim=0.4)).tolist() == [3.0, 1.0]
    # trim 0.3 of 10: k = 3 -> mean of 4..7 = 5.5 (0.3 * 10 is 3.0000000000000004 in floating point)
    assert combine(torch.arange(1.0, 11.0).reshape(10, 1), Rule("trimmed_mean", trim=0.3)).tolist() == [5.5]
    # trim 0.29 of 100: k = 29 (0.29 * 100 is 28.999999999999996)
    assert combine(torch.arange(100.0).reshape(100, 1), Rule("trimmed_mean", trim=0.29)).tolist() == [49.5]
    skew = torch.tensor([0.0] * 29 + [1.0] * 42 + [1000.0] * 29).reshape(100, 1)
    assert combine(skew, Rule("trimmed_mean", trim=0.29)).tolist() == [1.0]  # k = 28 would keep a 1000 and a 0


def test_median_and_trimmed_mean_ignore_sample_counts_but_mean_does_not():
    ups = [Upload(0, 1, {"w": t(0.0, 0.0)}), Upload(1, 1, {"w": t(1.0, 2.0)}), Upload(2, 1000, {"w": t(9.0, 9.0)})]
    assert robust_mean(ups, MEDIAN)["w"].tolist() == [1.0, 2.0]
    assert robust_mean(ups, Rule("trimmed_mean", trim=0.34))["w"].tolist() == [1.0, 2.0]  # k = 1 of 3
    # mean: (1 * 0 + 1 * 1 + 1000 * 9) / 1002
    assert robust_mean(ups, Rule())["w"].tolist() == pytest.approx([9001 / 1002, 9002 / 1002], abs=1e-6)


def test_aggregates_keep_dtypes_and_integer_tensors():
    ups = [Upload(k, 1, {"w": t(float(k)), "n": torch.tensor([k * 10])}) for k in (1, 2, 7)]
    out = robust_mean(ups, MEDIAN)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    assert out["w"].tolist() == [2.0] and out["n"].tolist() == [20]


def test_clipping_scales_the_update_against_the_reference_over_all_tensors():
    reference = {"w": t(1.0, 1.0)}
    # update (3, 4) and, for 'b' (no reference: counts from zero), 12: norm 13; bound 6.5 halves it
    upload = {"w": t(4.0, 5.0), "b": t(12.0), "n": torch.tensor([5])}
    out = clip_update(upload, 6.5, reference)
    assert out["w"].tolist() == [2.5, 3.0] and out["b"].tolist() == [6.0] and out["n"].tolist() == [5]
    # without 'b': update (3, 4), norm 5; bound 1 -> (0.6, 0.8) from the reference
    assert clip_update({"w": t(4.0, 5.0)}, 1.0, reference)["w"].tolist() == pytest.approx([1.6, 1.8])
    # no reference: the upload itself is the update: (3, 4) -> (1.8, 2.4) at bound 3
    assert clip_update({"w": t(3.0, 4.0)}, 3.0)["w"].tolist() == pytest.approx([1.8, 2.4])
    # within the bound, or bound 0 (off): the very same tensors
    assert clip_update(upload, 13.0, reference) is upload and clip_update(upload, 0.0, reference) is upload


def test_clipping_happens_before_the_rule_and_with_the_mean_too():
    g = {"w": t(0.0, 0.0)}
    ups = [Upload(0, 1, {"w": t(3.0, 4.0)}), Upload(1, 3, {"w": t(0.0, 1.0)})]
    clip = Rule("mean", clip=2.5)  # (3, 4) -> (1.5, 2); (0, 1) stays
    assert robust_mean(ups, clip, g)["w"].tolist() == pytest.approx([1.5 / 4, (2 + 3) / 4])
    assert robust_mean(ups, Rule("median", clip=2.5), g)["w"].tolist() == pytest.approx([0.75, 1.5])


def test_per_class_rules_by_hand():
    tables = [(torch.tensor([0, 1]), t([0, 0], [5, 5]), torch.tensor([1, 2])),
              (torch.tensor([0]), t([1, 1]), torch.tensor([1])),
              (torch.tensor([0, 2]), t([10, 20], [7, 7]), torch.tensor([100, 1]))]
    values, sent = class_means(tables, 4, MEDIAN)
    assert sent.tolist() == [True, True, True, False]
    assert values.tolist() == [[1, 1], [5, 5], [7, 7], [0, 0]]  # class 0: median of 0, 1, 10 and 0, 1, 20
    values, _ = class_means(tables, 4, Rule())  # count-weighted: (0 + 1 + 1000) / 102, (0 + 1 + 2000) / 102
    assert values[0].tolist() == pytest.approx([1001 / 102, 2001 / 102])
    values, _ = class_means([(lab, rows, None) for lab, rows, _ in tables], 4, Rule())  # unweighted (FD)
    assert values[0].tolist() == pytest.approx([11 / 3, 21 / 3])
    owns = torch.tensor([[True, False], [True, True], [True, False], [False, False]])
    dense = torch.tensor([[1.0, 0.0], [2.0, 8.0], [30.0, 0.0], [99.0, 99.0]])
    assert dense_class_means(dense, owns, MEDIAN).tolist() == [2.0, 8.0]
    assert dense_class_means(dense, owns, Rule()).tolist() == [11.0, 8.0]


def test_config_keys_and_bounds():
    cfg, _ = config.load("smoke")
    assert (cfg.aggregation, cfg.aggregation_trim, cfg.clip_update_norm) == ("mean", 0.1, 0.0)
    for bad, fragment in [("aggregation=mode", "'aggregation': must be one of mean, median, trimmed_mean"),
                          ("aggregation_trim=0.5", "'aggregation_trim': must be a number >= 0 and < 0.5"),
                          ("aggregation_trim=-0.1", "'aggregation_trim'"),
                          ("clip_update_norm=-1", "'clip_update_norm': must be a number >= 0")]:
        with pytest.raises(ConfigError, match=fragment):
            config.load("smoke", [bad])


# ------------------------------------------------------------------------------------------ mean: unchanged

def old_weighted_mean(uploads):
    total = float(sum(u.num_samples for u in uploads))
    out = {}
    for name, first in uploads[0].tensors.items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for u in uploads:
            acc += u.tensors[name].to(torch.float64) * (u.num_samples / total)
        out[name] = acc.to(first.dtype)
    return out


def _noisy(state, k):
    g = torch.Generator().manual_seed(k)
    return {n: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for n, v in state.items()}


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["pfedlora", "lg_fedavg", "fml", "fedmrl", "pfedes", "pfedafm", "fedavg"])
def test_mean_is_the_old_weighted_mean_bit_for_bit(method):
    algo = algorithm(method, d=8)
    g = algo.initial_global()
    ups = [Upload(k, n, _noisy(g, k)) for k, n in enumerate((7, 31, 2, 13))]
    assert same(algo.aggregate(g, ups), old_weighted_mean(ups))
    assert same(weighted_mean(ups), old_weighted_mean(ups))
    assert not same(algorithm(method, d=8, aggregation="median").aggregate(g, ups),
                    old_weighted_mean(ups))


def _class_uploads(c, d, seed=0, counts=True):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k in range(5):
        labels = torch.randperm(c, generator=g)[:1 + k % c]
        up = {"labels": labels, "protos": torch.randn(len(labels), d, generator=g)}
        if counts:
            up["counts"] = torch.randint(1, 50, (len(labels),), generator=g)
        ups.append(Upload(k, 100, up))
    return ups


def test_fedproto_mean_is_the_old_count_weighted_mean_bit_for_bit():
    c, d = 6, 5
    algo = algorithm("fedproto", d=d, c=c)
    g = {"labels": torch.tensor([1, 5]), "protos": torch.randn(2, d)}
    ups = _class_uploads(c, d)
    sums = torch.zeros(c, d, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for u in ups:
        weights = u.tensors["counts"].double()[:, None]
        sums.index_add_(0, u.tensors["labels"], u.tensors["protos"].double() * weights)
        counts.index_add_(0, u.tensors["labels"], u.tensors["counts"].double())
    protos = torch.zeros(c, d, dtype=torch.float64)
    have = torch.zeros(c, dtype=torch.bool)
    protos[g["labels"]] = g["protos"].double()
    have[g["labels"]] = True
    sent = counts > 0
    protos[sent] = sums[sent] / counts[sent, None]
    have |= sent
    labels = torch.nonzero(have).flatten()
    assert same(algo.aggregate(g, ups), {"labels": labels, "protos": protos[labels].float()})


def test_fd_mean_is_the_old_unweighted_class_mean_bit_for_bit():
    c = 6
    algo = algorithm("fd", c=c)
    ups = [Upload(u.client_id, 9, {"labels": u.tensors["labels"], "logits": u.tensors["protos"]})
           for u in _class_uploads(c, c, seed=3, counts=False)]
    g = {"labels": torch.tensor([0, 2]), "logits": torch.randn(2, c)}
    sums = torch.zeros(c, c, dtype=torch.float64)
    senders = torch.zeros(c, dtype=torch.float64)
    for u in ups:
        sums.index_add_(0, u.tensors["labels"], u.tensors["logits"].double())
        senders.index_add_(0, u.tensors["labels"], torch.ones(len(u.tensors["labels"]), dtype=torch.float64))
    logits = torch.zeros(c, c, dtype=torch.float64)
    have = torch.zeros(c, dtype=torch.bool)
    logits[g["labels"]] = g["logits"].double()
    have[g["labels"]] = True
    sent = senders > 0
    logits[sent] = sums[sent] / senders[sent, None]
    have |= sent
    labels = torch.nonzero(have).flatten()
    assert same(algo.aggregate(g, ups), {"labels": labels, "logits": logits[labels].float()})


def test_fedssa_mean_is_the_old_owner_mean_bit_for_bit():
    c, d = 4, 3
    algo = algorithm("fedssa", d=d, c=c)
    g = algo.initial_global()
    g["client_weight"][3, 1] = torch.randn(d)
    g["client_owns"][3, 1] = True
    ups = [Upload(u.client_id % 3, 9, {"labels": u.tensors["labels"], "weight": u.tensors["protos"],
                                       "bias": torch.randn(len(u.tensors["labels"]))})
           for u in _class_uploads(c, d, seed=5, counts=False)[:3]]
    state = {k: v.clone() for k, v in g.items()}
    for u in ups:
        labels = u.tensors["labels"]
        state["client_weight"][u.client_id, labels] = u.tensors["weight"].float()
        state["client_bias"][u.client_id, labels] = u.tensors["bias"].float()
        state["client_owns"][u.client_id, labels] = True
    owners = state["client_owns"].sum(0)
    sent = owners > 0
    mask = state["client_owns"].double()
    weight_sum = (state["client_weight"].double() * mask[:, :, None]).sum(0)
    bias_sum = (state["client_bias"].double() * mask).sum(0)
    state["weight"][sent] = (weight_sum[sent] / owners[sent, None]).float()
    state["bias"][sent] = (bias_sum[sent] / owners[sent]).float()
    state["round"] = g["round"] + 1
    assert same(algo.aggregate(g, ups), state)


def test_fedtgp_mean_is_the_old_server_step_bit_for_bit():
    c, d = 4, 3
    algo = algorithm("fedtgp", d=d, c=c)
    g = algo.initial_global()
    ups = [Upload(u.client_id, 9, {"labels": u.tensors["labels"], "protos": u.tensors["protos"]})
           for u in _class_uploads(c, d, seed=7, counts=False)]
    protos = torch.cat([u.tensors["protos"] for u in ups]).float()
    labels = torch.cat([u.tensors["labels"] for u in ups])
    sums = torch.zeros(c, protos.shape[1], dtype=torch.float64).index_add_(0, labels, protos.double())
    counts = torch.bincount(labels, minlength=c)
    present = counts > 0
    margin = adaptive_margin(sums[present] / counts[present, None], algo.settings.margin_max)
    generator = algo._generator()
    generator.load_state_dict(unprefixed("generator", g))
    train_on_server(list(generator.parameters()), protos, labels, lambda p, y: margin_loss(generator, p, y, margin, c),
                    epochs=algo.settings.server_epochs, lr=algo.cfg.lr, batch_size=algo.cfg.batch_size,
                    seed=derive_seed(algo.cfg.seed, "fedtgp-server", 1))
    with torch.no_grad():
        global_protos = generator(torch.arange(c))
    old = {**cpu_clone(prefixed("generator", generator.state_dict())), "round": torch.tensor(1),
           "protos": global_protos.detach().clone(), "margin": torch.tensor(margin)}
    assert same(algo.aggregate(g, ups), old)


def test_fedkd_mean_is_the_old_mean_of_reconstructed_updates_bit_for_bit():
    algo = algorithm("fedkd", d=8)
    g = algo.initial_global()
    mentee = unprefixed("mentee", g)
    ups = [Upload(k, n, prefixed("update", compress({m: torch.randn(v.shape) * 0.1 for m, v in mentee.items()},
                                                      0.9))) for k, n in enumerate((5, 17, 3))]
    shapes = {k: v.shape for k, v in mentee.items()}
    total = float(sum(u.num_samples for u in ups))
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in mentee.items()}
    for u in ups:
        for k, v in decompress(unprefixed("update", u.tensors), shapes).items():
            mean[k] += v.double() * (u.num_samples / total)
    update = compress({k: v.float() for k, v in mean.items()}, float(g["energy"]))
    applied = decompress(update, shapes)
    client_version = g["client_version"].clone()
    client_version[[u.client_id for u in ups]] = 0
    old = {**prefixed("mentee", {k: mentee[k] + applied[k] for k in mentee}), **prefixed("update", update),
           "version": torch.tensor(1), "client_version": client_version,
           "energy": torch.tensor(energy_at(algo.settings, 2, algo.cfg.rounds))}
    assert same(algo.aggregate(g, ups), old)


# ------------------------------------------------------------------------------------------ class tables, robust

def test_fedproto_median_and_clipping_by_hand():
    algo = algorithm("fedproto", d=2, c=3, aggregation="median", clip_update_norm=5.0)
    g = {"labels": torch.tensor([0]), "protos": t([1.0, 1.0])}
    ups = [Upload(0, 10, {"labels": torch.tensor([0]), "protos": t([1.0, 2.0]), "counts": torch.tensor([10])}),
           Upload(1, 10, {"labels": torch.tensor([0]), "protos": t([2.0, 1.0]), "counts": torch.tensor([10])}),
           # class 0: update (30, 40) from the global row, norm 50 -> clipped to (3, 4): row (4, 5);
           # class 1 has no global row: its update is the row itself
           Upload(2, 10, {"labels": torch.tensor([0, 1]), "protos": t([31.0, 41.0], [0.0, 0.0]),
                          "counts": torch.tensor([5, 5])})]
    out = algo.aggregate(g, ups)
    assert out["labels"].tolist() == [0, 1]
    assert out["protos"].tolist() == [[2.0, 2.0], [0.0, 0.0]]  # medians of 1 2 4 and 2 1 5


def test_fd_trimmed_mean_by_hand():
    algo = algorithm("fd", c=2, aggregation="trimmed_mean", aggregation_trim=0.25)
    rows = [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [100.0, -100.0]]
    ups = [Upload(k, 10, {"labels": torch.tensor([0]), "logits": t(r)}) for k, r in enumerate(rows)]
    out = algo.aggregate(algo.initial_global(), ups)  # k = 1 of 4: mean(1, 2) of 0 1 2 100 and of -100 1 2 3
    assert out["labels"].tolist() == [0] and out["logits"].tolist() == [[1.5, 1.5]]


def test_fedssa_median_over_every_clients_latest_rows():
    algo = algorithm("fedssa", d=1, c=2, aggregation="median")
    g = algo.initial_global()
    ups = [Upload(k, 10, {"labels": torch.tensor([0]), "weight": t([float(w)]), "bias": t(float(b))})
           for k, (w, b) in enumerate([(1, 0), (2, 10), (50, -3)])]
    out = algo.aggregate(g, ups)
    assert out["weight"][0].tolist() == [2.0] and out["bias"][0].tolist() == 0.0
    assert torch.equal(out["weight"][1], g["weight"][1])  # nobody owns class 1: the initial row stays


def test_fedgh_clips_prototypes_and_has_no_mean_to_replace():
    base = algorithm("fedgh", d=2, c=2)
    g = base.initial_global()
    ups = [Upload(0, 10, {"labels": torch.tensor([0, 1]), "protos": t([1.0, 0.0], [0.0, 1.0])})]
    assert same(algorithm("fedgh", d=2, c=2, aggregation="median").aggregate(g, ups), base.aggregate(g, ups))
    far = [Upload(0, 10, {"labels": torch.tensor([0, 1]), "protos": t([30.0, 0.0], [0.0, 40.0])})]
    clipped = [Upload(0, 10, {"labels": torch.tensor([0, 1]), "protos": t([3.0, 0.0], [0.0, 4.0])})]
    assert same(algorithm("fedgh", d=2, c=2, clip_update_norm=5.0).aggregate(g, far), base.aggregate(g, clipped))


# ------------------------------------------------------------------------------------------ end to end

def _run(tmp_path, method, **sets):
    over = [f"method={method}", "rounds=2"] + [f"{k}={v}" for k, v in sets.items()]
    cfg, _ = config.load("smoke", over)
    out = tmp_path / "-".join([method, *map(str, sets.values())])
    summary = train(cfg, out, Hardware())
    return summary, load_file(str(out / "state" / "global.safetensors")), out


@pytest.mark.parametrize("method", ["pfedlora", "fedproto"])
def test_every_rule_runs_end_to_end_and_is_named_in_summary_json(tmp_path, method):
    _, mean_state, _ = _run(tmp_path, method)
    runs = {"median": {"aggregation": "median"},
            "trimmed": {"aggregation": "trimmed_mean", "aggregation_trim": 0.25},
            "clipped": {"clip_update_norm": 0.01}}
    for name, sets in runs.items():
        summary, state, out = _run(tmp_path, method, **sets)
        assert math.isfinite(summary["final"]["acc_mean"])
        recorded = json.loads((out / "summary.json").read_text())["aggregation"]
        assert recorded["rule"] == sets.get("aggregation", "mean")
        assert recorded["trim"] == (0.25 if name == "trimmed" else None)
        assert recorded["clip_update_norm"] == sets.get("clip_update_norm", 0.0)
        assert recorded["applies_to"] == ALGORITHMS[method].AGGREGATED
        assert not same(state, mean_state), name  # the rule changed the server's state


def test_standalone_accepts_the_keys_and_says_they_have_no_effect(tmp_path):
    summary, _, _ = _run(tmp_path, "standalone", aggregation="median", clip_update_norm=1.0)
    assert summary["aggregation"]["rule"] == "median" and "no effect" in summary["aggregation"]["applies_to"]
