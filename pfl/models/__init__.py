"""Model zoo (phi/head split) and the LoRA adapter."""

from pfl.models.adapter import LoRAAdapter
from pfl.models.zoo import (
    CNN_SPECS,
    MODEL_REGISTRY,
    SplitModel,
    assign_architectures,
    build_model,
    count_parameters,
)

__all__ = ["CNN_SPECS", "MODEL_REGISTRY", "LoRAAdapter", "SplitModel", "assign_architectures",
           "build_model", "count_parameters"]
