import pytest
import torch

from pfl.algorithms import ALGORITHMS, TaskSpec
from pfl.data import BatchTransform
from pfl.models import CNN_SPECS, LoRAAdapter, assign_architectures, build_model, count_parameters

PAPER_PARAMS = {"cnn1": 2.62e6, "cnn2": 1.82e6, "cnn3": 1.32e6, "cnn4": 1.06e6, "cnn5": 0.67e6}


@pytest.mark.parametrize("name", list(CNN_SPECS))
def test_cnn_parameter_counts_within_1_percent_of_the_paper(name):
    n = count_parameters(build_model(name, (3, 32, 32), 10))
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 16, 16)])
def test_phi_gives_500_dim_representation_and_head_gives_logits(shape):
    for name in CNN_SPECS:
        m = build_model(name, shape, 10)
        h = m.phi(torch.zeros(2, *shape))
        assert h.shape == (2, 500)
        assert m.head(h).shape == (2, 10)


def test_registry_is_open_to_other_families():
    m = build_model("resnet18", (3, 32, 32), 10)
    assert m.phi(torch.zeros(2, 3, 32, 32)).shape == (2, 500)


def test_assignment_heterogeneous_k_mod_5_and_homogeneous_all_cnn1():
    zoo = list(CNN_SPECS)
    assert assign_architectures(7, "heterogeneous", zoo) == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5", "cnn1", "cnn2"]
    assert assign_architectures(3, "homogeneous", zoo) == ["cnn1"] * 3


def test_adapter_has_lora_init_and_same_shape_for_all_five_cnns(make_cfg):
    cfg = make_cfg({"synthetic.num_classes": 10, "synthetic.image_shape": [3, 32, 32], "num_clients": 5})
    spec = TaskSpec((3, 32, 32), 10, 500, BatchTransform((0.5,) * 3, (0.25,) * 3, False))
    algo = ALGORITHMS["pfedlora"](cfg, spec)
    shapes = {name: {k: tuple(v.shape) for k, v in algo.make_client(name).upload().items()}
              for name in CNN_SPECS}
    assert all(s == {"adapter.A": (8, 500), "adapter.B": (10, 8)} for s in shapes.values())
    a = LoRAAdapter(500, 10, rank=4, alpha=8)
    assert torch.count_nonzero(a.B) == 0 and torch.count_nonzero(a.A) > 0
    assert a(torch.randn(3, 500)).abs().max() == 0  # starts as a no-op
    with torch.no_grad():
        a.B.fill_(1.0)
    h = torch.randn(3, 500)
    assert torch.allclose(a(h), 2.0 * h @ a.A.t() @ a.B.t(), atol=1e-5)  # alpha / r = 2
