"""Seed derivation shared by the data modules."""

from __future__ import annotations

import numpy as np

__all__ = ["mix_seed"]


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of non-negative ints (numpy ``SeedSequence``).

    ``mix_seed(seed, worker, epoch)`` gives unrelated streams for neighbouring tuples, unlike
    ``seed + worker``, which would make worker 1 of seed 0 equal worker 0 of seed 1.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
