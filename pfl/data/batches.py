"""Mini-batches sliced from in-memory tensors, and transforms applied to whole batches on the device.

A torch DataLoader over a TensorDataset indexes and collates sample by sample in Python; for data that
already sits in memory as tensors that is pure overhead. TensorBatches slices the tensors instead, with a
seeded permutation per epoch, and keeps the last partial batch so that a client smaller than one batch
still trains. For models with batch normalisation, which cannot train on a batch of one, a last batch of
one sample joins the batch before it (`no_single=True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TensorBatches:
    """An iterable of (x, y) mini-batches; reshuffled at every pass when `shuffle` (seeded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 no_single: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.no_single = no_single

    def sizes(self) -> list[int]:
        """The batch sizes of one pass, in order."""
        n = len(self.y)
        sizes = [min(self.batch_size, n - start) for start in range(0, n, self.batch_size)]
        if self.no_single and len(sizes) > 1 and sizes[-1] == 1:
            sizes = sizes[:-2] + [sizes[-2] + 1]
        return sizes

    def __len__(self) -> int:
        return len(self.sizes())

    def __iter__(self):
        n = len(self.y)
        # drawn on the CPU (the same order wherever the data lives), used where the data is
        order = torch.randperm(n, generator=self.generator).to(self.y.device) if self.shuffle else None
        start = 0
        for size in self.sizes():
            if order is None:
                yield self.x[start:start + size], self.y[start:start + size]
            else:
                idx = order[start:start + size]
                yield self.x[idx], self.y[idx]
            start += size


class BatchTransform:
    """uint8 images -> normalised floats; when training with `augment`: random crop (zero pad 4) + h-flip.

    Runs on whatever device the batch is on, one tensor operation per step for the whole batch. Padding
    happens before normalisation, as torchvision's RandomCrop(32, padding=4) on the PIL image does.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: bool, pad: int = 4):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = x.float().div_(255.0)
        if train and self.augment:
            x = random_crop_flip(x, self.pad)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size, then a random horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # (b, h)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # (b, w)
    flip = torch.rand(b, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
