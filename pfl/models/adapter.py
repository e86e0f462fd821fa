"""The LoRA-style adapter of pFedLoRA: a low-rank delta on the head, g(h) = (alpha / r) * B A h.

Its shape depends only on (d, r, C), never on the client's architecture, so it can be averaged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAAdapter(nn.Module):
    """A in R^{r x d} (Kaiming-uniform, as LoRA), B in R^{C x r} (zeros): the adapter starts as a no-op."""

    def __init__(self, representation_dim: int, num_classes: int, rank: int = 8, alpha: float = 8.0):
        super().__init__()
        if not 1 <= rank <= representation_dim:
            raise ValueError(f"rank must be in [1, {representation_dim}], got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, representation_dim))
        self.B = nn.Parameter(torch.zeros(num_classes, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.A.t()) @ self.B.t() * self.scaling
