"""Federated methods, one file each, registered by name (the recipe's `method`).

Every module of this package is imported here and registers its method with `@register`, so adding a
method is adding one file.
"""

import importlib
import pkgutil

from pfl.algorithms.base import ALGORITHMS, Algorithm, ClientModule, Phase, Settings, TaskSpec, Upload, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

# The comparison of the paper: pFedLoRA against the six model-heterogeneous baselines.
PAPER_METHODS = ("pfedlora", "standalone", "lg_fedavg", "fml", "fedkd", "fedproto", "fedgh")
# The later model-heterogeneous methods (docs/algorithms.md), four of them by pFedLoRA's authors, and two of the
# field's benchmark library (HtFLlib): FedGen and FedL2G.
LATER_METHODS = ("fd", "fedtgp", "fedmrl", "pfedes", "fedssa", "pfedafm", "fedgen", "fedl2g")

__all__ = ["ALGORITHMS", "LATER_METHODS", "PAPER_METHODS", "Algorithm", "ClientModule", "Phase", "Settings",
           "TaskSpec", "Upload", "register"]
