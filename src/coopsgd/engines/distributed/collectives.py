"""The distributed engine's lowering of a round: which collectives carry a typed round plan across ranks.

The one planner (:func:`coopsgd.engines.mixing.plan_round`) decides a round's structure for every engine.
On the distributed engine, rank ``r`` holds its worker's row and the auxiliaries it keeps, so a round is
lowered to the collectives that bring each rank what its columns of ``X S`` read. Every rank lowers the
same plan the same way, so every rank takes part in the same collectives. A lowering is computed once per
plan (:meth:`coopsgd.engines.mixing.RoundPlan.derived`: a fixed matrix's plan is found by identity).

Placement (the same for every spec, documented once here):

* worker ``i`` lives on rank ``i`` (the world size is the number of workers m);
* an auxiliary node (z of EASGD, the FedAvg / DOWNPOUR server, LSGD's leader copies, the group
  auxiliaries of hierarchical averaging) is held by the ranks whose workers read it, and updated by them
  with the same arithmetic so that the copies stay identical (:func:`aux_placement`):

  - *replicated* (EASGD, FedAvg, LSGD, DOWNPOUR, time-varying or data-dependent schedules): every worker
    reads it, so every rank holds it; rank ``j % m`` is its designated host (the one that reports it);
  - *placed* (hierarchical averaging): a group's auxiliary lives only on the ranks of that group (its
    designated host is the group's first rank). The group's rounds are all_reduces inside a process
    subgroup, never touching the other groups; a round that mixes auxiliaries of different groups is one
    reduction over the ranks that contribute to it (:class:`PlacedCollectives`).

The worker columns (:class:`Exchange`), chosen from the plan alone:

* ``LOCAL`` -- the worker block of S is diagonal (EASGD, LSGD's pull): no exchange for the worker columns;
* ``REDUCE`` -- all worker columns are one weight vector w (an ``AVERAGE`` plan: J, FedAvg): ONE
  all_reduce of ``w_r x_r`` (for a constant w, as J: the sum of the flat rows, then one scaling);
* ``NEIGHBOR`` -- a sparse worker block (ring, torus, one-peer graphs; largest in/out-degree
  <= max(2, m/2)): batched ``isend``/``irecv`` of the flat row to each out-neighbour;
* ``BROADCAST`` -- few source rows needed by many (LSGD's leader; sources * ceil(log2 m) < degree):
  one broadcast per source row;
* ``GATHER`` -- anything denser and not rank one (DOWNPOUR's push chain): all_gather of the m worker
  rows, then every rank evaluates its own columns -- correct for any matrix.

Auxiliary columns (:class:`AuxSource`): a single source is a broadcast; other weight vectors join one
all_reduce of a (K, width) tensor (K distinct vectors). Costs per round (W floats per row): reduce
``2W(m-1)/m`` sent per rank; neighbor ``W * out-degree``; broadcast ``W`` per source (tree); gather
``W (m-1)`` per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Exchange",
    "AuxFrom",
    "AuxSource",
    "Collectives",
    "PlacedCollectives",
    "lower",
    "lower_placed",
    "aux_placement",
    "aux_host",
]


def aux_host(aux: int, workers: int) -> int:
    """The designated host rank of auxiliary node ``aux`` (0-based among the auxiliaries): ``aux % m``."""
    return aux % workers


class Exchange(Enum):
    """How a rank's worker column gets the other workers' rows (see the module docstring)."""

    LOCAL = "local"
    REDUCE = "reduce"
    NEIGHBOR = "neighbor"
    BROADCAST = "broadcast"
    GATHER = "gather"


class AuxFrom(Enum):
    """Where an auxiliary column's worker terms come from."""

    NONE = "none"  # no worker contributes
    REDUCE = "reduce"  # reduction vector ``index`` of the round's all_reduce
    BROADCAST = "broadcast"  # one worker row (``index``), broadcast
    GATHER = "gather"  # the all_gather of every worker row


@dataclass(frozen=True)
class AuxSource:
    """An auxiliary column's worker terms: ``kind`` and its reduction vector or source row (``index``)."""

    kind: AuxFrom
    index: int = -1


@dataclass(frozen=True)
class Collectives:
    """The collectives of one round on every rank (every auxiliary replicated on every rank).

    Attributes:
        exchange: how the worker columns are formed (:class:`Exchange`).
        reduce_vectors: (K, m) worker weights whose weighted sums every rank needs (all_reduce).
        reduce_const: per vector, its constant value when all m entries are equal (then x is reduced and
            the sum scaled once -- "sum then divide" for J), else ``None``.
        worker_vector: index of the reduce vector giving the worker columns (``REDUCE``).
        aux_sources: per auxiliary, its :class:`AuxSource`.
        bcast_sources: worker rows broadcast to every rank (sorted).
        in_nbrs / out_nbrs: per rank, the workers it receives from / sends to (``NEIGHBOR``).
        max_degree: largest in- or out-degree of the worker block (for the cost model).
        deferrable: the all_reduce feeds only auxiliary columns (may run asynchronously).
    """

    exchange: Exchange
    reduce_vectors: np.ndarray
    reduce_const: tuple[float | None, ...]
    worker_vector: int | None
    aux_sources: tuple[AuxSource, ...]
    bcast_sources: tuple[int, ...]
    in_nbrs: tuple[tuple[int, ...], ...]
    out_nbrs: tuple[tuple[int, ...], ...]
    max_degree: int
    deferrable: bool

    @property
    def communicates(self) -> bool:
        return (
            self.exchange is not Exchange.LOCAL
            or len(self.reduce_vectors) > 0
            or len(self.bcast_sources) > 0
            or any(s.kind is AuxFrom.GATHER for s in self.aux_sources)
        )


def _worker_exchange(Sw: np.ndarray, off: np.ndarray, vec_index: Any) -> tuple[Exchange, int | None, set[int],
                                                                                 tuple[tuple[int, ...], ...],
                                                                                 tuple[tuple[int, ...], ...], int]:
    """The worker block's exchange: ``(exchange, worker vector, broadcast sources, in, out, max degree)``."""
    m = Sw.shape[0]
    in_nbrs: tuple[tuple[int, ...], ...] = tuple(() for _ in range(m))
    out_nbrs: tuple[tuple[int, ...], ...] = tuple(() for _ in range(m))
    max_degree = int(max(off.sum(axis=0).max(initial=0), off.sum(axis=1).max(initial=0)))
    if not off.any():
        return Exchange.LOCAL, None, set(), in_nbrs, out_nbrs, max_degree
    if all(np.array_equal(Sw[:, i], Sw[:, 0]) for i in range(1, m)):
        return Exchange.REDUCE, vec_index(Sw[:, 0]), set(), in_nbrs, out_nbrs, max_degree
    srcs = np.flatnonzero(off.any(axis=1))
    hops = max(1, math.ceil(math.log2(m))) if m > 1 else 0
    if len(srcs) * hops < max_degree:
        return Exchange.BROADCAST, None, {int(j) for j in srcs}, in_nbrs, out_nbrs, max_degree
    if max_degree > max(2, m // 2):
        return Exchange.GATHER, None, set(), in_nbrs, out_nbrs, max_degree
    in_nbrs = tuple(tuple(int(j) for j in np.flatnonzero(off[:, i])) for i in range(m))
    out_nbrs = tuple(tuple(int(i) for i in np.flatnonzero(off[j, :])) for j in range(m))
    return Exchange.NEIGHBOR, None, set(), in_nbrs, out_nbrs, max_degree


def lower(S: np.ndarray, workers: int, auxiliaries: int) -> Collectives:
    """The collectives of the round ``S`` (column convention; every auxiliary on every rank)."""
    S = np.asarray(S, dtype=np.float64)
    m, v = workers, auxiliaries
    Sw = S[:m, :m]
    off = Sw != 0
    np.fill_diagonal(off, False)
    vectors: list[np.ndarray] = []

    def vec_index(c: np.ndarray) -> int:
        for k, u in enumerate(vectors):
            if np.array_equal(u, c):
                return k
        vectors.append(c.copy())
        return len(vectors) - 1

    mode, worker_vector, sources, in_nbrs, out_nbrs, max_degree = _worker_exchange(Sw, off, vec_index)
    aux_sources: list[AuxSource] = []
    for a in range(v):
        c = S[:m, m + a]
        nz = np.flatnonzero(c)
        if nz.size == 0:
            aux_sources.append(AuxSource(AuxFrom.NONE))
        elif mode is Exchange.GATHER:
            aux_sources.append(AuxSource(AuxFrom.GATHER))
        elif any(np.array_equal(u, c) for u in vectors):
            aux_sources.append(AuxSource(AuxFrom.REDUCE, vec_index(c)))
        elif nz.size == 1 and m > 1:
            sources.add(int(nz[0]))
            aux_sources.append(AuxSource(AuxFrom.BROADCAST, int(nz[0])))
        else:
            aux_sources.append(AuxSource(AuxFrom.REDUCE, vec_index(c)))
    if mode is Exchange.NEIGHBOR and sources:  # rows that are broadcast anyway need no point-to-point copy
        in_nbrs = tuple(tuple(j for j in js if j not in sources) for js in in_nbrs)
        out_nbrs = tuple(() if j in sources else i for j, i in enumerate(out_nbrs))
        if not any(in_nbrs):
            mode = Exchange.BROADCAST
    R = np.array(vectors, dtype=np.float64).reshape(len(vectors), m)
    consts = tuple(float(u[0]) if np.all(u == u[0]) else None for u in R)
    return Collectives(
        exchange=mode,
        reduce_vectors=R,
        reduce_const=consts,
        worker_vector=worker_vector,
        aux_sources=tuple(aux_sources),
        bcast_sources=tuple(sorted(sources)),
        in_nbrs=in_nbrs,
        out_nbrs=out_nbrs,
        max_degree=max_degree,
        deferrable=len(vectors) > 0 and worker_vector is None,
    )


def aux_placement(spec: Any, *, limit: int = 4096) -> tuple[tuple[int, ...], ...] | None:
    """Which ranks hold each auxiliary of ``spec``: ``None`` when every rank holds every auxiliary.

    For a static periodic schedule (every matrix known in advance, at most ``limit`` steps per cycle) an
    auxiliary is held by the workers that ever read it (a non-zero ``S[m + a, i]``), or by its default host
    ``a % m`` when no worker reads it. Any other schedule (data-dependent, random, user callables)
    replicates every auxiliary on every rank.
    """
    m, v = spec.workers, spec.auxiliaries
    if v == 0:
        return None
    mats = spec.schedule.matrices(limit)
    if mats is None:
        return None
    readers: list[set[int]] = [set() for _ in range(v)]
    for S in mats:
        for a in range(v):
            readers[a].update(int(i) for i in np.flatnonzero(S[m + a, :m]))
    holders = tuple(tuple(sorted(r)) if r else (aux_host(a, m),) for a, r in enumerate(readers))
    if all(len(h) == m for h in holders):
        return None
    return holders


@dataclass(frozen=True)
class PlacedCollectives:
    """The collectives of one round of a placed spec (auxiliaries held by subsets of ranks).

    Attributes:
        worker: the collectives of the worker-to-worker block (no auxiliaries).
        local_terms: (v, v) booleans, ``[b, a]`` true when every holder of a also holds b, so that the term
            ``S[m+b, m+a] z_b`` is added locally by each holder of a.
        reductions: ``(ranks, auxiliaries)`` pairs: one all_reduce over ``ranks`` (a subgroup, or the world)
            completes the listed auxiliaries' columns.
    """

    worker: Collectives
    local_terms: np.ndarray
    reductions: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @property
    def communicates(self) -> bool:
        return self.worker.communicates or len(self.reductions) > 0


def lower_placed(S: np.ndarray, holders: tuple[tuple[int, ...], ...]) -> PlacedCollectives:
    """The collectives of ``S`` for a placement: worker block as :func:`lower`, auxiliary columns as reductions.

    Raises ``RuntimeError`` when a worker reads an auxiliary its rank does not hold (the placement was
    computed from the schedule's matrices, so this means the schedule produced an unforeseen matrix).
    """
    S = np.asarray(S, dtype=np.float64)
    v = len(holders)
    m = S.shape[0] - v
    H = [frozenset(h) for h in holders]
    host = [min(h) for h in holders]
    for a in range(v):
        missing = [int(i) for i in np.flatnonzero(S[m + a, :m]) if int(i) not in H[a]]
        if missing:
            raise RuntimeError(f"auxiliary {a} is read by worker(s) {missing} whose ranks do not hold it "
                               f"(held by ranks {sorted(H[a])})")
    local = np.zeros((v, v), dtype=bool)
    parts: dict[tuple[int, ...], list[int]] = {}
    for a in range(v):
        P = {int(j) for j in np.flatnonzero(S[:m, m + a])}
        for b in np.flatnonzero(S[m:, m + a]):
            if H[b] >= H[a]:
                local[b, a] = True
            else:
                P.add(host[b])
        if P:
            parts.setdefault(tuple(sorted(P | H[a])), []).append(a)
    reductions = tuple(sorted((P, tuple(auxes)) for P, auxes in parts.items()))
    return PlacedCollectives(worker=lower(S[:m, :m], m, 0), local_terms=local, reductions=reductions)
