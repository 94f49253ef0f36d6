"""Spectral quantities of mixing matrices ([CSGD] Assumption 5, eq. (13)).

All functions accept a numpy array or any object with a ``.matrix`` attribute (such as
:class:`coopsgd.topology.MixingMatrix`). They are pure numpy and import no torch.

``zeta`` is the quantity the theorems use: ``max(|lambda_2(W)|, |lambda_n(W)|)``, i.e. the largest
eigenvalue modulus once the consensus eigenvalue 1 (eigenvector 1) is removed. For a symmetric doubly
stochastic W it equals ``||W - J||_2``; ``zeta < 1`` iff the averaging converges.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_array", "eigenvalues", "zeta", "zeta_from_eigenvalues", "spectral_gap", "is_symmetric"]

_TOL = 1e-10


def as_array(W: Any) -> np.ndarray:
    """Return ``W`` (array-like or object with ``.matrix``) as a 2-D float64 array."""
    arr = np.asarray(getattr(W, "matrix", W), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"mixing matrix must be square 2-D, got shape {arr.shape}")
    return arr


def is_symmetric(W: Any, tol: float = _TOL) -> bool:
    a = as_array(W)
    return bool(np.allclose(a, a.T, atol=tol, rtol=0.0))


def eigenvalues(W: Any) -> np.ndarray:
    """Eigenvalues of W. Symmetric: real, sorted descending. Otherwise: complex, sorted by descending modulus."""
    a = as_array(W)
    if is_symmetric(a):
        return np.sort(np.linalg.eigvalsh((a + a.T) / 2.0))[::-1]
    ev = np.linalg.eigvals(a)
    order = np.lexsort((-ev.real, -np.abs(ev)))
    ev = ev[order]
    if np.all(np.abs(ev.imag) < _TOL):
        return ev.real
    return ev


def zeta(W: Any) -> float:
    """Second largest eigenvalue modulus: ``max(|lambda_2|, |lambda_n|)`` ([CSGD] Theorem 1).

    One eigenvalue closest to 1 (the consensus direction) is removed and the largest remaining modulus is
    returned. For a 1x1 matrix the result is 0.
    """
    return zeta_from_eigenvalues(eigenvalues(W))


def zeta_from_eigenvalues(ev: Any) -> float:
    """:func:`zeta` from the eigenvalues of W (e.g. a closed form, :mod:`coopsgd.topology.spectra`): the one
    closest to 1 is removed and the largest remaining modulus is returned (0 for a single eigenvalue)."""
    ev = np.asarray(ev)
    if ev.size <= 1:
        return 0.0
    k = int(np.argmin(np.abs(ev - 1.0)))
    rest = np.delete(ev, k)
    return float(np.max(np.abs(rest)))


def spectral_gap(W: Any) -> float:
    """``1 - zeta(W)``."""
    return 1.0 - zeta(W)
