"""The arithmetic of federated LoRA that pFedLoRA's aggregation variants share (docs/algorithms.md): ranks by
capacity, zero-padding and truncation of factors (HetLoRA), rank-wise means, the truncated SVD of a product
split into factors (FlexLoRA) and the capped stack of factors (FLoRA). Every function is computed on small
tensors by hand in tests/test_lora_variants.py.

A client's adapter is g(h) = s B A h with A [r, d], B [C, r] and s = alpha / r: its update to the logits is the
C x d matrix s B A ("the product").
"""

from __future__ import annotations

import torch


def capacity_ranks(params: dict[str, int], rank: int, rank_min: int) -> dict[str, int]:
    """Ranks in proportion to each architecture's parameter count: round(rank * P / max P), kept within
    [rank_min, rank] (the largest model gets `rank`)."""
    largest = max(params.values())
    return {arch: min(rank, max(rank_min, round(rank * p / largest))) for arch, p in params.items()}


def pad_rows(a: torch.Tensor, rows: int) -> torch.Tensor:
    """A [r, d] zero-padded to [rows, d]."""
    return torch.cat([a, a.new_zeros(rows - a.shape[0], *a.shape[1:])]) if a.shape[0] < rows else a


def pad_columns(b: torch.Tensor, columns: int) -> torch.Tensor:
    """B [C, r] zero-padded to [C, columns]."""
    return torch.cat([b, b.new_zeros(b.shape[0], columns - b.shape[1])], dim=1) if b.shape[1] < columns else b


def sparsity_weights(products: list[torch.Tensor]) -> list[float]:
    """HetLoRA's aggregation weights: each client's product norm ||s B A||_F over their sum (equal weights when
    every product is zero)."""
    norms = [float(torch.linalg.matrix_norm(p.double())) for p in products]
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else [1.0 / len(norms)] * len(norms)


def padded_mean(factors: list[torch.Tensor], weights: list[float], size: int, dim: int) -> torch.Tensor:
    """HetLoRA's mean: every factor zero-padded along `dim` (0: rows of A, 1: columns of B) to `size`, then
    sum_k w_k padded_k (weights summing to 1), in float64."""
    pad = pad_rows if dim == 0 else pad_columns
    return sum(w * pad(f.double(), size) for f, w in zip(factors, weights))


def rankwise_mean(factors: list[torch.Tensor], weights: list[float], size: int, dim: int) -> torch.Tensor:
    """Rank component j (row j of A, dim 0; column j of B, dim 1) averaged over the clients whose rank is above
    j, weighted by `weights` renormalised over them; components nobody holds are 0. Returns float64 with
    `size` components."""
    first = factors[0]
    shape = list(first.shape)
    shape[dim] = size
    total = torch.zeros(shape, dtype=torch.float64)
    weight = torch.zeros(size, dtype=torch.float64)
    for f, w in zip(factors, weights):
        r = f.shape[dim]
        total.narrow(dim, 0, r).add_(f.double() * w)
        weight[:r] += w
    held = weight.clamp_min(1e-300)
    return total / (held[:, None] if dim == 0 else held[None, :])


def factors_of(product: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA's per-client factors: the rank-`rank` truncated SVD U S V^T of `product` [C, d], split so that
    scaling * B A equals it: B = U sqrt(S) / sqrt(scaling) [C, r], A = sqrt(S) V^T / sqrt(scaling) [r, d]. Exact
    (B A s = product) when `rank` >= the product's rank; ranks above min(C, d) are zero-padded."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    k = min(rank, len(s))
    root = (s[:k] / scaling).sqrt()
    b = pad_columns(u[:, :k] * root, rank)
    a = pad_rows(root[:, None] * vh[:k], rank)
    return a, b


def stacked(b_parts: list[torch.Tensor], a_parts: list[torch.Tensor], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stack: B = [B_1 ... B_K] [C, sum r], A = [A_1; ...; A_K] [sum r, d], so that B A = sum_k B_k A_k
    exactly (each B_k carrying its client's weight and scaling). Above `cap` stacked components the stack is
    replaced by its truncated SVD at rank `cap` (B = U S, A = V^T): exact while `cap` >= the rank of the sum,
    which is at most min(C, d)."""
    b, a = torch.cat(b_parts, dim=1).double(), torch.cat(a_parts, dim=0).double()
    if b.shape[1] <= cap:
        return a, b
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    k = min(cap, len(s))
    return pad_rows(vh[:k], cap), pad_columns(u[:, :k] * s[:k], cap)
