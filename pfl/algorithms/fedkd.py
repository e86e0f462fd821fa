"""FedKD (Wu et al. 2022): a shared mentee distilled mutually with the private mentor; SVD-compressed updates.

Client k holds its private model (the mentor, phi_k/head_k) and a copy of the shared mentee (CNN-5 by
default, text_bow on text, `fedkd.shared_model`). On every batch both learn from the labels and from each other, the
distillation terms scaled down when the pair is still wrong (adaptive mutual distillation):
    mentor: CE_t + [KL(p_s || p_t) + MSE(h_t, h_s)] / (CE_t + CE_s)
    mentee: CE_s + [KL(p_t || p_s) + MSE(h_s, h_t)] / (CE_t + CE_s)
with the other model's outputs and the denominator fixed (no gradient through them); h is the
d-dimensional representation, which every zoo model shares, so no projection is needed.

What travels is the mentee's *update*, compressed: every weight matrix (a convolution kernel reshaped to
out x rest) is replaced by its truncated SVD, U S (m x k) and V^T (k x n), with the smallest k whose
singular values keep at least a fraction T of the energy sum s_i^2; vectors and matrices for which the
factors would not be smaller travel as they are. T grows linearly over the rounds from `energy_start` to
`energy_end`. The server reconstructs the updates, takes their sample-weighted mean, compresses that with
the same T and applies the compressed update to the global mentee, so that server and clients hold the
same mentee bit for bit.

Downlink: a client that holds the previous global mentee (it took part in the previous round) receives
only the compressed aggregate update; any other client receives the whole global mentee (it missed
updates). Each client keeps its copy of the global mentee ("reference") in its private state, in the
run's precision (float32 unless a true half precision, bf16-true or 16-true, converts the client).
Personalised inference: the mentor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.aggregation import robust_mean
from pfl.algorithms.base import (
    Algorithm,
    ClientModule,
    Phase,
    Settings,
    Tensors,
    Upload,
    cpu_clone,
    prefixed,
    register,
    setting,
    unprefixed,
)
from pfl.algorithms.fml import check_shared_model, kl_to, known_model, shared_architecture
from pfl.errors import ConfigError
from pfl.schema import Config


@dataclass(frozen=True)
class FedKDSettings(Settings):
    energy_start: float = setting(0.95, "SVD energy kept in round 1", low=0.0, high=1.0, low_open=True)
    energy_end: float = setting(0.98, "SVD energy kept in the last round", low=0.0, high=1.0, low_open=True)
    shared_model: str = setting("auto", "architecture of the shared mentee (auto: cnn5 on images, text_bow on text)",
                                check=known_model)


def compress(delta: Tensors, energy: float) -> Tensors:
    """Truncated SVD of every matrix in `delta` keeping >= `energy` of its energy (see the module doc)."""
    out: Tensors = {}
    for name, t in delta.items():
        if t.ndim < 2:
            out[name] = t.clone()
            continue
        m = t.reshape(t.shape[0], -1).float()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        power = s.pow(2)
        kept = power.cumsum(0) / power.sum()
        k = min(int((kept < energy).sum()) + 1, len(s))  # smallest k with kept[k-1] >= energy (1 if all zero)
        if k * (m.shape[0] + m.shape[1]) >= m.numel():
            out[name] = t.clone()
            continue
        out[name + ".us"] = (u[:, :k] * s[:k]).contiguous()
        out[name + ".vh"] = vh[:k].contiguous()
    return out


def decompress(payload: Tensors, shapes: dict[str, torch.Size]) -> Tensors:
    """The inverse of `compress` (up to the discarded energy): one tensor per name in `shapes`."""
    out = {}
    for name, shape in shapes.items():
        if name in payload:
            out[name] = payload[name].clone()
        else:
            out[name] = (payload[name + ".us"] @ payload[name + ".vh"]).reshape(shape)
    return out


def energy_at(settings: FedKDSettings, round_idx: int, rounds: int) -> float:
    """T for round `round_idx` (1-based): linear from energy_start (round 1) to energy_end (last round)."""
    frac = (round_idx - 1) / max(rounds - 1, 1)
    return settings.energy_start + (settings.energy_end - settings.energy_start) * min(frac, 1.0)


class FedKDClient(ClientModule):
    def __init__(self, model, mentee, reference, cfg, transform, num_classes: int, settings: FedKDSettings):
        super().__init__(model, cfg, transform, num_classes)
        self.mentee = mentee
        self.reference = reference  # this client's copy of the global mentee (never trained)
        self.energy = settings.energy_start

    def phases(self) -> list[Phase]:
        return [Phase("distill", self.cfg.local_epochs, trains=[self.model, self.mentee], loss=self.distill_loss)]

    def distill_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_t, h_s = self.model.phi(x), self.mentee.phi(x)
        z_t, z_s = self.model.head(h_t), self.mentee.head(h_s)
        ce_t, ce_s = F.cross_entropy(z_t, y), F.cross_entropy(z_s, y)
        scale = (ce_t + ce_s).detach()
        mentor = ce_t + (kl_to(z_s, z_t) + F.mse_loss(h_t, h_s.detach())) / scale
        mentee = ce_s + (kl_to(z_t, z_s) + F.mse_loss(h_s, h_t.detach())) / scale
        return mentor + mentee

    def receive(self, payload: Tensors) -> None:
        self.energy = float(payload["energy"])
        full = unprefixed("mentee", payload)
        if full:
            self.reference.load_state_dict(full)
        else:
            reference = cpu_clone(self.reference.state_dict())
            update = decompress(unprefixed("update", payload), {k: v.shape for k, v in reference.items()})
            self.reference.load_state_dict({k: reference[k] + update[k] for k in reference})
        self.mentee.load_state_dict(self.reference.state_dict())

    def upload(self) -> Tensors:
        trained, reference = cpu_clone(self.mentee.state_dict()), cpu_clone(self.reference.state_dict())
        return prefixed("update", compress({k: trained[k] - reference[k] for k in trained}, self.energy))

    def private_modules(self) -> dict[str, nn.Module]:
        return {"reference": self.reference}


@register
class FedKD(Algorithm):
    name = "fedkd"
    AGGREGATED = "the reconstructed mentee updates, coordinate-wise (clipping: each update's own norm)"
    Settings = FedKDSettings
    SEARCH_SPACE = {"fedkd.energy_start": "0.8:0.95", "fedkd.energy_end": "0.95:0.999"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        settings = cls.Settings.from_config(cfg, cls.name)
        if settings.energy_end < settings.energy_start:
            raise ConfigError(f"recipe key 'fedkd.energy_end': must be >= fedkd.energy_start "
                              f"({settings.energy_start}), got {settings.energy_end}")
        check_shared_model(cls.name, cfg)

    @property
    def shared_model(self) -> str:
        return shared_architecture(self.settings.shared_model, self.spec.vocab_size > 0)

    def make_client(self, arch: str) -> FedKDClient:
        model, mentee = self.private_model(arch), self.private_model(self.shared_model)
        return FedKDClient(model, mentee, copy.deepcopy(mentee), self.cfg, self.spec.transform,
                           self.spec.num_classes, self.settings)

    def initial_global(self) -> Tensors:
        mentee = cpu_clone(self.private_model(self.shared_model).state_dict())
        return {**prefixed("mentee", mentee), "version": torch.tensor(0),
                "client_version": torch.full((self.cfg.num_clients,), -1),
                "energy": torch.tensor(energy_at(self.settings, 1, self.cfg.rounds))}

    def download(self, global_state: Tensors, client_id: int) -> Tensors:
        version = int(global_state["version"])
        if version > 0 and int(global_state["client_version"][client_id]) == version - 1:
            body = {k: v for k, v in global_state.items() if k.startswith("update.")}
        else:
            body = {k: v for k, v in global_state.items() if k.startswith("mentee.")}
        return {**body, "energy": global_state["energy"]}

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        mentee = unprefixed("mentee", global_state)
        shapes = {k: v.shape for k, v in mentee.items()}
        # the uploads are updates already: clipping (if any) bounds their own norm (no reference)
        updates = [Upload(u.client_id, u.num_samples,
                          {k: v.float() for k, v in decompress(unprefixed("update", u.tensors), shapes).items()})
                   for u in uploads]
        mean = robust_mean(updates, self.rule)
        version = int(global_state["version"])
        update = compress({k: mean[k] for k in mentee}, float(global_state["energy"]))
        applied = decompress(update, shapes)
        client_version = global_state["client_version"].clone()
        client_version[[u.client_id for u in uploads]] = version
        return {**prefixed("mentee", {k: mentee[k] + applied[k] for k in mentee}), **prefixed("update", update),
                "version": torch.tensor(version + 1), "client_version": client_version,
                "energy": torch.tensor(energy_at(self.settings, version + 2, self.cfg.rounds))}

    def upload_problem(self, upload: Upload, global_state: Tensors) -> str | None:
        """Every tensor is an `update.` factor, and the factors rebuild exactly the mentee's shapes."""
        problem = super().upload_problem(upload, global_state)
        if problem:
            return problem
        if any(not k.startswith("update.") for k in upload.tensors):
            return "tensor names must all start with 'update.'"
        mentee = unprefixed("mentee", global_state)
        factors = unprefixed("update", upload.tensors)
        expected = set()
        for name, ref in mentee.items():
            if name in factors:
                expected.add(name)
                if factors[name].shape != ref.shape:
                    return f"'update.{name}' has shape {list(factors[name].shape)}, expected {list(ref.shape)}"
                continue
            us, vh = factors.get(name + ".us"), factors.get(name + ".vh")
            if us is None or vh is None:
                return f"no update for '{name}'"
            expected |= {name + ".us", name + ".vh"}
            m, n = ref.shape[0], ref.numel() // ref.shape[0]
            if us.ndim != 2 or vh.ndim != 2 or us.shape[0] != m or vh.shape[1] != n or us.shape[1] != vh.shape[0]:
                return (f"factors of '{name}' have shapes {list(us.shape)} and {list(vh.shape)}, "
                        f"expected [{m}, k] and [k, {n}]")
            if not 1 <= us.shape[1] <= min(m, n):
                return f"factors of '{name}' have rank {us.shape[1]}, expected 1 to {min(m, n)}"
            if not (us.is_floating_point() and vh.is_floating_point()):
                return f"factors of '{name}' must be floats"
        if set(factors) != expected:
            return f"unexpected tensors {sorted(set(factors) - expected)[:3]}"
        return None
