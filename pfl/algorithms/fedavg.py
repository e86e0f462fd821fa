"""FedAvg (McMahan et al. 2017), for the model-homogeneous setting only: the whole model travels.

Each round the client loads the global model, trains it on CE, and sends it back; the server takes the
sample-weighted mean. FedAvg has no personal model: evaluation tests the global model on each client's own
test set. A heterogeneous zoo cannot be averaged, so the recipe is refused.
"""

from __future__ import annotations

from pfl.algorithms.aggregation import robust_mean
from pfl.algorithms.base import Algorithm, LocalClient, Tensors, Upload, cpu_clone, register
from pfl.errors import ConfigError
from pfl.models import assign_architectures
from pfl.schema import Config


class FedAvgClient(LocalClient):
    def receive(self, payload: Tensors) -> None:
        self.model.load_state_dict(payload)

    def upload(self) -> Tensors:
        return cpu_clone(self.model.state_dict())

    def prepare_eval(self, download: Tensors) -> None:
        self.receive(download)


@register
class FedAvg(Algorithm):
    name = "fedavg"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        archs = sorted(set(assign_architectures(cfg.num_clients, cfg.model_setting, cfg.model_zoo)))
        if len(archs) > 1:
            raise ConfigError(f"recipe key 'model_setting': method fedavg averages whole models and needs one "
                              f"architecture for all clients, got {', '.join(archs)}; use "
                              f"model_setting=\"homogeneous\" (or a model-heterogeneous method)")

    def evaluation_label(self) -> str:
        return "the global model on each client's own test set (FedAvg has no personal model)"

    def make_client(self, arch: str) -> FedAvgClient:
        return FedAvgClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes)

    def initial_global(self) -> Tensors:
        arch = assign_architectures(1, self.cfg.model_setting, self.cfg.model_zoo)[0]
        return cpu_clone(self.private_model(arch).state_dict())

    def evaluation_reads_download(self) -> bool:
        return True  # the global model is what is tested

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return robust_mean(uploads, self.rule, reference=global_state)

    def upload_template(self, global_state: Tensors) -> Tensors:
        return global_state
