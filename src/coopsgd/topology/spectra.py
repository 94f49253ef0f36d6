"""Spectra of the named topologies in closed form: no n x n matrix, O(n * degree) time and O(n) memory.

Every weight rule of :mod:`coopsgd.topology.weights` on these graphs is a polynomial in the graph Laplacian
``L = D - A``, so the mixing matrix's eigenvalues follow from L's:

* on a regular graph (complete, ring, torus, hypercube, exponential, groups) ``uniform``, ``metropolis`` and
  ``max_degree`` all give ``W = (I + A)/(d + 1) = I - L/(d + 1)``; on the star every edge touches the hub,
  so ``metropolis`` and ``max_degree`` give ``W = I - L/(d_max + 1) = I - L/m`` (``uniform`` is refused:
  the star is not regular);
* ``best_constant`` is ``W = I - a L`` with ``a = 2/(mu_max + mu_2)`` (largest plus second-smallest
  Laplacian eigenvalue; ``W = I`` without edges).

Laplacian spectra: the ring and the static exponential graph are circulant with a set S of offsets
(``i ~ i + s mod m``), ``mu_k = |S| - sum_{s in S} cos(2 pi k s / m)``; the torus is the Kronecker sum of
two rings (``mu_{a,b} = mu_a + mu_b``); the hypercube ``2 popcount(k)``; the complete graph 0 and m (m - 1
times); the star 0, 1 (m - 2 times) and m; g disjoint complete groups of s nodes 0 (g times) and s.
``coopsgd topology`` uses them above :data:`CLOSED_FORM_ABOVE` nodes; ``tests/unit/test_spectra.py``
checks them against the dense eigendecomposition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coopsgd.errors import ConfigError, check_int
from coopsgd.theory.spectral import zeta_from_eigenvalues
from coopsgd.topology import graphs
from coopsgd.topology.mixing import ZETA_TOL
from coopsgd.topology.weights import WEIGHT_RULES

__all__ = ["CLOSED_FORMS", "CLOSED_FORM_ABOVE", "MAX_CLOSED_FORM_NODES", "laplacian_spectrum", "mixing_eigenvalues",
           "closed_form_summary"]

#: The topologies whose spectrum is known in closed form (``random`` is not: it must be drawn).
CLOSED_FORMS: tuple[str, ...] = ("complete", "ring", "torus", "hypercube", "exponential", "star", "groups")
#: ``coopsgd topology`` summarises graphs with more nodes than this from the closed forms (without the
#: matrix); up to it, it builds the dense matrix as before (an eigendecomposition of a few seconds).
CLOSED_FORM_ABOVE = 1024
#: Most nodes of a closed-form spectrum (one float64 per node: 800 MB at 10^8).
MAX_CLOSED_FORM_NODES = 10**8


def _nodes(m: Any, minimum: int) -> int:
    n = check_int("workers", m, minimum=minimum)
    if n > MAX_CLOSED_FORM_NODES:
        raise ConfigError.invalid("workers", n, f"the spectrum holds one eigenvalue per node ({8 * n / 1e9:,.1f} GB "
                                  f"for {n} nodes); at most {MAX_CLOSED_FORM_NODES:,} nodes")
    return n


def _circulant(m: int, offsets: set[int]) -> np.ndarray:
    """Laplacian eigenvalues of the circulant graph ``i ~ i + s (mod m)``, s in ``offsets`` (symmetric)."""
    k = np.arange(m, dtype=np.int64)
    mu = np.full(m, float(len(offsets)))
    for s in sorted(offsets):
        mu -= np.cos(2.0 * np.pi * ((k * s) % m) / m)
    mu[0] = 0.0  # exactly: the constant vector
    return mu


def _ring_offsets(m: int) -> set[int]:
    return {1 % m, (m - 1) % m} - {0}


def laplacian_spectrum(topology: str, workers: int, *, rows: int | None = None,
                       groups: int = 2) -> tuple[np.ndarray, int, int]:
    """``(mu, d_min, d_max)``: the Laplacian eigenvalues of a named graph (ascending) and its smallest and
    largest degree. Arguments are checked as by the builders (:mod:`coopsgd.topology.graphs`)."""
    if topology not in CLOSED_FORMS:
        raise ConfigError.invalid("topology", topology, f"no closed form; one of {', '.join(CLOSED_FORMS)}")
    if topology == "complete":
        m = _nodes(workers, 1)
        mu = np.full(m, float(m))
        mu[0] = 0.0
        return mu, m - 1, m - 1
    if topology == "ring":
        m = _nodes(workers, 2)
        ring = _ring_offsets(m)
        return np.sort(_circulant(m, ring)), len(ring), len(ring)
    if topology == "exponential":
        m = _nodes(workers, 2)
        offsets: set[int] = set()
        step = 1
        while step < m:
            offsets |= {step % m, (m - step) % m}
            step *= 2
        offsets -= {0}
        return np.sort(_circulant(m, offsets)), len(offsets), len(offsets)
    if topology == "torus":
        m = _nodes(workers, 1)
        r, c = graphs._torus_shape(m, rows)
        sr, sc = _ring_offsets(r), _ring_offsets(c)
        mu = (_circulant(r, sr)[:, None] + _circulant(c, sc)[None, :]).ravel()
        return np.sort(mu), len(sr) + len(sc), len(sr) + len(sc)
    if topology == "hypercube":
        m = _nodes(workers, 1)
        if not graphs.is_power_of_two(m):
            lo = 1 << (m.bit_length() - 1)
            raise ConfigError.invalid("workers", m, f"hypercube needs a power of two (e.g. {lo} or {2 * lo})")
        k = np.arange(m, dtype=np.int64)
        bits = np.zeros(m)
        for b in range(m.bit_length() - 1):
            bits += (k >> b) & 1
        return np.sort(2.0 * bits), m.bit_length() - 1, m.bit_length() - 1
    if topology == "star":
        m = _nodes(workers, 2)
        mu = np.ones(m)
        mu[0], mu[-1] = 0.0, float(m)
        return mu, 1, m - 1
    m = _nodes(workers, 1)  # groups
    g = check_int("groups", groups, minimum=1)
    if m % g != 0:
        raise ConfigError.invalid("groups", g, f"must divide workers={m}")
    size = m // g
    mu = np.full(m, float(size))
    mu[:g] = 0.0
    return mu, size - 1, size - 1


def mixing_eigenvalues(topology: str, workers: int, weights: str = "metropolis", *, rows: int | None = None,
                       groups: int = 2) -> np.ndarray:
    """The eigenvalues of the mixing matrix ``mixing_matrix(topology, workers, weights)`` (descending, as
    :attr:`MixingMatrix.eigenvalues`), from :func:`laplacian_spectrum`."""
    if weights not in WEIGHT_RULES:
        raise ConfigError.invalid("weights", weights, f"must be one of {', '.join(WEIGHT_RULES)}")
    mu, dmin, dmax = laplacian_spectrum(topology, workers, rows=rows, groups=groups)
    if weights == "best_constant":
        if mu.size == 1 or dmax == 0:
            ev = np.ones(mu.size)
        else:
            ev = 1.0 - 2.0 / (float(mu[-1]) + float(mu[1])) * mu
    else:
        if weights == "uniform" and dmin != dmax:
            raise ConfigError.invalid("weights", "uniform", f"uniform weights 1/(degree+1) are doubly stochastic "
                                      f"only on regular graphs, but degrees range from {dmin} to {dmax}; use "
                                      "weights='metropolis' or 'max_degree'")
        ev = 1.0 - mu / (dmax + 1.0)
    return np.sort(ev)[::-1]


def closed_form_summary(topology: str, workers: int, weights: str = "metropolis", *, rows: int | None = None,
                        groups: int = 2, shown: int = 12) -> dict[str, Any]:
    """What ``coopsgd topology`` reports of a mixing matrix, without building it: ``zeta``, ``spectral_gap``,
    the ``shown`` largest eigenvalues and the smallest, degrees, connectivity, ``theory_applies``. The
    matrix is symmetric and doubly stochastic by construction; ``"matrix"`` is ``None``."""
    ev = mixing_eigenvalues(topology, workers, weights, rows=rows, groups=groups)
    mu, dmin, dmax = laplacian_spectrum(topology, workers, rows=rows, groups=groups)
    n = int(ev.size)
    z = zeta_from_eigenvalues(ev)
    connected = n == 1 or float(mu[1]) > 1e-12 * max(1.0, float(mu[-1]))
    return {
        "name": f"{topology}-{weights}-{n}",
        "n": n,
        "matrix": None,
        "zeta": z,
        "spectral_gap": 1.0 - z,
        "eigenvalues": [float(v) for v in ev[:shown]],
        "eigenvalues_shown": f"the {min(shown, n)} largest of {n}",
        "smallest_eigenvalue": float(ev[-1]),
        "degree_min": int(dmin),
        "degree_max": int(dmax),
        "symmetric": True,
        "doubly_stochastic": True,
        "connected": bool(connected),
        "theory_applies": bool(z < 1.0 - ZETA_TOL),
        "closed_form": True,
    }
