"""Federated methods, one file each, registered by name (the recipe's `method`)."""

from pfl.algorithms.base import Algorithm, ClientModule, Phase, TaskSpec, Upload
from pfl.algorithms.fedavg import FedAvg
from pfl.algorithms.fedgh import FedGH
from pfl.algorithms.fedkd import FedKD
from pfl.algorithms.fedproto import FedProto
from pfl.algorithms.fml import FML
from pfl.algorithms.lg_fedavg import LGFedAvg
from pfl.algorithms.pfedlora import PFedLoRA
from pfl.algorithms.standalone import Standalone

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (PFedLoRA, Standalone, LGFedAvg, FML, FedKD, FedProto, FedGH, FedAvg)
}
# The comparison of the paper: pFedLoRA against the six model-heterogeneous baselines.
PAPER_METHODS = ("pfedlora", "standalone", "lg_fedavg", "fml", "fedkd", "fedproto", "fedgh")

__all__ = ["ALGORITHMS", "PAPER_METHODS", "Algorithm", "ClientModule", "Phase", "TaskSpec", "Upload"]
