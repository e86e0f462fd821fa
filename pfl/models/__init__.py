"""Model zoo (phi/head split) and the LoRA adapter."""

from pfl.models.adapter import LoRAAdapter
from pfl.models.zoo import (
    CNN_SPECS,
    MODEL_REGISTRY,
    TORCHVISION_FAMILIES,
    ZOOS,
    SplitModel,
    assign_architectures,
    build_model,
    count_parameters,
    describe_model,
)

__all__ = [
    "CNN_SPECS",
    "MODEL_REGISTRY",
    "TORCHVISION_FAMILIES",
    "ZOOS",
    "LoRAAdapter",
    "SplitModel",
    "assign_architectures",
    "build_model",
    "count_parameters",
    "describe_model",
]
