"""MATCHA's design step: matchings of a graph, activation probabilities, mixing weight, expected zeta.

[MATCHA] = J. Wang, A. K. Sahu, Z. Yang, G. Joshi, "MATCHA: Speeding Up Decentralized SGD via Matching
Decomposition Sampling", 2019. MATCHA gossips over a base graph G but activates only some of its links
in each round:

1. **Matching decomposition.** The edge set of G is split into M disjoint *matchings* (sets of edges no
   two of which share a node) G_1 .. G_M, with Laplacians L_1 .. L_M (``L = sum_j L_j`` is G's
   Laplacian). :func:`matching_decomposition` uses the Misra & Gries edge colouring (at most
   ``max_degree + 1`` colours, each colour class a matching), followed by a greedy pass that empties a
   colour class whenever all its edges fit into the other classes (this removes the spare colour on
   rings and most bipartite graphs).
2. **Activation probabilities.** In each round matching j is active independently with probability
   p_j. Under a communication budget C_b in (0, 1] (expected fraction of matchings active per round:
   ``mean(p) <= C_b``) MATCHA picks p to maximise the algebraic connectivity ``lambda_2(sum_j p_j L_j)``
   of the expected graph ([MATCHA] §4, a concave maximisation). :func:`activation_probabilities` solves
   it by projected super-gradient ascent on ``{0 <= p <= 1, sum p = C_b M}`` (``lambda_2`` is
   non-decreasing in every p_j, so the budget is used in full); ``C_b = 1`` gives p = 1.
3. **Mixing weight.** Round k mixes with ``W_k = I - alpha sum_j B_j L_j`` where ``B_j ~ Bernoulli(p_j)``.
   alpha minimises ``rho = ||E[W_k^T W_k] - J||_2``, the quantity [MATCHA]'s convergence analysis uses in
   place of zeta^2 of a fixed W. Since ``B_j^2 = B_j`` and ``E[B_i B_j] = p_i p_j`` for i != j,

       E[W^T W] = (I - alpha Lbar)^2 + alpha^2 sum_j p_j (1 - p_j) L_j^2,   Lbar = sum_j p_j L_j,

   (:func:`expected_gram`); ``E[W^T W] - J`` is positive semi-definite and matrix-convex in alpha, so rho
   is a convex function of alpha and :func:`best_alpha` finds its minimum by a grid and a golden-section
   search. Like the paper's, this alpha may give W negative entries (two active edges at a node with
   alpha > 1/2): W is always symmetric and doubly stochastic, not always non-negative. ``expected_zeta = sqrt(rho)`` plays the role of zeta: rho < 1 means the workers' models
   contract toward their average in expectation.

Pure numpy/scipy; nothing here draws random numbers (the schedule samples the matchings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coopsgd.errors import ConfigError, check_float

__all__ = [
    "Edge",
    "MatchaDesign",
    "graph_edges",
    "matching_decomposition",
    "matching_laplacian",
    "algebraic_connectivity",
    "activation_probabilities",
    "expected_laplacian",
    "expected_gram",
    "expected_rho",
    "best_alpha",
    "design",
]

#: An undirected edge ``(i, j)`` with ``i < j``.
Edge = tuple[int, int]
#: One activation probability per matching.
Probabilities = Sequence[float] | np.ndarray


def graph_edges(adjacency: np.ndarray) -> list[Edge]:
    """The undirected edges ``(i, j)``, ``i < j``, of a (possibly asymmetric) adjacency or mixing matrix.

    An edge exists when ``A[i, j] != 0`` or ``A[j, i] != 0``; the diagonal is ignored.
    """
    a = np.asarray(adjacency)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError.invalid("adjacency", f"array of shape {a.shape}", "must be a square matrix")
    nz = a != 0
    nz = nz | nz.T
    iu, ju = np.nonzero(np.triu(nz, k=1))
    return [(int(i), int(j)) for i, j in zip(iu, ju, strict=True)]


class _Colouring:
    """A proper edge colouring being built: ``colour[(i, j)]`` and, per node, colour -> neighbour."""

    def __init__(self, n: int) -> None:
        self.colour: dict[Edge, int] = {}
        self.at: list[dict[int, int]] = [{} for _ in range(n)]

    @staticmethod
    def key(x: int, y: int) -> Edge:
        return (x, y) if x < y else (y, x)

    def get(self, x: int, y: int) -> int | None:
        return self.colour.get(self.key(x, y))

    def uncolour(self, x: int, y: int) -> None:
        c = self.colour.pop(self.key(x, y), None)
        if c is not None:
            del self.at[x][c]
            del self.at[y][c]

    def paint(self, x: int, y: int, c: int) -> None:
        self.colour[self.key(x, y)] = c
        self.at[x][c] = y
        self.at[y][c] = x

    def chain(self, start: int, first: int, other: int) -> list[tuple[int, int, int]]:
        """The maximal path from ``start`` whose edges alternate colours ``first``, ``other``, ``first``, ..."""
        path: list[tuple[int, int, int]] = []
        x, want = start, first
        seen = {start}
        while want in self.at[x]:
            y = self.at[x][want]
            path.append((x, y, want))
            if y in seen:  # an alternating cycle closes (cannot happen from a node where one colour is free)
                break
            seen.add(y)
            x, want = y, (other if want == first else first)
        return path

    def swap(self, path: list[tuple[int, int, int]], a: int, b: int) -> None:
        """Exchange colours a and b on the edges of ``path``."""
        for x, y, _ in path:
            self.uncolour(x, y)
        for x, y, c in path:
            self.paint(x, y, b if c == a else a)


def _misra_gries(n: int, edges: Sequence[Edge]) -> _Colouring:
    """Proper edge colouring with at most ``max_degree + 1`` colours (Misra & Gries, 1992).

    For each uncoloured edge (u, v): build a maximal fan of u starting at v, take a colour c free at u and
    d free at the fan's last node, swap c and d along the d/c-alternating path from u, then rotate the
    colours along the fan prefix ending at the first node w where d is free and give (u, w) colour d.
    """
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        nbrs[u].append(v)
        nbrs[v].append(u)
    delta = max((len(x) for x in nbrs), default=0)
    palette = range(delta + 1)
    col = _Colouring(n)

    def free(x: int) -> int:
        return next(c for c in palette if c not in col.at[x])

    def is_fan(u: int, fan: list[int]) -> bool:
        if col.get(u, fan[0]) is not None:
            return False
        for i in range(1, len(fan)):
            c = col.get(u, fan[i])
            if c is None or c in col.at[fan[i - 1]]:
                return False
        return True

    for u, v in edges:
        fan = [v]
        in_fan = {v}
        grown = True
        while grown:
            grown = False
            for w in nbrs[u]:
                c = col.get(u, w)
                if w not in in_fan and c is not None and c not in col.at[fan[-1]]:
                    fan.append(w)
                    in_fan.add(w)
                    grown = True
                    break
        c, d = free(u), free(fan[-1])
        if c != d:
            col.swap(col.chain(u, d, c), c, d)
        for k, w in enumerate(fan):
            if d not in col.at[w] and is_fan(u, fan[: k + 1]):
                break
        else:  # pragma: no cover - excluded by the Misra-Gries lemma
            raise RuntimeError(f"edge colouring failed at edge {(u, v)}")
        prefix = fan[: k + 1]
        shifted = [col.get(u, prefix[i + 1]) for i in range(k)]
        for w in prefix:
            col.uncolour(u, w)
        for i in range(k):
            col.paint(u, prefix[i], shifted[i])  # type: ignore[arg-type]
        col.paint(u, prefix[k], d)
    return col


def _try_move(col: _Colouring, e: Edge, colours: list[int]) -> bool:
    """Recolour edge e with one of ``colours``, swapping one Kempe chain if needed (Konig's step)."""
    u, v = e
    fu = [c for c in colours if c not in col.at[u]]
    fv = [c for c in colours if c not in col.at[v]]
    both = [c for c in fu if c in fv]
    if both:
        col.uncolour(u, v)
        col.paint(u, v, both[0])
        return True
    for a in fu:
        for b in fv:
            # a is free at u and used at v: swap the a/b chain starting at v; unless it ends at u, a is then
            # free at both ends (the chain leaves v by its a-edge and never returns to v).
            path = col.chain(v, a, b)
            if any(u in (x, y) for x, y, _ in path):
                continue
            col.swap(path, a, b)
            col.uncolour(u, v)
            col.paint(u, v, a)
            return True
    return False


def matching_decomposition(adjacency: np.ndarray) -> list[list[Edge]]:
    """Split the edges of an undirected graph into disjoint matchings ([MATCHA] §3).

    Misra & Gries edge colouring (at most ``max_degree + 1`` matchings), then a reduction pass: colour
    classes are visited from the smallest, and each of a class's edges is moved into another class,
    swapping one alternating (Kempe) chain when no class is free at both ends; a class emptied this way
    is dropped. On bipartite graphs (even rings, tori with even sides, hypercubes) this reaches the
    minimum, ``max_degree`` matchings. Deterministic: the same graph always gives the same matchings,
    each a sorted list of edges ``(i, j)``, ``i < j``; the list is sorted by first edge.
    """
    a = np.asarray(adjacency)
    n = a.shape[0] if a.ndim == 2 else 0
    edges = graph_edges(a)
    col = _misra_gries(n, edges)
    progress = True
    while progress:
        progress = False
        classes: dict[int, list[Edge]] = {}
        for e, c in sorted(col.colour.items()):
            classes.setdefault(c, []).append(e)
        for c in sorted(classes, key=lambda c: (len(classes[c]), c)):
            others = [o for o in sorted(classes) if o != c]
            if others and all(_try_move(col, e, others) for e in list(classes[c])):
                progress = True
                break
    classes = {}
    for e, c in col.colour.items():
        classes.setdefault(c, []).append(e)
    return sorted((sorted(es) for es in classes.values()), key=lambda es: es[0])


def matching_laplacian(n: int, matching: Sequence[Edge]) -> np.ndarray:
    """Laplacian ``sum_{(i,j)} (e_i - e_j)(e_i - e_j)^T`` of one matching on n nodes (unit weights)."""
    L = np.zeros((n, n))
    for i, j in matching:
        L[i, i] += 1.0
        L[j, j] += 1.0
        L[i, j] -= 1.0
        L[j, i] -= 1.0
    return L


def _complement_basis(n: int) -> np.ndarray:
    """An orthonormal basis (n x (n-1)) of the subspace orthogonal to the all-ones vector."""
    if n <= 1:
        return np.zeros((n, 0))
    q, _ = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.eye(n)[:, : n - 1]], axis=1))
    return q[:, 1:n]


def algebraic_connectivity(laplacian: np.ndarray) -> float:
    """lambda_2: the smallest eigenvalue of a Laplacian on the subspace orthogonal to the ones vector."""
    L = np.asarray(laplacian, dtype=np.float64)
    n = L.shape[0]
    if n <= 1:
        return 0.0
    Q = _complement_basis(n)
    return float(np.linalg.eigvalsh(Q.T @ L @ Q)[0])


def _project_budget(y: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection of y onto ``{p : 0 <= p <= 1, sum p = total}`` (0 <= total <= len(y))."""
    if total >= len(y) - 1e-12:
        return np.ones_like(y)
    lo, hi = float(y.min()) - 1.0, float(y.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(y - mid, 0.0, 1.0).sum() > total:
            lo = mid
        else:
            hi = mid
    return np.clip(y - 0.5 * (lo + hi), 0.0, 1.0)


def activation_probabilities(
    laplacians: Sequence[np.ndarray], budget: float, *, iterations: int = 300
) -> np.ndarray:
    """Activation probabilities maximising ``lambda_2(sum_j p_j L_j)`` with ``mean(p) = budget`` ([MATCHA] §4).

    Projected super-gradient ascent from the uniform point ``p = budget``: the super-gradient of
    lambda_2 at p has entries ``tr(U^T L_j U) / r`` for an orthonormal basis U of the (r-fold)
    lambda_2 eigenspace (restricted to the complement of the ones vector); steps shrink as 1/sqrt(t) and
    the best point seen is returned. ``budget = 1`` returns all ones (every matching in every round).
    """
    b = check_float("budget", budget, low=0.0, high=1.0, low_open=True)
    M = len(laplacians)
    if M == 0:
        return np.zeros(0)
    if b >= 1.0:
        return np.ones(M)
    n = laplacians[0].shape[0]
    Q = _complement_basis(n)
    Lq = np.stack([Q.T @ np.asarray(L, dtype=np.float64) @ Q for L in laplacians])
    total = b * M

    def evaluate(p: np.ndarray) -> tuple[float, np.ndarray]:
        w, V = np.linalg.eigh(np.tensordot(p, Lq, axes=1))
        tol = 1e-9 * max(1.0, abs(float(w[-1])))
        U = V[:, w <= w[0] + tol]
        grad = np.einsum("ia,jik,ka->j", U, Lq, U) / U.shape[1]
        return float(w[0]), grad

    p = np.full(M, b)
    best_p, (best_val, grad) = p, evaluate(p)
    step0 = 0.5 * math.sqrt(M) * min(b, 1.0 - b)
    for t in range(iterations):
        norm = float(np.linalg.norm(grad))
        if norm == 0.0:
            break
        p = _project_budget(p + step0 / math.sqrt(t + 1.0) * grad / norm, total)
        val, grad = evaluate(p)
        if val > best_val + 1e-15:
            best_p, best_val = p, val
    return best_p


def expected_laplacian(laplacians: Sequence[np.ndarray], probabilities: Probabilities) -> np.ndarray:
    """``Lbar = sum_j p_j L_j``, the Laplacian of the expected graph."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(laplacians) == 0:
        return np.zeros((0, 0))
    return np.tensordot(p, np.stack([np.asarray(L, dtype=np.float64) for L in laplacians]), axes=1)


def expected_gram(laplacians: Sequence[np.ndarray], probabilities: Probabilities, alpha: float,
                  n: int | None = None) -> np.ndarray:
    """Closed form of ``E[W^T W]`` for ``W = I - alpha sum_j B_j L_j``, ``B_j ~ Bernoulli(p_j)`` independent.

    ``E[W^T W] = (I - alpha Lbar)^2 + alpha^2 sum_j p_j (1 - p_j) L_j^2`` (see the module docstring).
    """
    if len(laplacians) == 0:
        return np.eye(0 if n is None else n)
    p = np.asarray(probabilities, dtype=np.float64)
    Ls = np.stack([np.asarray(L, dtype=np.float64) for L in laplacians])
    size = Ls.shape[1]
    A = np.eye(size) - alpha * np.tensordot(p, Ls, axes=1)
    var = np.tensordot(p * (1.0 - p), Ls @ Ls, axes=1)
    return A @ A + alpha * alpha * var


def expected_rho(laplacians: Sequence[np.ndarray], probabilities: Probabilities, alpha: float,
                 n: int | None = None) -> float:
    """``rho = ||E[W^T W] - J||_2`` (spectral norm), MATCHA's contraction factor; ``sqrt(rho)`` is the
    expected zeta."""
    G = expected_gram(laplacians, probabilities, alpha, n)
    size = G.shape[0]
    if size <= 1:
        return 0.0
    ev = np.linalg.eigvalsh(0.5 * (G + G.T) - np.full((size, size), 1.0 / size))
    return float(np.max(np.abs(ev)))


def best_alpha(laplacians: Sequence[np.ndarray], probabilities: Probabilities) -> tuple[float, float]:
    """The mixing weight alpha minimising ``rho(alpha)`` and that minimum: ``(alpha, rho)``.

    rho is convex in alpha with ``rho(0) = ||I - J|| = 1``, so its minimum lies in ``[0, hi]`` for any hi
    with ``rho(hi) >= rho(0)``: hi starts at ``2 / lambda_max(L)`` (L the base graph's Laplacian) and
    doubles until that holds; a grid over ``[0, hi]`` brackets the minimum and a golden-section search
    (exact for convex functions, kinks included) refines it. alpha is rounded to 8 decimals: at a smooth
    minimum rho is flat (a change of 1e-8 in alpha moves rho by ~1e-16) and at a kink it moves rho by
    ~1e-8 at most, while exact values such as 1/2 (a lone active edge averages its two models) survive.
    Without matchings (no edges) alpha is 0.
    """
    if len(laplacians) == 0:
        return 0.0, 0.0

    def rho(a: float) -> float:
        return expected_rho(laplacians, probabilities, a)

    L = np.sum([np.asarray(x, dtype=np.float64) for x in laplacians], axis=0)
    top = float(np.linalg.eigvalsh(L)[-1])
    hi = 2.0 / top if top > 0 else 1.0
    r0 = rho(0.0)
    for _ in range(60):
        if rho(hi) >= r0:
            break
        hi *= 2.0
    grid = np.linspace(0.0, hi, 201)
    vals = [rho(a) for a in grid]
    i = int(np.argmin(vals))
    lo, up = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    # golden-section search: exact for a convex function, kinks (crossing eigenvalues) included
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = up - g * (up - lo), lo + g * (up - lo)
    f1, f2 = rho(x1), rho(x2)
    for _ in range(200):
        if up - lo <= 1e-15 * max(1.0, up):
            break
        if f1 <= f2:
            up, x2, f2 = x2, x1, f1
            x1 = up - g * (up - lo)
            f1 = rho(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (up - lo)
            f2 = rho(x2)
    candidates = [(float(grid[i]), float(vals[i])), (x1, f1), (x2, f2)]
    a = min(candidates, key=lambda t: t[1])[0]
    a = round(a, 8)
    return a, rho(a)


@dataclass(frozen=True)
class MatchaDesign:
    """Everything MATCHA fixes before training (see the module docstring).

    Attributes:
        n: number of nodes.
        budget: the communication budget C_b.
        matchings: the matching decomposition of the base graph (lists of edges).
        laplacians: one Laplacian per matching.
        probabilities: activation probability of each matching.
        alpha: the mixing weight.
        rho: ``||E[W^T W] - J||_2`` at ``alpha``.
        connectivity: lambda_2 of the expected Laplacian ``sum_j p_j L_j``.
        base_connectivity: lambda_2 of the base graph's Laplacian (every matching active).
    """

    n: int
    budget: float
    matchings: tuple[tuple[Edge, ...], ...]
    laplacians: tuple[np.ndarray, ...]
    probabilities: np.ndarray
    alpha: float
    rho: float
    connectivity: float
    base_connectivity: float

    @property
    def expected_zeta(self) -> float:
        """``sqrt(rho)``: the expected-zeta quantity (zeta of a fixed W has ``zeta^2 = ||W^T W - J||_2``)."""
        return math.sqrt(max(self.rho, 0.0))


def design(adjacency: np.ndarray, budget: float) -> MatchaDesign:
    """MATCHA's design for a base graph (adjacency or mixing matrix: its off-diagonal support) and budget."""
    b = check_float("budget", budget, low=0.0, high=1.0, low_open=True)
    a = np.asarray(adjacency)
    n = a.shape[0]
    matchings = matching_decomposition(a)
    laps = tuple(matching_laplacian(n, mt) for mt in matchings)
    p = activation_probabilities(laps, b)
    alpha, rho = best_alpha(laps, p)
    if not laps:
        rho = expected_rho(laps, p, alpha, n)
    conn = algebraic_connectivity(expected_laplacian(laps, p)) if laps else 0.0
    base = algebraic_connectivity(np.sum(laps, axis=0)) if laps else 0.0
    return MatchaDesign(
        n=n, budget=b, matchings=tuple(tuple(mt) for mt in matchings), laplacians=laps, probabilities=p,
        alpha=alpha, rho=rho, connectivity=conn, base_connectivity=base,
    )
