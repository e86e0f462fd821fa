"""Data sets as in-memory uint8 tensors (N, C, H, W) + int64 labels, official train and test splits pooled.

The federated protocol re-splits data per client (8:2 from each client's own label distribution), so the
official split only matters as a source of samples: both halves are pooled.

- Fashion-MNIST: read by torchvision's FashionMNIST from `<data_dir>/FashionMNIST/raw`; when Debian's
  `dataset-fashion-mnist` is installed its .gz files are unpacked there first, else torchvision downloads.
- CIFAR-10/100: the official "python version" archives. Their batches are pickles, so they are read with a
  restricted unpickler that only admits numpy arrays, lists, dicts and strings: a doctored data directory
  cannot execute code. Downloads go through torchvision's checksummed downloader.
- synthetic: seeded, learnable, any shape; for fast tests.
- text data sets (bbc-news, agnews, synthetic_text): int64 token ids (N, max_len) instead of images; their
  tokeniser and loaders are pfl.data.text's.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from pfl.errors import DataError
from pfl.files import atomic_file

DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

CIFAR = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        label_key=b"labels", classes=10),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python", train=["train"], test=["test"],
        label_key=b"fine_labels", classes=100),
}

NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fmnist": ((0.2860,), (0.3530,)),
}


@dataclass
class Dataset:
    """Pooled samples: x uint8 (N, C, H, W), or int64 token ids (N, max_len) for text, and y int64 (N,), with
    what the transform needs (a text data set: no mean and std, its vocabulary size)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    vocab_size: int = 0  # text: token ids are in 0..vocab_size-1 (0 = padding); 0 for images

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W), or (max_len,) for text."""
        return tuple(self.x.shape[1:])


def default_data_dir() -> Path:
    return Path(os.environ.get("PFL_DATA_DIR", Path.home() / ".cache" / "pfl" / "data"))


def load_dataset(cfg) -> Dataset:
    """The data set named by the recipe (`dataset`, `data_dir`, `download`, `synthetic.*`; text: `max_len`,
    `vocab_size`, `text_bigrams`)."""
    if cfg.is_text:
        from pfl.data.text import load_text_dataset

        return load_text_dataset(cfg, Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir())
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg["synthetic.num_samples"], cfg["synthetic.num_classes"],
                              tuple(cfg["synthetic.image_shape"]), cfg["synthetic.noise"], cfg.seed)
    data_dir = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir()
    if cfg.dataset == "fmnist":
        return load_fmnist(data_dir, cfg.download)
    return load_cifar(cfg.dataset, data_dir, cfg.download)


# ---------------------------------------------------------------- Fashion-MNIST

def load_fmnist(data_dir: Path, download: bool) -> Dataset:
    from torchvision.datasets import FashionMNIST

    raw = data_dir / "FashionMNIST" / "raw"
    if not all((raw / f).is_file() for f in FMNIST_FILES):
        debian = [DEBIAN_FMNIST_DIR / f"{f}.gz" for f in FMNIST_FILES]
        if all(p.is_file() for p in debian):
            try:
                _unpack_gz(debian, raw)
            except OSError as exc:
                raise DataError(f"dataset 'fmnist': cannot unpack {DEBIAN_FMNIST_DIR} into {raw}: {exc}; "
                                f"set data_dir to a writable directory (--set data_dir=PATH)") from None
        elif not download or not _reachable("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"):
            raise DataError(
                f"dataset 'fmnist': Fashion-MNIST not found in {raw} nor in {DEBIAN_FMNIST_DIR}, and it "
                f"cannot be downloaded here; install Debian's package (apt-get install dataset-fashion-mnist) "
                f"or put the four IDX files ({', '.join(FMNIST_FILES)}) in {raw}")
    try:
        parts = [FashionMNIST(str(data_dir), train=t, download=download) for t in (True, False)]
    except RuntimeError as exc:
        raise DataError(f"dataset 'fmnist': could not read Fashion-MNIST from {raw}: {exc}") from None
    x = torch.cat([p.data for p in parts]).unsqueeze(1).contiguous()
    y = torch.cat([p.targets for p in parts]).long()
    mean, std = NORMALISATION["fmnist"]
    return Dataset("fmnist", x, y, 10, mean, std)


def _unpack_gz(sources: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for src in sources:
        with atomic_file(target / src.name[:-3]) as tmp, gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the URL's host be opened? Keeps an offline machine from hanging on a download."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- CIFAR

class _SafeUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's batches contain: numpy arrays and builtin containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise DataError(f"CIFAR batch {path} is not a valid CIFAR batch: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"CIFAR batch {path}: expected data of shape (n, 3072) and n labels, "
                        f"got {data.shape} and {len(labels)}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: Path, download: bool) -> Dataset:
    from torchvision.datasets.utils import download_and_extract_archive

    spec = CIFAR[name]
    folder = data_dir / spec["folder"]
    archive = data_dir / spec["archive"]
    if not folder.is_dir():
        if archive.is_file():
            _extract_tar(archive, data_dir)
        elif download and _reachable(spec["url"]):
            download_and_extract_archive(spec["url"], str(data_dir), filename=spec["archive"], md5=spec["md5"])
        else:
            raise DataError(
                f"dataset '{name}': {spec['folder']}/ not found in {data_dir} and it cannot be downloaded "
                f"here; put {spec['archive']} (or its extracted {spec['folder']}/) in {data_dir}, or set "
                f"data_dir to where it is (--set data_dir=PATH)")
    xs, ys = [], []
    for batch in spec["train"] + spec["test"]:
        path = folder / batch
        if not path.is_file():
            raise DataError(f"dataset '{name}': {path} is missing; the archive in {data_dir} is incomplete")
        x, y = _read_batch(path, spec["label_key"])
        xs.append(x)
        ys.append(y)
    y_all = torch.from_numpy(np.concatenate(ys))
    if y_all.min() < 0 or y_all.max() >= spec["classes"]:
        raise DataError(f"dataset '{name}': labels outside 0..{spec['classes'] - 1} in {folder}")
    mean, std = NORMALISATION[name]
    return Dataset(name, torch.from_numpy(np.concatenate(xs)).contiguous(), y_all, spec["classes"], mean, std)


def _extract_tar(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths, '..' and device files
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"archive {archive} could not be extracted: {exc}") from None


# ---------------------------------------------------------------- synthetic

def make_synthetic(num_samples: int, num_classes: int, image_shape: tuple[int, int, int], noise: float,
                   seed: int) -> Dataset:
    """Each class is a fixed random low-resolution pattern; a sample is its pattern plus uniform noise.

    Learnable by any CNN of the zoo in a few steps when noise < 1, and reproducible from the seed.
    """
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    c, h, w = image_shape
    coarse = torch.rand(num_classes, c, max(2, h // 4), max(2, w // 4), generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
    y = torch.arange(num_samples) % num_classes
    y = y[torch.randperm(num_samples, generator=g)]
    signal = patterns[y]
    mix = signal + noise * torch.rand(num_samples, c, h, w, generator=g)
    x = (mix / (1.0 + noise) * 255).round().clamp(0, 255).to(torch.uint8)
    return Dataset("synthetic", x, y.long(), num_classes, (0.5,) * c, (0.25,) * c)
