"""Communication graphs ([CSGD] §2 and Fig. 2; [SPEC] §2 "Topologies").

Every static builder returns a symmetric boolean ``m x m`` adjacency without self loops; a weight rule
from :mod:`coopsgd.topology.weights` turns it into a :class:`~coopsgd.topology.mixing.MixingMatrix`.
Arguments are validated with :meth:`ConfigError.invalid` naming the field as users type it
(``workers``, ``rows``, ``p``, ``groups``, ``seed``).

Two time-varying families return mixing matrices directly:

* :func:`one_peer_exponential` -- the one-peer exponential graph: round t sends each model to the node
  ``2^t`` ahead, ``W_t = (I + P_t)/2``; the product of the ``log2(m)`` matrices is exactly ``J``.
* :func:`random_matching` -- a random matching in which matched pairs average their models.
"""

from __future__ import annotations

import numpy as np

from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.topology.mixing import MixingMatrix, check_dense_nodes, is_connected_adjacency

__all__ = [
    "complete",
    "ring",
    "torus",
    "hypercube",
    "star",
    "exponential",
    "erdos_renyi",
    "groups",
    "one_peer_exponential",
    "random_matching",
    "is_power_of_two",
]

#: How many Erdős–Rényi graphs are drawn before giving up on a connected one.
MAX_DRAWS = 1000


def is_power_of_two(m: int) -> bool:
    return m >= 1 and (m & (m - 1)) == 0


def _workers(m: int, minimum: int = 1) -> int:
    """``workers`` checked: an integer >= ``minimum`` and small enough for a dense adjacency
    (:data:`~coopsgd.topology.mixing.MAX_DENSE_NODES`)."""
    return check_dense_nodes(check_int("workers", m, minimum=minimum))


def _empty(m: int) -> np.ndarray:
    return np.zeros((m, m), dtype=bool)


def _connect(adj: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Add the undirected edges i--j (vectorised) and drop any self loops."""
    adj[i, j] = True
    adj[j, i] = True
    np.fill_diagonal(adj, False)
    return adj


def complete(m: int) -> np.ndarray:
    """Complete graph K_m (every pair connected); with any averaging rule it gives ``J``."""
    m = _workers(m)
    adj = np.ones((m, m), dtype=bool)
    np.fill_diagonal(adj, False)
    return adj


def ring(m: int) -> np.ndarray:
    """Cycle ``i ~ i +- 1 (mod m)``; ``m = 2`` is a single edge."""
    m = _workers(m, minimum=2)
    i = np.arange(m)
    return _connect(_empty(m), i, (i + 1) % m)


def _torus_shape(m: int, rows: int | None) -> tuple[int, int]:
    if rows is not None:
        r = check_int("rows", rows, minimum=2)
        if m % r != 0 or m // r < 2:
            raise ConfigError.invalid(
                "rows", r, f"must divide workers={m} with at least 2 columns (rows x cols = workers)"
            )
        return r, m // r
    # Most square factorisation r <= c with r >= 2 (it also has r >= 3 whenever one exists).
    best = 0
    r = 2
    while r * r <= m:
        if m % r == 0:
            best = r
        r += 1
    if best == 0:
        raise ConfigError.invalid(
            "workers",
            m,
            "torus needs workers = rows x cols with rows, cols >= 2 (e.g. 9 = 3x3 or 16 = 4x4); "
            "use topology 'ring' for a prime number of workers",
        )
    return best, m // best


def torus(m: int, rows: int | None = None) -> np.ndarray:
    """2-D torus (wrap-around grid) with ``rows x cols = m``; node ``a*cols + b`` sits at (a, b).

    Neighbours are ``(a +- 1 mod rows, b)`` and ``(a, b +- 1 mod cols)``; with ``rows, cols >= 3`` the
    graph is 4-regular and ``W = (I + A)/5`` has eigenvalues
    ``(1 + 2 cos(2 pi a/rows) + 2 cos(2 pi b/cols))/5``. ``rows=None`` picks the most square shape.
    """
    m = _workers(m)
    r, c = _torus_shape(m, rows)
    a, b = np.divmod(np.arange(m), c)
    adj = _empty(m)
    _connect(adj, a * c + b, ((a + 1) % r) * c + b)
    _connect(adj, a * c + b, a * c + (b + 1) % c)
    return adj


def hypercube(m: int) -> np.ndarray:
    """Hypercube of dimension ``k = log2 m``: ``i ~ i XOR 2^s`` for ``s < k``."""
    m = _workers(m)
    if not is_power_of_two(m):
        lo = 1 << (m.bit_length() - 1)
        raise ConfigError.invalid("workers", m, f"hypercube needs a power of two (e.g. {lo} or {2 * lo})")
    adj = _empty(m)
    i = np.arange(m)
    for s in range(m.bit_length() - 1):
        _connect(adj, i, i ^ (1 << s))
    return adj


def star(m: int) -> np.ndarray:
    """Star: node 0 is the hub connected to every other node."""
    m = _workers(m, minimum=2)
    leaves = np.arange(1, m)
    return _connect(_empty(m), np.zeros_like(leaves), leaves)


def exponential(m: int) -> np.ndarray:
    """Static exponential graph: ``i ~ i +- 2^k (mod m)`` for every ``2^k < m``."""
    m = _workers(m, minimum=2)
    adj = _empty(m)
    i = np.arange(m)
    step = 1
    while step < m:
        _connect(adj, i, (i + step) % m)
        step *= 2
    return adj


def erdos_renyi(m: int, p: float, seed: int) -> np.ndarray:
    """Erdős–Rényi ``G(m, p)`` redrawn (``np.random.default_rng(seed)``) until connected.

    Reproducible for a given ``(m, p, seed)``. Raises a ConfigError naming ``p`` when no connected
    graph appears in :data:`MAX_DRAWS` draws (connectivity needs p above about ``ln(m)/m``).
    """
    m = _workers(m)
    p = check_float("p", p, low=0.0, high=1.0, low_open=True)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    iu, ju = np.triu_indices(m, k=1)
    for _ in range(MAX_DRAWS):
        keep = rng.random(iu.size) < p
        adj = _connect(_empty(m), iu[keep], ju[keep])
        if is_connected_adjacency(adj):
            return adj
    threshold = np.log(m) / m
    raise ConfigError.invalid(
        "p",
        p,
        f"no connected random graph on {m} workers in {MAX_DRAWS} draws; use a larger p "
        f"(connectivity needs p well above ln(m)/m = {threshold:.3g})",
    )


def groups(m: int, n_groups: int) -> np.ndarray:
    """``n_groups`` disjoint complete groups of ``m / n_groups`` consecutive nodes (disconnected: zeta = 1)."""
    m = _workers(m)
    g = check_int("groups", n_groups, minimum=1)
    if m % g != 0:
        raise ConfigError.invalid("groups", g, f"must divide workers={m}")
    size = m // g
    block = np.arange(m) // size
    adj = block[:, None] == block[None, :]
    np.fill_diagonal(adj, False)
    return adj


def one_peer_exponential(m: int) -> list[MixingMatrix]:
    """One-peer exponential graph: ``log2(m)`` matrices ``W_t = (I + P_t)/2``, ``t = 0..log2(m)-1``.

    ``P_t`` sends node i's model to node ``(i + 2^t) mod m``; with the column convention
    (``new x_k = sum_j S[j, k] x_j``) that is ``S[i, (i + 2^t) mod m] = 1/2`` plus ``1/2`` on the
    diagonal. Each ``W_t`` is doubly stochastic (a permutation average) but not symmetric unless
    ``2^t = m/2``. Since the shifts commute, ``prod_t (I + P^{2^t})/2 = (1/m) sum_{s<m} P^s = J``
    exactly (all entries are dyadic), so one sweep of the schedule averages exactly.
    """
    m = _workers(m)
    if m < 2 or not is_power_of_two(m):
        lo = max(2, 1 << (m.bit_length() - 1))
        allowed = f"one_peer_exponential needs a power of two >= 2 (e.g. {lo} or {2 * lo})"
        raise ConfigError.invalid("workers", m, allowed)
    i = np.arange(m)
    out: list[MixingMatrix] = []
    for t in range(m.bit_length() - 1):
        w = 0.5 * np.eye(m)
        w[i, (i + (1 << t)) % m] += 0.5
        out.append(MixingMatrix(w, name=f"one_peer_exponential-{m}-t{t}"))
    return out


def random_matching(m: int, rng: np.random.Generator) -> MixingMatrix:
    """A uniformly random (perfect when m is even) matching; matched pairs average, others keep their model.

    ``S[i, i] = S[j, j] = S[i, j] = S[j, i] = 1/2`` for each matched pair -- symmetric and doubly
    stochastic (one "gossip" round with one handshake per node).
    """
    m = _workers(m)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError.invalid(
            "rng", rng, "must be a numpy.random.Generator (np.random.default_rng(seed))"
        )
    perm = rng.permutation(m)
    pairs = perm[: 2 * (m // 2)].reshape(-1, 2)
    w = np.eye(m)
    a, b = pairs[:, 0], pairs[:, 1]
    w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
    return MixingMatrix(w, name=f"random_matching-{m}")
