"""Set-up of a run from a validated recipe: the hardware check, the data, the partition, the architectures
and the method object. Everything here can fail on the user's input (PflUserError) and writes nothing."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from pfl.algorithms import ALGORITHMS, Algorithm, TaskSpec
from pfl.algorithms.base import payload_bytes
from pfl.data import BatchTransform, build_clients, load_dataset
from pfl.data.partition import ClientData
from pfl.data.text import TokenTransform
from pfl.errors import PflUserError
from pfl.federation import make_runner
from pfl.models import assign_architectures, build_model
from pfl.schema import Config


@dataclass
class Hardware:
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    threads: int = 0  # torch intra-op threads of this process; 0 = torch's default (all cores)
    resident: str = "auto"  # client data and private states on the device: auto | on | off


RESIDENT_CHOICES = ("auto", "on", "off")


@dataclass
class Setup:
    cfg: Config
    clients: list[ClientData]
    architectures: list[str]
    algorithm: Algorithm


def check_hardware(hw: Hardware, grad_clip: float = 0.0):
    """The run's ClientRunner, or a PflUserError before any data or output when the hardware cannot be had."""
    count = hw.devices if isinstance(hw.devices, int) else None
    if count is not None and count > 1:
        raise PflUserError(f"--devices: the local engine trains one client at a time on one device; use 1 "
                           f"(or one device index such as [1]), got {hw.devices}")
    if isinstance(hw.devices, list) and len(hw.devices) != 1:
        raise PflUserError(f"--devices: the local engine uses exactly one device, got {hw.devices}")
    if hw.threads < 0:
        raise PflUserError(f"--threads: must be >= 0 (0 = torch's default), got {hw.threads}")
    if hw.resident not in RESIDENT_CHOICES:
        raise PflUserError(f"--resident: must be one of {', '.join(RESIDENT_CHOICES)}, got {hw.resident!r}")
    if hw.threads:
        torch.set_num_threads(hw.threads)
    return make_runner(hw.accelerator, hw.devices, hw.precision, grad_clip)


def build(cfg: Config) -> Setup:
    """Data, partition, architectures and the method object for a validated recipe."""
    dataset = load_dataset(cfg)
    clients = build_clients(dataset, cfg)
    architectures = assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)
    transform = TokenTransform() if dataset.vocab_size else BatchTransform(dataset.mean, dataset.std,
                                                                           augment=cfg.augment)
    spec = TaskSpec(dataset.image_shape, dataset.num_classes, cfg.representation_dim, transform, dataset.vocab_size)
    _check_models_fit(architectures, spec)
    return Setup(cfg, clients, architectures, ALGORITHMS[cfg.method](cfg, spec))


def _check_models_fit(architectures: list[str], spec: TaskSpec) -> None:
    for arch in sorted(set(architectures)):
        try:
            build_model(arch, spec.image_shape, spec.num_classes, spec.representation_dim, spec.vocab_size)
        except ValueError as exc:
            raise PflUserError(f"recipe key 'model_zoo': {exc}") from None


def keeps_resident(setup: Setup, hw: Hardware, device: torch.device) -> bool:
    """Whether the local engine keeps every client's data and private state on `device` for the whole run
    (no host round trip per client): `--resident on` / `off`, or `auto` = on a GPU when data and states take
    at most half of its free memory. On the CPU both ways are the same computation."""
    if hw.resident == "off" or setup.cfg.store == "disk":
        return False
    if hw.resident == "on":
        return True
    if device.type != "cuda":
        return False
    data = sum(t.numel() * t.element_size() for c in setup.clients
               for t in (c.x_train, c.y_train, c.x_test, c.y_test, c.x_val, c.y_val))
    per_arch = {arch: payload_bytes(setup.algorithm.make_client(arch).private_state())
                for arch in set(setup.architectures)}
    free, _total = torch.cuda.mem_get_info(device)
    return data + sum(per_arch[a] for a in setup.architectures) <= free // 2


def check_engine(cfg: Config, hw: Hardware, simulated: bool) -> None:
    """Problems with the flower engine that are the user's to fix, before any data or output."""
    if cfg.engine != "flower":
        return
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise PflUserError("--engine flower: Flower is not installed; install the extra: pip install '.[flower]' "
                           "(flwr[simulation])")
    if hw.devices not in (1, "1", "auto") and not (isinstance(hw.devices, list) and len(hw.devices) == 1):
        raise PflUserError(f"--devices: the flower engine places clients on GPUs itself; share GPUs with "
                           f"--set flower.client_gpus=0.25 (four clients per GPU), got --devices {hw.devices}")
    if simulated and cfg["flower.client_gpus"] > 0 and not torch.cuda.is_available():
        raise PflUserError(f"recipe key 'flower.client_gpus': this machine has no CUDA GPU, so it must be 0, "
                           f"got {cfg['flower.client_gpus']}")
    if simulated and cfg["flower.client_gpus"] > 0 and hw.accelerator not in ("gpu", "cuda", "auto"):
        raise PflUserError("--accelerator: flower.client_gpus > 0 reserves GPUs for clients; use --accelerator gpu")
    if simulated and cfg["flower.client_gpus"] == 0 and hw.accelerator in ("gpu", "cuda"):
        raise PflUserError("--accelerator: in a Flower simulation clients get GPUs through Ray; also set "
                           "flower.client_gpus, the share of a GPU per client (e.g. 0.25), got 0")


def client_accelerator(cfg: Config) -> str:
    """Simulated clients train on a GPU exactly when Ray gives them a share of one."""
    return "gpu" if cfg["flower.client_gpus"] > 0 else "cpu"
