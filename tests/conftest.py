import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")

from pfl import config
from pfl.federation.client import quiet_lightning

quiet_lightning()

FLOWER_MARKERS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp",
                  "raylet", "gcs_server", "ray::", "ray/_private", "ray/dashboard")


def flower_processes() -> list[str]:
    """Live (non-zombie) processes of Flower or Ray on this machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] == "Z":
            continue
        if any(m in cmdline for m in FLOWER_MARKERS):
            found.append(f"{entry}: {cmdline[:120]}")
    return found


@pytest.fixture
def no_ray_left():
    """The test leaves no Ray (or Flower) process alive that was not there before it (processes of another
    session on the same machine are not the test's to judge)."""
    def started_since(before: set[str]) -> list[str]:
        # by pid: a Ray worker retitles itself per task ("ray::_QueueActor.put"), so another session's worker
        # must not look new because its command line changed
        return sorted(p for p in flower_processes() if p.partition(":")[0] not in before)

    before = {p.partition(":")[0] for p in flower_processes()}
    yield
    deadline = time.monotonic() + 15
    while started_since(before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert started_since(before) == []


SMOKE = {
    "dataset": "synthetic", "partition": "pathological", "classes_per_client": 2, "num_clients": 4,
    "participation": 1.0, "rounds": 2, "batch_size": 32, "eval_every": 1, "seed": 0,
    "synthetic.num_samples": 400, "synthetic.num_classes": 4, "synthetic.image_shape": [1, 16, 16],
}


@pytest.fixture
def make_cfg():
    """A validated synthetic config; keyword overrides use dotted keys via a dict: make_cfg({'pfedlora.rank': 4})."""

    def _make(overrides: dict | None = None):
        return config.resolve({**SMOKE, **(overrides or {})})

    return _make


def _batch(n, rng, label_key=b"labels", classes=10):
    return {b"batch_label": b"fake", label_key: rng.integers(0, classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def make_cifar10_archive(root: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cifar-10-python.tar.gz in the real format: pickled dicts (protocol 2, as the official files)."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {n: _batch(per_batch, rng) for n in names}
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch}
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, obj in list(batches.items()) + [("batches.meta", meta)]:
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    x = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[n][b"labels"] for n in names])
    return x, y
