"""FLOPs are measured, not estimated: the counter must agree with the analytic count of the layers."""

import torch

from pfl import config
from pfl.algorithms import ALGORITHMS, TaskSpec
from pfl.data import BatchTransform
from pfl.federation.costs import FlopMeter, count_flops, first_reaching, step_flops
from pfl.models import build_model


def conv_flops(c_in, c_out, k, h_out, w_out):
    return 2 * c_in * c_out * k * k * h_out * w_out  # one multiply and one add per weight per output pixel


def cnn1_forward_flops(batch, channels=1, size=28, classes=10):
    s1 = size - 4                      # conv1 5x5, no padding
    s2 = s1 // 2 - 4                   # maxpool 2, conv2 5x5
    flat = 32 * (s2 // 2) ** 2         # maxpool 2
    per_sample = (conv_flops(channels, 16, 5, s1, s1) + conv_flops(16, 32, 5, s2, s2)
                  + 2 * flat * 2000 + 2 * 2000 * 500 + 2 * 500 * classes)
    return batch * per_sample, batch * conv_flops(channels, 16, 5, s1, s1)


def test_counted_flops_of_one_cnn1_forward_pass_match_the_analytic_count():
    model = build_model("cnn1", (1, 28, 28), 10)
    with count_flops() as flops:
        model(torch.zeros(3, 1, 28, 28))
    assert flops() == cnn1_forward_flops(3)[0] == 3 * 6_157_200
    model = build_model("cnn1", (3, 32, 32), 10)
    with count_flops() as flops:
        model(torch.zeros(2, 3, 32, 32))
    assert flops() == cnn1_forward_flops(2, 3, 32)[0]


def _standalone_module(make_cfg):
    cfg = make_cfg({"method": "standalone", "synthetic.image_shape": [1, 28, 28], "synthetic.num_classes": 10,
                    "classes_per_client": 2})
    spec = TaskSpec((1, 28, 28), 10, 500, BatchTransform((0.5,), (0.25,), augment=False))
    module = ALGORITHMS["standalone"](cfg, spec).make_client("cnn1")
    module.set_phase("local")
    return module


def test_a_training_step_costs_forward_plus_backward_and_leaves_no_trace(make_cfg):
    module = _standalone_module(make_cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    forward, first_conv = cnn1_forward_flops(4)
    # backward: weight gradients (= forward) everywhere, input gradients (= forward) everywhere except the
    # first convolution, whose input (the image) needs none
    assert step_flops(module, x, y) == 3 * forward - first_conv
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


def test_flop_meter_counts_full_and_partial_batches(make_cfg):
    module = _standalone_module(make_cfg)
    x, y = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), torch.arange(10) % 10
    per_sample = step_flops(module, x[:1], y[:1])
    meter = FlopMeter()
    assert meter.phase_flops(module, "cnn1", "local", 2, x, y, [4, 4, 2]) == 2 * 10 * per_sample


def test_first_reaching_reads_cumulative_costs_at_the_first_round_at_or_above_target():
    nan = float("nan")
    history = [{"round": 1, "acc_mean": 0.5, "bytes_cumulative": 10, "flops_cumulative": 100},
               {"round": 2, "acc_mean": nan, "bytes_cumulative": 20, "flops_cumulative": 200},
               {"round": 3, "acc_mean": 0.9, "bytes_cumulative": 30, "flops_cumulative": 300},
               {"round": 4, "acc_mean": 0.95, "bytes_cumulative": 40, "flops_cumulative": 400}]
    assert first_reaching(history, 0.9) == {"round": 3, "bytes": 30, "flops": 300}
    assert first_reaching(history, 0.99) is None
    assert first_reaching(history, 0.0) is None


def test_target_accuracy_is_a_validated_recipe_key():
    import pytest

    from pfl.errors import ConfigError

    with pytest.raises(ConfigError, match="target_accuracy"):
        config.load("smoke", ["target_accuracy=1.5"])
