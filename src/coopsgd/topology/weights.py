"""Weight rules: adjacency -> :class:`~coopsgd.topology.mixing.MixingMatrix`.

Each rule takes a symmetric adjacency (boolean, or any array whose non-zero off-diagonal entries are
edges) and returns a symmetric, doubly stochastic matrix, so [CSGD] Assumption 5 holds whenever the
graph is connected (and, for the non-negative rules, the diagonal is positive so zeta < 1):

* ``uniform``      -- ``W_ij = 1/(d_i + 1)`` on neighbours and itself ("average your neighbourhood");
  doubly stochastic only on regular graphs, so irregular graphs are rejected.
* ``metropolis``   -- Metropolis–Hastings ``W_ij = 1/(1 + max(d_i, d_j))``, ``W_ii = 1 - sum_j W_ij``.
* ``max_degree``   -- ``W_ij = 1/(1 + d_max)``, ``W_ii = 1 - d_i/(1 + d_max)``.
* ``best_constant`` -- Xiao & Boyd (2004) best constant edge weight: ``W = I - a L`` with ``L = D - A``
  the graph Laplacian and ``a = 2/(lambda_1(L) + lambda_{n-1}(L))`` (largest plus second-smallest
  Laplacian eigenvalue); it minimises zeta among ``I - a L`` and may have negative entries.

:data:`WEIGHT_RULES` maps the names users type to the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError, MixingMatrixError
from coopsgd.theory import spectral
from coopsgd.topology.mixing import MixingMatrix, check_square

__all__ = [
    "uniform",
    "metropolis",
    "max_degree",
    "best_constant",
    "WEIGHT_RULES",
    "WeightRule",
    "as_adjacency",
]

WeightRule = Callable[..., MixingMatrix]


def as_adjacency(adj: Any) -> np.ndarray:
    """Return ``adj`` as a symmetric boolean adjacency without self loops, or raise MixingMatrixError."""
    try:
        a = np.asarray(adj)
        a = a != 0 if a.dtype != bool else a.copy()
    except (TypeError, ValueError) as exc:
        raise MixingMatrixError(f"adjacency matrix must be a numeric 2-D array: {exc}") from None
    check_square(a, "adjacency matrix")
    a = np.array(a, dtype=bool)
    np.fill_diagonal(a, False)
    asym = a != a.T
    if asym.any():
        i, j = (int(v) for v in np.argwhere(asym)[0])
        raise MixingMatrixError(
            f"adjacency matrix must be symmetric (undirected): entry ({i}, {j}) is {bool(a[i, j])} "
            f"but ({j}, {i}) is {bool(a[j, i])}"
        )
    return a


def _fill_diagonal(off: np.ndarray) -> np.ndarray:
    """Put ``1 - (row sum of off-diagonal weights)`` on the diagonal (rows, hence columns, sum to 1)."""
    w = off.copy()
    np.fill_diagonal(w, 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def uniform(adj: Any, name: str = "custom") -> MixingMatrix:
    """``W_ij = 1/(d_i + 1)`` for ``j`` in ``N(i) + {i}``: doubly stochastic only when the graph is regular."""
    a = as_adjacency(adj)
    d = a.sum(axis=1)
    if d.min() != d.max():
        raise ConfigError.invalid(
            "weights",
            "uniform",
            f"uniform weights 1/(degree+1) are doubly stochastic only on regular graphs, but degrees range "
            f"from {int(d.min())} to {int(d.max())}; use weights='metropolis' or 'max_degree'",
        )
    w = (np.eye(a.shape[0]) + a) / (float(d[0]) + 1.0)
    return MixingMatrix(w, name=name)


def metropolis(adj: Any, name: str = "custom") -> MixingMatrix:
    """Metropolis–Hastings weights ``W_ij = 1/(1 + max(d_i, d_j))`` on edges, diagonal fills to 1."""
    a = as_adjacency(adj)
    d = a.sum(axis=1).astype(np.float64)
    off = np.where(a, 1.0 / (1.0 + np.maximum(d[:, None], d[None, :])), 0.0)
    return MixingMatrix(_fill_diagonal(off), name=name)


def max_degree(adj: Any, name: str = "custom") -> MixingMatrix:
    """Max-degree weights ``W_ij = 1/(1 + d_max)`` on edges, diagonal ``1 - d_i/(1 + d_max)``."""
    a = as_adjacency(adj)
    dmax = float(a.sum(axis=1).max())
    off = np.where(a, 1.0 / (1.0 + dmax), 0.0)
    return MixingMatrix(_fill_diagonal(off), name=name)


def best_constant(adj: Any, name: str = "custom") -> MixingMatrix:
    """Best constant edge weight ``W = I - a L``, ``a = 2/(l_1 + l_{n-1})``.

    From Xiao & Boyd (2004), "Fast linear iterations for distributed averaging", constant edge weights.

    ``l_1`` is the largest and ``l_{n-1}`` the second-smallest eigenvalue of the Laplacian ``L = D - A``.
    The eigenvalues of W are ``1 - a l_k``; this ``a`` equalises ``|1 - a l_1| = |1 - a l_{n-1}|`` and so
    minimises zeta over constant edge weights. Entries may be negative (``allow_negative=True``).
    A graph without edges gives ``W = I``.
    """
    a = as_adjacency(adj)
    n = a.shape[0]
    lap = np.diag(a.sum(axis=1).astype(np.float64)) - a.astype(np.float64)
    if n == 1 or not a.any():
        return MixingMatrix(np.eye(n), name=name)
    ev = np.asarray(spectral.eigenvalues(lap))  # symmetric: real, descending
    alpha = 2.0 / (float(ev[0]) + float(ev[-2]))
    w = np.eye(n) - alpha * lap
    # Row sums of L are exactly 0, but re-fill the diagonal so sums are 1 to round-off.
    return MixingMatrix(_fill_diagonal(w), name=name, allow_negative=True)


#: Weight rules by the name users type (``weights=...``).
WEIGHT_RULES: dict[str, WeightRule] = {
    "uniform": uniform,
    "metropolis": metropolis,
    "max_degree": max_degree,
    "best_constant": best_constant,
}
