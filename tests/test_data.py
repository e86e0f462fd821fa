import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cifar10_archive

from pfl.data.datasets import DEBIAN_FMNIST_DIR, load_cifar, load_fmnist
from pfl.errors import DataError


def test_cifar10_archive_in_the_real_format_loads_through_the_cifar_code_path(tmp_path):
    x, y = make_cifar10_archive(tmp_path)
    ds = load_cifar("cifar10", tmp_path, download=False)
    assert ds.x.shape == (120, 3, 32, 32) and ds.x.dtype == torch.uint8
    assert np.array_equal(ds.x.numpy(), x) and np.array_equal(ds.y.numpy(), y)
    assert ds.num_classes == 10 and len(ds.mean) == 3
    again = load_cifar("cifar10", tmp_path, download=False)  # now from the extracted folder
    assert torch.equal(again.x, ds.x)


def test_cifar_batch_with_code_in_its_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path("/tmp/pfl-pwned").touch, ())

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar("cifar10", tmp_path, download=False)
    assert not Path("/tmp/pfl-pwned").exists()


def test_missing_cifar_names_the_directory_and_how_to_provide_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar("cifar100", tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing") in str(err.value) and "cifar-100-python.tar.gz" in str(err.value)


@pytest.mark.skipif(not DEBIAN_FMNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_from_debians_package_through_torchvision(tmp_path):
    ds = load_fmnist(tmp_path, download=False)
    assert ds.x.shape == (70000, 1, 28, 28) and ds.y.shape == (70000,)
    assert torch.bincount(ds.y).tolist() == [7000] * 10
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
