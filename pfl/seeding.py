"""One recipe seed -> independent, reproducible seeds for every random choice in a run."""

from __future__ import annotations

import hashlib


def derive_seed(base: int, *tags: object) -> int:
    """A 63-bit seed determined by (base, tags): e.g. derive_seed(seed, "init", client_id)."""
    digest = hashlib.sha256(repr((base,) + tags).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
