"""Communication patterns of the distributed engine: one mixing round ``X <- X S`` across processes.

Placement (the same for every spec, documented once here):

* worker ``i`` lives on rank ``i`` (the world size is the number of workers m);
* an auxiliary node (z of EASGD, the FedAvg / DOWNPOUR server, LSGD's leader copies, the group
  auxiliaries of hierarchical averaging) is held by the ranks whose workers read it, and updated by them
  with the same arithmetic so that the copies stay identical (:func:`aux_placement`):

  - *replicated* (EASGD, FedAvg, LSGD, DOWNPOUR, time-varying or data-dependent schedules): every worker
    reads it, so every rank holds it and no rank ever has to ask another for its value; rank ``j % m``
    is its designated host (the one that reports it);
  - *placed* (hierarchical averaging): a group's auxiliary lives only on the ranks of that group (its
    designated host is the group's first rank). The group's rounds are all_reduces inside a process
    subgroup (``torch.distributed.new_group``), never touching the other groups; a round that mixes
    auxiliaries of different groups is one reduction over the ranks that contribute to it. Copies on
    other ranks are not maintained (:meth:`Mixer.collect_aux` assembles every auxiliary's current value
    from its host).

A round on rank ``r`` updates the rows it holds (its worker and the auxiliaries) with the columns of S
(column convention of :func:`coopsgd.engines.mixing.apply_mixing`: node i's new value is
``sum_j S[j, i] x_j``). Auxiliary contributions are local. What rank r needs from other workers decides
the pattern, chosen from S alone (every rank sees the same S, so every rank picks the same collectives):

* ``local`` -- the worker block of S is diagonal (EASGD, LSGD's pull): no exchange for the worker columns;
* ``reduce`` -- all worker columns are one weight vector w (J, FedAvg): ONE all_reduce of ``w_r x_r``
  (for a constant w, as J: the sum of the flat rows, then one scaling -- "sum then divide");
* ``neighbor`` -- a sparse worker block (ring, torus, one-peer graphs; largest in/out-degree
  <= max(2, m/2)): batched ``isend``/``irecv`` of the flat row to each out-neighbour; node r adds
  ``S[j, r] x_j`` for its in-neighbours j (its column of S holds its in-weights);
* ``broadcast`` -- few source rows needed by many (LSGD's leader; sources * ceil(log2 m) < degree):
  one broadcast per source row;
* ``gather`` -- anything denser and not rank one (DOWNPOUR's ordered pushes): all_gather of the m worker
  rows, then every rank evaluates its own columns -- the general path, correct for any matrix.

Auxiliary columns need ``sum_j S[j, a] x_j`` on every rank: a single source is a broadcast; other weight
vectors join one all_reduce of a (K, width) tensor (K distinct vectors: 1 for EASGD / FedAvg, the number
of groups for hierarchical averaging). Costs per round (W floats per row): reduce ``2W(m-1)/m`` sent per
rank; neighbor ``W * out-degree``; broadcast ``W`` per source (tree); gather ``W (m-1)`` per rank (the
general path, O(m W) received per rank -- correct for any matrix, priced like a parameter server).

Non-blocking rounds (``overlap=True``, [CSGD] §3.3): when the worker columns do not need the all_reduce
(EASGD, generalized elastic, hierarchical), it is started with ``async_op=True`` and the auxiliaries'
new values are completed only when next needed (:meth:`Mixer.finalize`, called at the next round or
before any read of an auxiliary). The worker rows use the *old* auxiliaries, exactly as ``X S`` does, so
the iterates are those of the blocking algorithm; only time changes.

Network emulation (:class:`NetEmulation`): every operation takes at least the alpha-beta time of that
operation (:func:`coopsgd.theory.cost.round_cost` priced by a :class:`~coopsgd.theory.cost.NetworkModel`;
each rank sleeps for what the real transfer did not use), so the papers' slow networks can be felt on
one machine; an asynchronous operation completes no earlier than ``launch + delay`` (the delay overlaps
computation).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from coopsgd.errors import CoopSGDError, check_float
from coopsgd.theory.cost import NetworkModel, RoundCost, round_cost

__all__ = [
    "CommunicationError",
    "NetEmulation",
    "CommStats",
    "MixPlan",
    "build_plan",
    "PlacedPlan",
    "build_placed_plan",
    "aux_placement",
    "Mixer",
    "aux_host",
]


class CommunicationError(CoopSGDError, RuntimeError):
    """A collective or point-to-point operation failed or timed out (usually because a peer died or hung)."""


def aux_host(aux: int, workers: int) -> int:
    """The designated host rank of auxiliary node ``aux`` (0-based among the auxiliaries): ``aux % m``."""
    return aux % workers


# ---------------------------------------------------------------------------------------------------------
# network emulation and accounting
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetEmulation:
    """Emulated link: ``latency_ms`` per handshake and ``bandwidth_mbps`` (megabit/s); ``None`` = not emulated."""

    latency_ms: float | None = None
    bandwidth_mbps: float | None = None

    def __post_init__(self) -> None:
        if self.latency_ms is not None:
            object.__setattr__(self, "latency_ms", check_float("net_latency_ms", self.latency_ms, low=0.0))
        if self.bandwidth_mbps is not None:
            object.__setattr__(
                self, "bandwidth_mbps", check_float("net_bandwidth_mbps", self.bandwidth_mbps, low=0.0, low_open=True)
            )

    @property
    def enabled(self) -> bool:
        return self.latency_ms is not None or self.bandwidth_mbps is not None

    @property
    def model(self) -> NetworkModel:
        """The equivalent alpha-beta model (an unset part costs nothing)."""
        lat = (self.latency_ms or 0.0) / 1e3
        bw = math.inf if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8.0
        return NetworkModel(latency_s=lat, bandwidth_Bps=bw if math.isfinite(bw) else 1e300)

    def delay(self, cost: RoundCost) -> float:
        """Seconds to add for one operation of ``cost``."""
        if not self.enabled:
            return 0.0
        return self.model.round_time(cost)


@dataclass
class CommStats:
    """Per-rank communication accounting.

    Attributes:
        bytes_sent: payload bytes this rank put on the wire (ring all-reduce ``2N(m-1)/m``, ring all-gather
            ``N(m-1)``, tree broadcast ``N(m-1)/m`` on average, ``N`` per point-to-point send).
        bytes_model: the alpha-beta model's bytes through the busiest link (as the simulator counts them).
        ops: number of operations per kind.
        comm_s: seconds spent inside blocking operations and waiting for asynchronous ones (emulated
            delays included).
        emulated_s: the part of ``comm_s`` that was emulated delay.
    """

    bytes_sent: float = 0.0
    bytes_model: float = 0.0
    ops: dict[str, int] = field(default_factory=dict)
    comm_s: float = 0.0
    emulated_s: float = 0.0

    def count(self, kind: str, sent: float, cost: RoundCost | None) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + 1
        self.bytes_sent += float(sent)
        if cost is not None:
            self.bytes_model += float(cost.bytes_sent)


# ---------------------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixPlan:
    """How one matrix S is communicated (identical on every rank).

    Attributes:
        worker_mode: ``"local"``, ``"reduce"``, ``"neighbor"``, ``"broadcast"`` or ``"gather"``.
        reduce_vectors: (K, m) worker weights whose weighted sums every rank needs (all_reduce).
        reduce_const: per vector, its constant value when all m entries are equal (then x is reduced and
            the sum scaled once -- "sum then divide" for J), else ``None``.
        worker_vector: index of the reduce vector giving the worker columns (``"reduce"`` mode).
        aux_sources: per auxiliary: ``("none",)``, ``("reduce", k)``, ``("bcast", j)`` or ``("gather",)``.
        bcast_sources: worker rows broadcast to every rank (sorted).
        in_nbrs / out_nbrs: per rank, the workers it receives from / sends to (``"neighbor"`` mode).
        max_degree: largest in- or out-degree of the worker block (for the cost model).
        deferrable: the all_reduce feeds only auxiliary columns (may run asynchronously).
    """

    worker_mode: str
    reduce_vectors: np.ndarray
    reduce_const: tuple[float | None, ...]
    worker_vector: int | None
    aux_sources: tuple[tuple[Any, ...], ...]
    bcast_sources: tuple[int, ...]
    in_nbrs: tuple[tuple[int, ...], ...]
    out_nbrs: tuple[tuple[int, ...], ...]
    max_degree: int
    deferrable: bool

    @property
    def communicates(self) -> bool:
        return (
            self.worker_mode != "local"
            or len(self.reduce_vectors) > 0
            or len(self.bcast_sources) > 0
            or any(s[0] == "gather" for s in self.aux_sources)
        )


def build_plan(S: np.ndarray, workers: int, auxiliaries: int) -> MixPlan:
    """Classify ``S`` (column convention) into the collectives of one round (see the module docstring)."""
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

    worker_vector = None
    sources: set[int] = set()
    in_nbrs: tuple[tuple[int, ...], ...] = tuple(() for _ in range(m))
    out_nbrs: tuple[tuple[int, ...], ...] = tuple(() for _ in range(m))
    in_deg = off.sum(axis=0)
    out_deg = off.sum(axis=1)
    max_degree = int(max(in_deg.max(initial=0), out_deg.max(initial=0)))
    if not off.any():
        mode = "local"
    elif all(np.array_equal(Sw[:, i], Sw[:, 0]) for i in range(1, m)):
        mode = "reduce"
        worker_vector = vec_index(Sw[:, 0])
    else:
        srcs = np.flatnonzero(off.any(axis=1))
        hops = max(1, math.ceil(math.log2(m))) if m > 1 else 0
        if len(srcs) * hops < max_degree:
            mode = "broadcast"
            sources.update(int(j) for j in srcs)
        elif max_degree > max(2, m // 2):
            mode = "gather"
        else:
            mode = "neighbor"
            in_nbrs = tuple(tuple(int(j) for j in np.flatnonzero(off[:, i])) for i in range(m))
            out_nbrs = tuple(tuple(int(i) for i in np.flatnonzero(off[j, :])) for j in range(m))
    aux_sources: list[tuple[Any, ...]] = []
    for a in range(v):
        c = S[:m, m + a]
        nz = np.flatnonzero(c)
        if nz.size == 0:
            aux_sources.append(("none",))
        elif mode == "gather":
            aux_sources.append(("gather",))
        elif any(np.array_equal(u, c) for u in vectors):
            aux_sources.append(("reduce", vec_index(c)))
        elif nz.size == 1 and m > 1:
            sources.add(int(nz[0]))
            aux_sources.append(("bcast", int(nz[0])))
        else:
            aux_sources.append(("reduce", vec_index(c)))
    if mode == "neighbor" and sources:  # rows that are broadcast anyway need no point-to-point copy
        in_nbrs = tuple(tuple(j for j in js if j not in sources) for js in in_nbrs)
        out_nbrs = tuple(() if j in sources else i for j, i in enumerate(out_nbrs))
        if not any(in_nbrs):
            mode = "broadcast"
    R = np.array(vectors, dtype=np.float64).reshape(len(vectors), m)
    consts = tuple(float(u[0]) if np.all(u == u[0]) else None for u in R)
    deferrable = len(vectors) > 0 and worker_vector is None
    return MixPlan(
        worker_mode=mode,
        reduce_vectors=R,
        reduce_const=consts,
        worker_vector=worker_vector,
        aux_sources=tuple(aux_sources),
        bcast_sources=tuple(sorted(sources)),
        in_nbrs=in_nbrs,
        out_nbrs=out_nbrs,
        max_degree=max_degree,
        deferrable=deferrable,
    )


# ---------------------------------------------------------------------------------------------------------
# placement of the auxiliaries
# ---------------------------------------------------------------------------------------------------------


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
class PlacedPlan:
    """One round of a placed spec (auxiliaries held by subsets of ranks).

    Attributes:
        worker: the plan of the worker-to-worker block (no auxiliaries).
        local_terms: (v, v) booleans, ``[b, a]`` true when every holder of a also holds b, so that the term
            ``S[m+b, m+a] z_b`` is added locally by each holder of a.
        reductions: ``(ranks, auxiliaries)`` pairs: one all_reduce over ``ranks`` (a subgroup, or the world)
            completes the listed auxiliaries' columns.
    """

    worker: MixPlan
    local_terms: np.ndarray
    reductions: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    @property
    def communicates(self) -> bool:
        return self.worker.communicates or len(self.reductions) > 0


def build_placed_plan(S: np.ndarray, holders: tuple[tuple[int, ...], ...]) -> PlacedPlan:
    """Classify ``S`` for a placement: worker block as :func:`build_plan`, auxiliary columns as reductions.

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
    return PlacedPlan(worker=build_plan(S[:m, :m], m, 0), local_terms=local, reductions=reductions)


# ---------------------------------------------------------------------------------------------------------
# the mixer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    works: list[Any]  # asynchronous collectives to wait for
    launched: float
    delay: float  # emulated duration (the operation completes no earlier than launched + delay)
    complete: Callable[[], None]  # writes the auxiliaries' new values once the works are done


def _all_gather_single(out: Tensor, inp: Tensor, group: Any) -> None:
    fn = getattr(dist, "all_gather_single", None)
    if fn is not None:
        fn(out, inp, group=group)
    else:  # older torch
        dist.all_gather_into_tensor(out, inp, group=group)


class Mixer:
    """Applies mixing matrices to the rows one rank holds: ``rows[0]`` its worker, ``rows[1:]`` the auxiliaries.

    Args:
        rank, workers, auxiliaries: this rank, m and v.
        net: network emulation (``None``: none).
        group: the process group (default: the world).
        on_finalize: called after deferred auxiliary values are written (the engine re-zeroes the
            auxiliaries' momentum columns there).
        holders: per auxiliary, the ranks holding it (:func:`aux_placement`); ``None``: every rank holds
            every auxiliary. With a placement, rows of auxiliaries this rank does not hold are left as
            they are (stale) and :meth:`collect_aux` gives their current values.
        matrices: the matrices the schedule will produce (when known): their process subgroups are
            created at construction, a collective every rank must take part in.
    """

    def __init__(
        self,
        rank: int,
        workers: int,
        auxiliaries: int,
        *,
        net: NetEmulation | None = None,
        group: Any = None,
        on_finalize: Callable[[], None] | None = None,
        holders: tuple[tuple[int, ...], ...] | None = None,
        matrices: list[np.ndarray] | None = None,
    ) -> None:
        self.rank = int(rank)
        self.m = int(workers)
        self.v = int(auxiliaries)
        self.net = net or NetEmulation()
        self.group = group
        self.stats = CommStats()
        self.on_finalize = on_finalize
        self._plans: OrderedDict[bytes, Any] = OrderedDict()
        self._pending: _Pending | None = None
        if holders is not None:
            holders = tuple(tuple(sorted(int(r) for r in h)) for h in holders)
            if len(holders) != self.v or any(not h or h[0] < 0 or h[-1] >= self.m for h in holders):
                raise ValueError(f"holders must give a non-empty set of ranks in [0, {self.m}) per auxiliary, got {holders}")
            if group is not None:
                raise ValueError("a placement (holders) needs the default (world) process group")
        self.holders = holders
        self._subgroups: dict[tuple[int, ...], Any] = {}
        if holders is not None:
            for S in matrices or ():
                for ranks, _ in self.plan(S).reductions:
                    self._subgroup(ranks)

    # -- placement ---------------------------------------------------------------------------------------
    @property
    def placed(self) -> bool:
        """True when auxiliaries are held by subsets of ranks (else every rank holds every auxiliary)."""
        return self.holders is not None

    def holds(self, aux: int) -> bool:
        return self.holders is None or self.rank in self.holders[aux]

    def host(self, aux: int) -> int:
        """The designated host of auxiliary ``aux``: the first holder (placed), else ``aux % m``."""
        return aux_host(aux, self.m) if self.holders is None else self.holders[aux][0]

    def _subgroup(self, ranks: tuple[int, ...]) -> Any:
        """The process group of ``ranks`` (the world when all of them), created once, collectively."""
        if len(ranks) == self.m:
            return self.group
        g = self._subgroups.get(ranks)
        if g is None:
            timeout = None
            try:  # the same timeout as the world group (new_group's default is 30 minutes)
                timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 -- not gloo / private API changed: torch's default
                timeout = None
            g = dist.new_group(list(ranks), timeout=timeout)
            self._subgroups[ranks] = g
        return g

    def collect_aux(self, Z: Tensor) -> Tensor:
        """Every auxiliary's current row (v, W) on every rank (collective when placed): ``Z`` is this rank's."""
        self.finalize()
        if self.holders is None or self.v == 0:
            return Z.clone()
        buf = torch.zeros_like(Z)
        for a in range(self.v):
            if self.host(a) == self.rank:
                buf[a].copy_(Z[a])
        dist.all_reduce(buf, group=self.group)  # exact: one non-zero term per entry
        return buf

    # -- plans -----------------------------------------------------------------------------------------
    def plan(self, S: np.ndarray) -> Any:
        """The :class:`MixPlan` (or :class:`PlacedPlan` with a placement) of ``S``, cached."""
        S = np.ascontiguousarray(S, dtype=np.float64)
        key = S.tobytes()
        p = self._plans.get(key)
        if p is None:
            p = build_plan(S, self.m, self.v) if self.holders is None else build_placed_plan(S, self.holders)
            self._plans[key] = p
            if len(self._plans) > 64:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return p

    # -- primitive operations (timed, emulated, counted; errors become CommunicationError) ----------------
    def _finish(self, kind: str, t0: float, cost: RoundCost | None, sent: float) -> None:
        # the emulated link makes the operation take at least its alpha-beta time (the real loopback
        # transfer counts toward it), as an asynchronous one completes no earlier than launch + delay
        d = (self.net.delay(cost) if cost is not None else 0.0) - (time.perf_counter() - t0)
        if d > 0:
            time.sleep(d)
            self.stats.emulated_s += d
        self.stats.comm_s += time.perf_counter() - t0
        self.stats.count(kind, sent, cost)

    def _fail(self, what: str, exc: BaseException) -> CommunicationError:
        return CommunicationError(f"rank {self.rank}: {what} failed: {str(exc).splitlines()[0][:300]}")

    def all_reduce(self, t: Tensor, ranks: tuple[int, ...] | None = None) -> None:
        """Sum ``t`` over the world, or over the subgroup of ``ranks``."""
        size = self.m if ranks is None else len(ranks)
        group = self.group if ranks is None else self._subgroup(ranks)
        t0 = time.perf_counter()
        try:
            dist.all_reduce(t, group=group)
        except Exception as exc:
            where = "" if ranks is None or size == self.m else f" in the group of ranks {list(ranks)}"
            raise self._fail(f"all_reduce{where}", exc) from exc
        n = t.numel()
        es = t.element_size()
        cost = round_cost("allreduce", workers=size, params=n, bytes_per_param=es)
        self._finish("all_reduce" if size == self.m else "group_all_reduce", t0, cost, 2.0 * n * es * (size - 1) / size)

    def broadcast(self, t: Tensor, src: int) -> None:
        t0 = time.perf_counter()
        try:
            dist.broadcast(t, src=src, group=self.group)
        except Exception as exc:
            raise self._fail(f"broadcast from rank {src}", exc) from exc
        n, es = t.numel(), t.element_size()
        cost = round_cost("broadcast", workers=self.m, params=n, bytes_per_param=es)
        self._finish("broadcast", t0, cost, n * es * (self.m - 1) / self.m)

    def all_gather(self, t: Tensor) -> Tensor:
        """(m, N) rows of every rank's ``t`` (N = t.numel())."""
        out = torch.empty(self.m * t.numel(), dtype=t.dtype, device=t.device)
        t0 = time.perf_counter()
        try:
            _all_gather_single(out, t.contiguous().reshape(-1), self.group)
        except Exception as exc:
            raise self._fail("all_gather", exc) from exc
        n, es = t.numel(), t.element_size()
        cost = RoundCost("allgather", self.m if self.m > 1 else 0, float(n * (self.m - 1)), float(n * (self.m - 1) * es))
        self._finish("all_gather", t0, cost, n * es * (self.m - 1))
        return out.view(self.m, -1)

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        """All-gather one small float64 vector per rank (LSGD loss estimates): returns (m, k)."""
        t = torch.as_tensor(np.atleast_1d(np.asarray(values, dtype=np.float64)), dtype=torch.float64)
        return self.all_gather(t).numpy().copy()

    def exchange(self, x: Tensor, plan: MixPlan) -> dict[int, Tensor]:
        """Neighbour exchange: send ``x`` to out-neighbours, receive from in-neighbours (batched p2p)."""
        r = self.rank
        ops = []
        got: dict[int, Tensor] = {}
        for j in plan.in_nbrs[r]:
            got[j] = torch.empty_like(x)
            ops.append(dist.P2POp(dist.irecv, got[j], j, group=self.group))
        for i in plan.out_nbrs[r]:
            ops.append(dist.P2POp(dist.isend, x, i, group=self.group))
        t0 = time.perf_counter()
        if ops:
            try:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            except Exception as exc:
                peers = sorted(set(plan.in_nbrs[r]) | set(plan.out_nbrs[r]))
                raise self._fail(f"neighbour exchange with ranks {peers}", exc) from exc
        n, es = x.numel(), x.element_size()
        deg = max(1, plan.max_degree) if self.m > 1 else 0
        cost = round_cost("neighbor", workers=self.m, params=n, max_degree=min(deg, self.m - 1), bytes_per_param=es)
        self._finish("neighbor", t0, cost, n * es * len(plan.out_nbrs[r]))
        return got

    # -- rounds ----------------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return self._pending is not None

    def finalize(self) -> None:
        """Complete a deferred (non-blocking) auxiliary update: wait, then write the auxiliaries."""
        p = self._pending
        if p is None:
            return
        self._pending = None
        t0 = time.perf_counter()
        try:
            for work in p.works:
                work.wait()
        except Exception as exc:
            raise self._fail("non-blocking all_reduce", exc) from exc
        remaining = p.launched + p.delay - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
            self.stats.emulated_s += remaining
        self.stats.comm_s += time.perf_counter() - t0
        p.complete()
        if self.on_finalize is not None:
            self.on_finalize()

    def mix(self, rows: Tensor, S: np.ndarray, *, overlap: bool = False) -> MixPlan | PlacedPlan:
        """Replace ``rows`` (1+v, W) -- this rank's worker and the auxiliaries -- by their columns of ``X S``.

        With ``overlap`` an all_reduce that feeds only auxiliaries runs asynchronously; the auxiliary rows
        then keep their old values until :meth:`finalize` (called at the start of the next :meth:`mix`).
        """
        self.finalize()
        m, v, r = self.m, self.v, self.rank
        plan = self.plan(S)
        S = np.asarray(S, dtype=np.float64)
        if isinstance(plan, PlacedPlan):
            self._mix_placed(rows, S, plan, overlap)
            return plan
        dtype, device = rows.dtype, rows.device
        x = rows[0]
        Z = rows[1:]

        def col(values: np.ndarray) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(values), dtype=dtype, device=device)

        # fast path: J over workers with no auxiliaries -- one in-place all_reduce (sum, then divide)
        if plan.worker_mode == "reduce" and v == 0 and plan.reduce_const[0] is not None and x.is_contiguous():
            self.all_reduce(x)
            x.mul_(plan.reduce_const[0])
            return plan

        got: dict[int, Tensor] = {}
        for j in plan.bcast_sources:
            buf = x.clone() if j == r else torch.empty_like(x)
            self.broadcast(buf, j)
            got[j] = buf
        X_all = None
        if plan.worker_mode == "gather":
            X_all = self.all_gather(x)
        if plan.worker_mode == "neighbor":
            got.update(self.exchange(x.contiguous(), plan))

        K = len(plan.reduce_vectors)
        red = None
        pending_red = None
        if K:
            buf = torch.empty((K, x.numel()), dtype=dtype, device=device)
            for k in range(K):
                c = plan.reduce_const[k]
                if c is not None:
                    buf[k].copy_(x)
                else:
                    buf[k].copy_(x).mul_(float(plan.reduce_vectors[k, r]))
            if overlap and plan.deferrable:
                es = buf.element_size()
                cost = round_cost("allreduce", workers=m, params=buf.numel(), bytes_per_param=es)
                t0 = time.perf_counter()
                try:
                    work = dist.all_reduce(buf, group=self.group, async_op=True)
                except Exception as exc:
                    raise self._fail("non-blocking all_reduce", exc) from exc
                self.stats.comm_s += time.perf_counter() - t0
                self.stats.count("all_reduce_async", 2.0 * buf.numel() * es * (m - 1) / m, cost)
                pending_red = (work, buf, t0, self.net.delay(cost))
            else:
                self.all_reduce(buf)
                for k, c in enumerate(plan.reduce_const):
                    if c is not None:
                        buf[k].mul_(c)
                red = buf

        # -- the worker column (rank r) --
        if plan.worker_mode == "gather":
            assert X_all is not None
            new_x = col(S[:m, r]) @ X_all
        elif plan.worker_mode == "reduce":
            assert red is not None and plan.worker_vector is not None
            new_x = red[plan.worker_vector].clone()
        else:
            new_x = x * float(S[r, r])
            for j, xj in got.items():
                w = float(S[j, r])
                if j != r and w != 0.0:
                    new_x.add_(xj, alpha=w)
        if v:
            wa = S[m:, r]
            if np.any(wa):
                new_x.add_(col(wa) @ Z)

        # -- the auxiliary columns (replicated) --
        if v:
            new_Z = col(S[m:, m:]).T @ Z
            targets: list[tuple[int, int]] = []
            for a, src in enumerate(plan.aux_sources):
                if src[0] == "gather":
                    assert X_all is not None
                    new_Z[a].add_(col(S[:m, m + a]) @ X_all)
                elif src[0] == "bcast":
                    j = src[1]
                    new_Z[a].add_(x if j == r else got[j], alpha=float(S[j, m + a]))
                elif src[0] == "reduce":
                    if pending_red is None:
                        assert red is not None
                        new_Z[a].add_(red[src[1]])
                    else:
                        targets.append((a, src[1]))
            if pending_red is not None:
                work, buf, t0, delay = pending_red

                def complete(buf: Tensor = buf, new_Z: Tensor = new_Z, targets: list = targets,
                             consts: tuple = plan.reduce_const, Z: Tensor = Z) -> None:
                    for k, c in enumerate(consts):
                        if c is not None:
                            buf[k].mul_(c)
                    for a, k in targets:
                        new_Z[a].add_(buf[k])
                    Z.copy_(new_Z)

                self._pending = _Pending([work], t0, delay, complete)
            else:
                Z.copy_(new_Z)
        x.copy_(new_x)
        return plan

    def _mix_placed(self, rows: Tensor, S: np.ndarray, plan: PlacedPlan, overlap: bool) -> None:
        """A round with placed auxiliaries: the worker block as usual, auxiliary columns by (sub)group reductions."""
        m, r = self.m, self.rank
        dtype, device = rows.dtype, rows.device
        x = rows[0]
        Z = rows[1:]
        wp = plan.worker
        # -- worker-to-worker contributions (the patterns of build_plan on the worker block) --
        got: dict[int, Tensor] = {}
        for j in wp.bcast_sources:
            buf = x.clone() if j == r else torch.empty_like(x)
            self.broadcast(buf, j)
            got[j] = buf
        if wp.worker_mode == "gather":
            X_all = self.all_gather(x)
            new_x = torch.as_tensor(np.ascontiguousarray(S[:m, r]), dtype=dtype, device=device) @ X_all
        elif wp.worker_mode == "reduce":
            assert wp.worker_vector is not None
            new_x = x.clone()
            c = wp.reduce_const[wp.worker_vector]
            if c is None:
                new_x.mul_(float(wp.reduce_vectors[wp.worker_vector, r]))
            self.all_reduce(new_x)
            if c is not None:
                new_x.mul_(c)
        else:
            if wp.worker_mode == "neighbor":
                got.update(self.exchange(x.contiguous(), wp))
            new_x = x * float(S[r, r])
            for j, xj in got.items():
                w = float(S[j, r])
                if j != r and w != 0.0:
                    new_x.add_(xj, alpha=w)
        held = [a for a in range(self.v) if self.holds(a)]
        for a in held:  # the auxiliaries this worker reads (the placement guarantees they are held)
            w = float(S[m + a, r])
            if w != 0.0:
                new_x.add_(Z[a], alpha=w)
        # -- auxiliary columns: local terms, then one reduction per participant set --
        new_Z = {a: torch.zeros_like(Z[a]) for a in held}
        for a in held:
            for b in np.flatnonzero(plan.local_terms[:, a]):
                new_Z[a].add_(Z[int(b)], alpha=float(S[m + int(b), m + a]))
        adds: list[tuple[int, Tensor]] = []
        works: list[Any] = []
        t_launch = time.perf_counter()
        delay = 0.0
        for ranks, auxes in plan.reductions:
            if r not in ranks:
                continue
            buf = torch.zeros((len(auxes), x.numel()), dtype=dtype, device=device)
            for k, a in enumerate(auxes):
                w = float(S[r, m + a])
                if w != 0.0:
                    buf[k].add_(x, alpha=w)
                for bb in np.flatnonzero(S[m:, m + a]):
                    src = int(bb)
                    if not plan.local_terms[src, a] and self.host(src) == r:
                        buf[k].add_(Z[src], alpha=float(S[m + src, m + a]))
            if len(ranks) == 1:  # a group of one (e.g. groups of one worker): nothing to exchange
                pass
            elif overlap:
                size = len(ranks)
                es = buf.element_size()
                cost = round_cost("allreduce", workers=size, params=buf.numel(), bytes_per_param=es)
                t0 = time.perf_counter()
                try:
                    works.append(dist.all_reduce(buf, group=self._subgroup(ranks), async_op=True))
                except Exception as exc:
                    raise self._fail(f"non-blocking all_reduce in the group of ranks {list(ranks)}", exc) from exc
                self.stats.comm_s += time.perf_counter() - t0
                kind = "all_reduce_async" if size == m else "group_all_reduce_async"
                self.stats.count(kind, 2.0 * buf.numel() * es * (size - 1) / size, cost)
                delay = max(delay, self.net.delay(cost))
            else:
                self.all_reduce(buf, ranks)
            adds.extend((a, buf[k]) for k, a in enumerate(auxes) if self.holds(a))

        def complete() -> None:
            for a, t in adds:
                new_Z[a].add_(t)
            for a in held:
                Z[a].copy_(new_Z[a])

        if works:
            self._pending = _Pending(works, t_launch, delay, complete)
        else:
            complete()
        x.copy_(new_x)
