"""Federated methods, one file each, registered by name (the recipe's `method`)."""

from pfl.algorithms.base import Algorithm, ClientModule, Phase, TaskSpec, Upload
from pfl.algorithms.pfedlora import PFedLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (PFedLoRA,)}

__all__ = ["ALGORITHMS", "Algorithm", "ClientModule", "Phase", "TaskSpec", "Upload"]
