"""Model zoo (phi/head split) and the LoRA adapter."""

from pfl.models.adapter import LoRAAdapter
from pfl.models.text import TEXT_FAMILIES, TEXT_ZOOS, is_text_model  # registers the text families and zoos
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
    head_label,
    head_problem,
    model_problem,
    split_architecture,
)

__all__ = [
    "CNN_SPECS",
    "MODEL_REGISTRY",
    "TEXT_FAMILIES",
    "TEXT_ZOOS",
    "TORCHVISION_FAMILIES",
    "ZOOS",
    "LoRAAdapter",
    "SplitModel",
    "assign_architectures",
    "build_model",
    "count_parameters",
    "describe_model",
    "head_label",
    "head_problem",
    "is_text_model",
    "model_problem",
    "split_architecture",
]
