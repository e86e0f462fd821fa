"""Cost accounting: FLOPs measured on the real computation, bytes from the tensors actually sent.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts the matrix-type operations
(convolutions, matrix products, their backward passes) that dominate these models; element-wise work
(activations, pooling, the optimiser update) and decompositions such as SVD are not counted. A client's
training FLOPs are measured by running one real training step (the phase's `loss` plus `backward`, with
the phase's parameters frozen or trainable exactly as in training) under the counter,
once per (architecture, method phase, batch size), and multiplied by the number of steps of that size.
The measured step leaves no trace: gradients are cleared and every parameter and buffer is restored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def count_flops() -> Iterator[Callable[[], int]]:
    """`with count_flops() as flops: ...; flops()` -> FLOPs counted inside the block."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield counter.get_total_flops
    # get_total_flops stays valid after the block


def step_flops(module, x: torch.Tensor, y: torch.Tensor, precision=None) -> int:
    """FLOPs of one training step (forward and backward) of `module` in its current phase on the batch (x, y).

    `module` is a ClientModule already set to the phase; x is raw (uint8) as the data loader yields it.
    `precision`: the run's Lightning precision plugin (its input conversion and forward context), if any.
    """
    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}
    was_training = module.training
    module.train()
    module.on_train_epoch_start()  # the phase's own module modes (e.g. a frozen backbone in eval mode)
    device = next(module.parameters()).device
    # train=False: the same shapes without consuming the random stream that real augmentation uses
    x = module.transform(x.to(device), train=False)
    y = y.to(device)
    if precision is not None:
        x = precision.convert_input(x)
    context = precision.forward_context() if precision is not None else contextlib.nullcontext()
    try:
        with count_flops() as flops, context:
            loss = module.phase.loss(x, y)
            if loss.requires_grad:
                loss.backward()
        return int(flops())
    finally:
        for p in module.parameters():
            p.grad = None
        module.load_state_dict(snapshot)
        module.train(was_training)


class FlopMeter:
    """Training FLOPs per client round, measured once per (architecture, phase, batch size) and reused."""

    def __init__(self, precision=None):
        self._cache: dict[tuple, int] = {}
        self.precision = precision

    def phase_flops(self, module, arch: str, phase: str, epochs: int, x: torch.Tensor, y: torch.Tensor,
                    batch_sizes: list[int]) -> int:
        """FLOPs of `epochs` epochs over (x, y) in batches of the given sizes (one pass)."""
        total = 0
        for size in sorted(set(batch_sizes)):
            count = batch_sizes.count(size)
            key = (type(module).__name__, arch, phase, size)
            if key not in self._cache:
                self._cache[key] = step_flops(module, x[:size], y[:size], self.precision)
            total += self._cache[key] * count
        return total * epochs


def first_reaching(history: list[dict], target: float) -> dict | None:
    """Round, cumulative bytes and cumulative FLOPs when the mean accuracy first reaches `target`."""
    if target <= 0:
        return None
    for row in history:
        acc = row.get("acc_mean", math.nan)
        if not math.isnan(acc) and acc >= target:
            return {"round": row["round"], "bytes": row["bytes_cumulative"], "flops": row["flops_cumulative"]}
    return None
