"""Every method on every model family: builds, trains one step of each phase, and sends the same payload shapes
whatever the family (FedAvg, homogeneous only, sends the whole model, so its payload is the family's)."""

import pytest
import torch

from pfl.algorithms import ALGORITHMS, TaskSpec
from pfl.data import BatchTransform
from pfl.data.partition import ClientData
from pfl.models import MODEL_REGISTRY, ZOOS

SHAPE, CLASSES = (1, 16, 16), 4
# the families every default test run covers; the heavier ones (ResNet-34..152, GoogLeNet, EfficientNet,
# MobileNetV2) run with -m heavy
LIGHT = ("cnn1", "cnn5", "resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0", "vit_mini")
HEAVY = tuple(name for name in MODEL_REGISTRY if name not in LIGHT and not name.startswith("cnn"))


def _payload_shapes(make_cfg, method: str, arch: str) -> tuple[dict, dict]:
    over = {"method": method, "model_zoo": [arch], "synthetic.image_shape": list(SHAPE)}
    if method == "fedavg":
        over["model_setting"] = "homogeneous"
    cfg = make_cfg(over)
    spec = TaskSpec(SHAPE, CLASSES, cfg.representation_dim, BatchTransform((0.5,), (0.25,), False))
    algo = ALGORITHMS[method](cfg, spec)
    torch.manual_seed(0)
    g = algo.initial_global()
    m = algo.make_client(arch)
    x = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    m.data = ClientData(0, x, y, x[:0], y[:0])
    m.start(algo.download(g, 0))
    for phase in m.phases():
        m.set_phase(phase)
        m.on_train_start()
        m.on_train_epoch_start()
        optimiser = m.configure_optimizers()
        loss = phase.loss(m.transform(x, train=True), y)
        assert torch.isfinite(loss), (method, arch, phase.name)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)  # as the engine's runner does
        assert torch.isfinite(norm), (method, arch, phase.name)
        optimiser.step()
        m.on_train_batch_end(loss, None, 0)
    m.eval()
    with torch.no_grad():
        assert m.predict(m.transform(x, train=False)).shape == (4, CLASSES)
    upload = m.upload()
    from pfl.algorithms.base import Upload

    assert algo.upload_problem(Upload(0, 4, upload), g) is None, (method, arch)
    return ({k: tuple(v.shape) for k, v in upload.items()},
            {k: tuple(v.shape) for k, v in algo.download(algo.aggregate(g, [Upload(0, 4, upload)]), 0).items()})


def _svd_factors_as_tensors(shapes: dict) -> list[str]:
    """FedKD sends a matrix raw or as SVD factors (name.us, name.vh) of a rank, both chosen by the update's
    energy: compare the tensors they stand for."""
    return sorted({name[:-3] if name.endswith((".us", ".vh")) else name for name in shapes})


def _check_method_across(make_cfg, method, families):
    shapes = {arch: _payload_shapes(make_cfg, method, arch) for arch in families}
    if method == "fedavg":  # the whole model travels: its shapes are the family's, and differ between families
        assert len({tuple(sorted(up.items())) for up, _ in shapes.values()}) == len(families)
        return
    if method == "fedkd":
        shapes = {arch: tuple(_svd_factors_as_tensors(s) for s in pair) for arch, pair in shapes.items()}
    reference = next(iter(shapes.values()))
    for arch, pair in shapes.items():
        assert pair == reference, (method, arch)


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_trains_on_the_light_families_with_one_payload_shape(make_cfg, method):
    _check_method_across(make_cfg, method, LIGHT)


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_trains_on_the_heavy_families_with_one_payload_shape(make_cfg, method):
    _check_method_across(make_cfg, method, ("cnn1", *HEAVY))


def test_named_zoos_cover_every_registered_family():
    assert set(ZOOS["paper-cnn"]) | set(ZOOS["htfe8"]) | set(ZOOS["mixed-small"]) | set(LIGHT) | set(HEAVY) == \
        set(MODEL_REGISTRY)
    assert ZOOS["htfe8"][1:] == ["googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101",
                                 "resnet152"]


@pytest.mark.parametrize("arch", LIGHT)
def test_every_light_family_starts_with_a_live_representation(arch):
    """phi ends in a ReLU: a family whose projection to d starts at zero (torchvision's ViT zero-initialises its
    classifier) would output h = 0 with zero gradient and never learn a representation."""
    from pfl.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, SHAPE, CLASSES, 64)
    model.train()
    h = model.phi(torch.rand(4, *SHAPE))
    assert (h > 0).float().mean() > 0.1, arch
    model(torch.rand(4, *SHAPE)).sum().backward()
    grads = [p.grad for p in model.phi.parameters() if p.grad is not None]
    assert grads and sum(float(g.norm()) for g in grads) > 0, arch
