"""The one place where a synchronization matrix is applied to the stacked state.

[CSGD] writes the state as X in R^{d x n} (one column per node) and a round as ``X S``: column ``i`` of
``X S`` is ``sum_j x_j S[j, i]``. Engines store nodes as *rows* (state of shape (n, d)), so the same round
is ``S^T @ state``. For symmetric S the transpose does not matter; for column-stochastic matrices (LSGD's
pull, push-sum) it does, and ``tests/unit/test_mixing.py`` pins it down with a non-symmetric S.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

__all__ = ["apply_mixing"]

T = TypeVar("T")


def apply_mixing(state: T, S: np.ndarray) -> T:
    """Return the state after the round ``X <- X S`` (rows are nodes: ``S^T @ state``).

    Works for numpy arrays and torch tensors (S is converted to the tensor's dtype and device) in one
    matrix product, whatever the number of parameters.
    """
    if isinstance(state, np.ndarray):
        return np.asarray(S, dtype=state.dtype).T @ state
    import torch

    assert isinstance(state, torch.Tensor)
    St = torch.as_tensor(np.ascontiguousarray(np.asarray(S).T), dtype=state.dtype, device=state.device)
    return St @ state  # type: ignore[return-value]
