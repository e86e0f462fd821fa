import torch

from pfl.data import BatchTransform, TensorBatches
from pfl.data.batches import random_crop_flip


def test_last_partial_batch_is_kept_so_tiny_clients_still_train():
    x, y = torch.zeros(5, 1, 4, 4), torch.arange(5)
    batches = list(TensorBatches(x, y, 64, shuffle=True, seed=0))
    assert len(batches) == 1 and len(batches[0][1]) == 5
    sizes = [len(b[1]) for b in TensorBatches(torch.zeros(70, 1), torch.arange(70), 32, True, 0)]
    assert sizes == [32, 32, 6]


def test_shuffle_is_seeded_and_covers_every_sample():
    y = torch.arange(100)
    a = torch.cat([b[1] for b in TensorBatches(y.view(-1, 1), y, 16, True, seed=3)])
    b = torch.cat([b[1] for b in TensorBatches(y.view(-1, 1), y, 16, True, seed=3)])
    assert torch.equal(a, b) and torch.equal(a.sort().values, y) and not torch.equal(a, y)


def test_random_crop_flip_returns_shifted_or_mirrored_windows_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(x, pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)


def test_transform_normalises_and_only_augments_in_training():
    t = BatchTransform((0.5,), (0.25,), augment=True)
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(t(x, train=False), torch.full((2, 1, 4, 4), 2.0))
    torch.manual_seed(1)
    assert (t(x, train=True) == -2.0).any()  # some zero padding shows up after normalising


def test_batch_norm_models_never_get_a_batch_of_one():
    y = torch.arange(65)
    plain = TensorBatches(y.view(-1, 1), y, 32, shuffle=True, seed=0)
    paired = TensorBatches(y.view(-1, 1), y, 32, shuffle=True, seed=0, no_single=True)
    assert plain.sizes() == [32, 32, 1] and paired.sizes() == [32, 33]
    assert [len(b[1]) for b in paired] == [32, 33] and len(paired) == 2
    assert sorted(torch.cat([b[1] for b in paired]).tolist()) == y.tolist()
    assert TensorBatches(y[:1].view(-1, 1), y[:1], 32, shuffle=False, no_single=True).sizes() == [1]
