"""The one place where a synchronization matrix is applied to the stacked state.

[CSGD] writes the state as X in R^{d x n} (one column per node) and a round as ``X S``: column ``i`` of
``X S`` is ``sum_j x_j S[j, i]``. Engines store nodes as *rows* (state of shape (n, d)), so the same round
is ``S^T @ state``. For symmetric S the transpose does not matter; for column-stochastic matrices (LSGD's
pull, push-sum) it does, and ``tests/unit/test_round_kernels.py`` pins it down with a non-symmetric S.

:func:`apply_mixing` is the reference definition (one dense product). :func:`mix_rows_` gives the same
result in place with the cheapest exact kernel for the structure of S, analysed once per distinct matrix
(:func:`round_plan`, a bounded cache keyed by a digest of the matrix's non-zero entries; an immutable matrix,
such as a schedule's fixed ring, is found again by its identity in O(1)). A
:class:`~coopsgd.algorithms.schedules.Mix` that carries its structure (FedAvg's ``Averaging``: the sampled
clients and their weights) gets its plan from it in O(sampled clients), the n x n matrix neither built nor
read (:func:`plan_round`, the one planner every engine uses: it returns a :class:`Round`, the round's
:class:`RoundPlan` with the Mix it came from). Only the *changed* columns
of S (those that differ from the identity column e_i) are computed; rows whose column is e_i are not
touched. Over the changed columns, the kernels are, in the order they are tried:

``IDENTITY``
    S = I: nothing to do.
``AVERAGE``
    every changed column is the same vector w (J, FedAvg's weighted average of the sampled clients, any
    column-constant S = w 1^T): one weighted sum over the rows where w is non-zero, then a broadcast into
    the changed rows. Transient memory: one row (plus the gathered source rows when they are not all rows).
``SPARSE``
    the changed columns hold at most ``SPARSE_MAX_DEGREE`` non-zeros each, or at most ``SPARSE_DENSITY``
    of their entries are non-zero (ring, torus, hypercube, exponential graphs, LSGD's pull, DOWNPOUR's
    pushes): a neighbour gather ``x_i <- sum_j S[j, i] x_j`` from (rows, k) index/weight tables, columns
    grouped by their number of non-zeros so nothing is padded. In place, whatever the order: long rows
    (>= 16k entries) are updated one at a time in their own memory (``x_i *= S[i, i]``, then
    ``x_i += S[j, i] x_j``), after saving a copy of the old row when a later row still reads it (a ring
    keeps two such rows at a time); short rows go in blocks of ~2 MiB gathered with ``index_select``,
    each block written back as soon as no later block reads the rows it replaces. Transient memory: the
    saved rows or held blocks -- a few rows for a ring or a banded matrix, up to the changed rows (one
    state) for a scattered graph, like the dense product's output.
``CHAIN``
    the distinct changed columns form a chain ``u_1, u_2 = u_1 + D_2, ...`` whose first column and
    successive differences ``D_t`` are sparse (DOWNPOUR's composed pushes: every push adds one worker's
    update to the server and copies the server into two rows, so the composed matrix is ~50% dense but
    each column is the previous one plus two entries), and no difference reads a row an earlier column
    already overwrote: one running row ``y <- y + X D_t``, written into the rows of ``u_t`` as it goes.
    Cost O(nnz(u_1) + sum nnz(D_t) + changed rows) row operations instead of the product's n per
    changed row. Rows shorter than ``_CHAIN_ROW_ELEMENTS`` use the dense product over the changed columns
    (per-row Python calls would cost more than the small product).
``DENSE``
    anything else: the matrix product over the changed columns (all of them: :func:`apply_mixing`).

A plan also records ``col_abs_max``, ``max_i sum_j |S[j, i]|`` (NaN or inf when S holds a non-finite
entry), the growth bound the simulator's overflow guard needs, so that no engine passes over S again.
The analysis of a matrix with few non-zeros works on its non-zero entries alone (O(nnz), no n x n
temporaries): FedAvg draws a new 1001 x 1001 matrix every round.

Every kernel equals the dense product up to the order of the floating-point sums (to ~1e-15 relative in
float64); none is bitwise-identical to it in general.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from coopsgd.algorithms.schedules import Mix

__all__ = ["apply_mixing", "mix_rows_", "round_plan", "average_plan", "plan_round", "Round", "RoundKind", "RoundPlan", "SPARSE_DENSITY",
           "SPARSE_MAX_DEGREE"]

T = TypeVar("T")

#: a set of changed columns with at most this fraction of non-zeros uses the sparse kernel ...
SPARSE_DENSITY = 0.25
#: ... and so does one whose columns hold at most this many non-zeros each (small rings, hypercubes)
SPARSE_MAX_DEGREE = 4
#: bound on the number of analysed matrices kept (MATCHA and FedAvg draw a new matrix every round)
PLAN_CACHE_SIZE = 128
#: elements of a block of gathered rows in the sparse kernel (about 2 MiB of float32: cache-sized)
_BLOCK_ELEMENTS = 1 << 19
#: rows at least this long are combined one row at a time from views (no gathered copies)
_ROW_ELEMENTS = 1 << 14
#: rows at least this long use the chain kernel when the plan has one (shorter: the dense product)
_CHAIN_ROW_ELEMENTS = 1 << 12


def apply_mixing(state: T, S: np.ndarray) -> T:
    """Return the state after the round ``X <- X S`` (rows are nodes: ``S^T @ state``).

    Works for numpy arrays and torch tensors (S is converted to the tensor's dtype and device) in one
    matrix product, whatever the number of parameters.
    """
    if isinstance(state, np.ndarray):
        return np.asarray(S, dtype=state.dtype).T @ state
    import torch

    assert isinstance(state, torch.Tensor)
    T = np.ascontiguousarray(np.asarray(S).T)
    if not T.flags.writeable:  # a read-only matrix (a schedule's) that needed no copy: torch wants writable memory
        T = T.copy()
    St = torch.as_tensor(T, dtype=state.dtype, device=state.device)
    return St @ state  # type: ignore[return-value]


@dataclass
class _Bucket:
    """Changed columns with the same number ``k`` of non-zeros: rows ``start:stop`` of the output."""

    start: int
    stop: int
    index: np.ndarray  # (rows, k) int64: source rows
    weight: np.ndarray  # (rows, k) float64: S[source, target]


class RoundKind(Enum):
    """The structure of a round, in the order the analysis tries them (see the module docstring)."""

    IDENTITY = "identity"  # S = I: no communication
    AVERAGE = "average"  # every changed column is one weight vector w: a (weighted) mean, then a broadcast
    SPARSE = "sparse"  # few non-zeros per changed column: a neighbour gather (gossip)
    CHAIN = "chain"  # the changed columns form a chain of sparse differences (DOWNPOUR's pushes)
    DENSE = "dense"  # no usable structure: the product over the changed columns


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """How :func:`mix_rows_` applies one matrix (see the module docstring for the kernels).

    A plan is immutable and shared by every round of the same matrix; ``_cache`` keeps what is derived from
    it once (the tables as tensors of a dtype and device, the distributed engine's collectives).

    Attributes:
        kind: the structure (:class:`RoundKind`).
        n: the number of nodes.
        targets: the rows the round changes (int64, in output order); ``None`` when it is every row in
            order.
        sources: ``"average"``: the rows with non-zero weight.
        weights: ``"average"``: their weights; ``"dense"`` and ``"chain"``: ``S[:, targets]^T`` (targets x n).
        buckets: ``"sparse"``: the gather tables, one per number of non-zeros.
        chain: ``"chain"``: per link ``(source rows, weights, target rows)``: the first link's column, then
            each difference, and the rows that take the running sum after it.
        col_abs_max: ``max_i sum_j |S[j, i]|`` (NaN / inf iff S holds a non-finite entry).
    """

    kind: RoundKind
    n: int
    targets: np.ndarray | None = None
    sources: np.ndarray | None = None
    weights: np.ndarray | None = None
    buckets: tuple[_Bucket, ...] = ()
    chain: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()
    col_abs_max: float = 1.0
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def touched(self) -> int:
        """How many rows the round changes."""
        if self.kind is RoundKind.IDENTITY:
            return 0
        return self.n if self.targets is None else int(self.targets.size)

    def derived(self, key: Any, build: Any) -> Any:
        """``build()``, computed once per plan and ``key`` (e.g. a communicator's lowering of the plan)."""
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = build()
        return got

    def matrix(self) -> np.ndarray:
        """The n x n matrix S this plan applies (column convention), rebuilt from the plan's own tables."""
        S = np.eye(self.n)
        if self.kind is RoundKind.IDENTITY:
            return S
        targets = np.arange(self.n) if self.targets is None else self.targets
        if self.kind is RoundKind.AVERAGE:
            assert self.weights is not None
            w = np.zeros(self.n)
            w[np.arange(self.n) if self.sources is None else self.sources] = self.weights
            S[:, targets] = w[:, None]
        elif self.kind is RoundKind.SPARSE:
            for bk in self.buckets:
                cols = targets[bk.start : bk.stop]
                S[:, cols] = 0.0
                for r, c in enumerate(cols):
                    S[bk.index[r], c] = bk.weight[r]
        else:
            assert self.weights is not None
            S[:, targets] = self.weights.T
        return S

    def _on(self, like: Any) -> dict[str, Any]:
        """The plan's tables as tensors of ``like``'s dtype and device (converted once)."""
        import torch

        key = (like.dtype, like.device)
        got = self._cache.get(key)
        if got is None:
            dev = like.device

            def idx(a: np.ndarray | None) -> Any:
                return None if a is None else torch.as_tensor(a, dtype=torch.long, device=dev)

            def val(a: np.ndarray | None) -> Any:
                return None if a is None else torch.as_tensor(a, dtype=like.dtype, device=dev)

            got = {
                "targets": idx(self.targets),
                "sources": idx(self.sources),
                "weights": val(self.weights),
                "buckets": [(b.start, b.stop, idx(b.index), val(b.weight)) for b in self.buckets],
            }
            self._cache[key] = got
        return got

    def apply_(self, rows: Any) -> Any:
        """Apply the round to ``rows`` (a torch tensor of shape (n, d), any strides) in place."""
        import torch

        if rows.shape[0] != self.n:
            raise ValueError(f"the matrix is {self.n}x{self.n} but the state has {rows.shape[0]} rows")
        if self.kind is RoundKind.IDENTITY or rows.shape[1] == 0:
            return rows
        t = self._on(rows)
        targets = t["targets"]
        if self.kind is RoundKind.AVERAGE:
            y = self.average(rows)
            if targets is None:
                rows.copy_(y.expand_as(rows))
            else:
                rows.index_copy_(0, targets, y.expand(targets.numel(), rows.shape[1]))
            return rows
        if self.kind is RoundKind.SPARSE:
            self._gather_(rows, t)
            return rows
        if self.kind is RoundKind.CHAIN and rows.shape[1] >= _CHAIN_ROW_ELEMENTS:
            self._chain_(rows)
            return rows
        out = torch.matmul(t["weights"], rows)
        if targets is None:
            rows.copy_(out)
        else:
            rows.index_copy_(0, targets, out)
        return rows

    def average(self, rows: Any) -> Any:
        """``"average"``: the (1, d) row every changed row receives (a new tensor; ``rows`` is not changed)."""
        import torch

        t = self._on(rows)
        src = t["sources"]
        R = rows if src is None else rows.index_select(0, src)
        return torch.matmul(t["weights"].unsqueeze(0), R)

    def _chain_(self, rows: Any) -> None:
        """The chain kernel, in place (see the module docstring): one running row, updated link by link."""
        R = rows.unbind(0)
        y = None
        for src, w, tg in self.chain:
            terms = zip(src.tolist(), w.tolist(), strict=True)
            if y is None:
                y = rows.new_zeros(rows.shape[1])
            for j, wj in terms:
                y.add_(R[j], alpha=wj)
            for i in tg.tolist():
                R[i].copy_(y)

    def _blocks(self, block: int) -> list[tuple[int, int, int, list[int]]]:
        """Blocks of output positions ``(bucket, lo, hi, released)`` in processing order: after a block is
        computed, the blocks listed in ``released`` are written back (no later block reads their old rows)."""
        blocks: list[tuple[int, int, int]] = []
        for k, bk in enumerate(self.buckets):
            for lo in range(0, bk.stop - bk.start, block):
                blocks.append((k, lo, min(lo + block, bk.stop - bk.start)))
        targets = np.arange(self.n) if self.targets is None else self.targets
        last_read = np.full(self.n, -1, dtype=np.int64)
        for c, (k, lo, hi) in enumerate(blocks):
            last_read[np.unique(self.buckets[k].index[lo:hi])] = c  # blocks run in order: the last one wins
        release: list[list[int]] = [[] for _ in blocks]
        for c, (k, lo, hi) in enumerate(blocks):
            start = self.buckets[k].start
            release[max(c, int(last_read[targets[start + lo : start + hi]].max()))].append(c)
        return [(k, lo, hi, release[c]) for c, (k, lo, hi) in enumerate(blocks)]

    def _program(self) -> list[tuple[int, bool, list[tuple[int, float, bool]], list[int]]]:
        """The row-at-a-time in-place program: per changed row ``i`` (in output order) ``(i, save, terms,
        free)``. ``save``: keep a copy of the old row ``i`` before overwriting it (a later row reads it);
        ``terms``: ``(j, S[j, i], from_saved)`` with the row's own term first; ``free``: saved copies no
        longer read after this row."""
        targets = np.arange(self.n) if self.targets is None else self.targets
        pos = np.full(self.n, -1, dtype=np.int64)
        pos[targets] = np.arange(targets.size)
        last_reader = np.full(self.n, -1, dtype=np.int64)
        rows_terms: list[list[tuple[int, float]]] = []
        for bk in self.buckets:
            for r in range(bk.stop - bk.start):
                p = bk.start + r
                i = int(targets[p])
                terms = sorted(zip(bk.index[r].tolist(), bk.weight[r].tolist(), strict=True), key=lambda t: t[0] != i)
                rows_terms.append(terms)
                for j, _ in terms:
                    if j != i:
                        last_reader[j] = max(last_reader[j], p)
        frees: list[list[int]] = [[] for _ in rows_terms]
        program = []
        for p, terms in enumerate(rows_terms):
            i = int(targets[p])
            save = bool(last_reader[i] > p)
            if save:
                frees[int(last_reader[i])].append(i)
            program.append((i, save, [(j, w, bool(0 <= pos[j] < p)) for j, w in terms], frees[p]))
        return program

    def _gather_(self, rows: Any, t: dict[str, Any]) -> None:
        """The sparse kernel, in place (see the module docstring)."""
        import torch

        d = rows.shape[1]
        if d >= _ROW_ELEMENTS:  # long rows: one row at a time, in place, from views of the source rows
            prog = self._cache.get("program")
            if prog is None:
                prog = self._cache["program"] = self._program()
            saved: dict[int, Any] = {}
            R = rows.unbind(0)  # every row's view in one call
            for i, save, terms, free in prog:
                ri = R[i]
                if save:
                    saved[i] = ri.clone()
                if not terms:  # a zero column: the row becomes zero
                    ri.zero_()
                    continue
                j, w, from_saved = terms[0]
                if j == i:
                    ri.mul_(w)
                else:
                    torch.mul(saved[j] if from_saved else R[j], w, out=ri)
                for j, w, from_saved in terms[1:]:
                    ri.add_(saved[j] if from_saved else R[j], alpha=w)
                for j in free:
                    del saved[j]
            return
        # short rows: blocks of rows gathered with index_select, written back when no longer read
        block = max(1, _BLOCK_ELEMENTS // max(d, 1))
        key = ("blocks", block)
        sched = self._cache.get(key)
        if sched is None:
            sched = self._cache[key] = self._blocks(block)
        targets = t["targets"]
        buckets = t["buckets"]
        held: dict[int, Any] = {}
        for c, (k, lo, hi, released) in enumerate(sched):
            index, weight = buckets[k][2], buckets[k][3]
            if index.shape[1] == 0:  # zero columns
                o = rows.new_zeros((hi - lo, d))
            else:
                o = torch.index_select(rows, 0, index[lo:hi, 0])
                o.mul_(weight[lo:hi, 0:1])
            for j in range(1, index.shape[1]):
                o.addcmul_(rows.index_select(0, index[lo:hi, j]), weight[lo:hi, j : j + 1])
            held[c] = o
            for r_c in released:
                rk, rlo, rhi = sched[r_c][:3]
                a = self.buckets[rk].start + rlo
                out = held.pop(r_c)
                if targets is None:
                    rows[a : a + out.shape[0]].copy_(out)
                else:
                    rows.index_copy_(0, targets[a : a + out.shape[0]], out)
        assert not held


def _analyse_nz(n: int, nz: np.ndarray, vals: np.ndarray) -> RoundPlan:
    """:func:`_analyse` from the non-zero entries alone (row-major flat positions ``nz``, values ``vals``)."""
    r, c = np.divmod(nz, n)
    counts = np.bincount(c, minlength=n)
    col_abs_max = float(np.bincount(c, weights=np.abs(vals), minlength=n).max()) if n else 0.0
    if not np.isfinite(vals).all():
        col_abs_max = float(np.abs(vals).sum())  # NaN or inf: the overflow guard refuses the matrix
    unit = np.zeros(n, dtype=bool)
    unit[c[(r == c) & (vals == 1.0)]] = True
    ident = (counts == 1) & unit
    changed = np.flatnonzero(~ident)
    if changed.size == 0:
        return RoundPlan(RoundKind.IDENTITY, n, col_abs_max=col_abs_max)
    keep = ~ident[c]
    r2, c2, v2 = r[keep], c[keep], vals[keep]
    order = np.lexsort((r2, c2))  # column-major: by column, then row
    r2, c2, v2 = r2[order], c2[order], v2[order]
    deg = counts[changed]
    starts = np.concatenate(([0], np.cumsum(deg)[:-1]))
    targets = None if changed.size == n else changed.astype(np.int64)
    k0 = int(deg[0])
    if np.all(deg == k0):
        rr, vv = r2.reshape(changed.size, k0), v2.reshape(changed.size, k0)
        if np.all(rr == rr[:1]) and np.all(vv == vv[:1]):
            sources = None if k0 == n else rr[0].astype(np.int64)
            return RoundPlan(RoundKind.AVERAGE, n, targets=targets, sources=sources, weights=vv[0].copy(),
                             col_abs_max=col_abs_max)
    if int(deg.max()) <= SPARSE_MAX_DEGREE or r2.size <= SPARSE_DENSITY * n * changed.size:
        ordc = np.argsort(deg, kind="stable")
        buckets = []
        pos = 0
        for k in np.unique(deg):
            cols = ordc[deg[ordc] == k]
            at = starts[cols][:, None] + np.arange(int(k))[None, :]
            buckets.append(_Bucket(pos, pos + cols.size, r2[at].astype(np.int64), v2[at].astype(np.float64)))
            pos += cols.size
        out_targets = changed[ordc].astype(np.int64)
        sparse_targets = None if np.array_equal(out_targets, np.arange(n)) else out_targets
        return RoundPlan(RoundKind.SPARSE, n, targets=sparse_targets, buckets=tuple(buckets), col_abs_max=col_abs_max)
    W = np.zeros((changed.size, n))
    W[np.repeat(np.arange(changed.size), deg), r2] = v2
    return _chain_or_dense(n, changed, targets, W, col_abs_max)


def _chain_or_dense(n: int, changed: np.ndarray, targets: np.ndarray | None, W: np.ndarray,
                    col_abs_max: float) -> RoundPlan:
    """``"chain"`` when the changed columns (rows of ``W`` = ``S[:, changed]^T``) form one, else ``"dense"``."""
    dense = RoundPlan(RoundKind.DENSE, n, targets=targets, weights=np.ascontiguousarray(W), col_abs_max=col_abs_max)
    if changed.size < 2 or not np.isfinite(W).all():
        return dense
    uniq, inverse = np.unique(W, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort((uniq != 0).sum(axis=1), kind="stable")
    U = uniq[order]
    links = np.concatenate((U[:1], np.diff(U, axis=0)))
    if int((links != 0).sum()) > SPARSE_DENSITY * n * changed.size:
        return dense
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    link_of = rank[inverse]  # the link after which each changed column is complete
    written = np.zeros(n, dtype=bool)
    chain = []
    for t in range(U.shape[0]):
        src = np.flatnonzero(links[t])
        if written[src].any():  # a difference would read a row an earlier link already overwrote
            return dense
        tg = changed[link_of == t].astype(np.int64)
        written[tg] = True
        chain.append((src.astype(np.int64), links[t, src].astype(np.float64), tg))
    return RoundPlan(RoundKind.CHAIN, n, targets=targets, weights=np.ascontiguousarray(W), chain=tuple(chain),
                     col_abs_max=col_abs_max)


def _analyse(S: np.ndarray) -> RoundPlan:
    n = S.shape[0]
    col_abs_max = float(np.abs(S).sum(axis=0).max()) if n else 0.0
    changed = np.flatnonzero((S != np.eye(n)).any(axis=0))
    if changed.size == 0:
        return RoundPlan(RoundKind.IDENTITY, n, col_abs_max=col_abs_max)
    all_rows = changed.size == n
    Sc = S[:, changed]
    targets = None if all_rows else changed.astype(np.int64)
    if np.all(Sc == Sc[:, :1]):
        w = Sc[:, 0]
        nz = np.flatnonzero(w)
        sources = None if nz.size == n else nz.astype(np.int64)
        return RoundPlan(RoundKind.AVERAGE, n, targets=targets, sources=sources, weights=w[nz].copy(),
                         col_abs_max=col_abs_max)
    nnz = Sc != 0
    degree = nnz.sum(axis=0)
    if int(degree.max()) <= SPARSE_MAX_DEGREE or nnz.sum() <= SPARSE_DENSITY * n * changed.size:
        order = np.argsort(degree, kind="stable")
        buckets = []
        pos = 0
        for k in np.unique(degree):
            cols = order[degree[order] == k]
            index = np.zeros((cols.size, int(k)), dtype=np.int64)
            weight = np.zeros((cols.size, int(k)), dtype=np.float64)
            for r, c in enumerate(cols):
                src = np.flatnonzero(nnz[:, c])
                index[r] = src
                weight[r] = Sc[src, c]
            buckets.append(_Bucket(pos, pos + cols.size, index, weight))
            pos += cols.size
        out_targets = changed[order].astype(np.int64)
        if np.array_equal(out_targets, np.arange(n)):
            sparse_targets = None
        else:
            sparse_targets = out_targets
        return RoundPlan(RoundKind.SPARSE, n, targets=sparse_targets, buckets=tuple(buckets), col_abs_max=col_abs_max)
    return _chain_or_dense(n, changed, targets, np.ascontiguousarray(Sc.T), col_abs_max)


_PLANS: OrderedDict[tuple[tuple[int, ...], str, bytes], RoundPlan] = OrderedDict()
#: plans of immutable matrices by identity: ``id(S) -> (weak reference to S, plan)``
_FROZEN: OrderedDict[int, tuple[weakref.ref[np.ndarray], RoundPlan]] = OrderedDict()


def _immutable(S: np.ndarray) -> bool:
    """Whether no one can change ``S``'s entries: it and every array it views are read-only, down to an
    array that owns its memory (a schedule's fixed matrices, :class:`~coopsgd.topology.MixingMatrix`)."""
    a: Any = S
    while True:
        if not isinstance(a, np.ndarray) or a.flags.writeable:
            return False
        if a.base is None:
            return bool(a.flags.owndata)
        a = a.base


def round_plan(S: np.ndarray) -> RoundPlan:
    """The kernel for ``S`` (column convention), analysed once per distinct matrix (bounded LRU cache).

    An immutable matrix (read-only float64, owning its memory or viewing only read-only arrays that do:
    what :class:`~coopsgd.algorithms.schedules.PeriodicSchedule` and :class:`~coopsgd.topology.MixingMatrix`
    hold) is found again by its identity in O(1); any other by a digest of its entries (O(n^2)).
    """
    frozen = isinstance(S, np.ndarray) and S.dtype == np.float64 and S.flags.c_contiguous and _immutable(S)
    if frozen:
        hit = _FROZEN.get(id(S))
        if hit is not None and hit[0]() is S:
            _FROZEN.move_to_end(id(S))
            return hit[1]
    plan = _digest_plan(S)
    if frozen:
        _FROZEN[id(S)] = (weakref.ref(S), plan)
        if len(_FROZEN) > PLAN_CACHE_SIZE:
            _FROZEN.popitem(last=False)
    return plan


def _digest_plan(S: np.ndarray) -> RoundPlan:
    """:func:`round_plan` through the cache keyed by a digest of S's entries."""
    S = np.ascontiguousarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"a mixing matrix must be square, got shape {S.shape}")
    # the key is a digest of S; of its non-zero entries (positions and values, which determine S) when
    # they are few, which is cheaper than hashing all n^2 entries
    flat = S.reshape(-1)
    n = S.shape[0]
    live = np.flatnonzero(S.any(axis=1))  # rows holding a non-zero (NaN counts): FedAvg's S has c m + 1
    if live.size == n:
        nz = np.flatnonzero(flat != 0)  # a bool mask's flatnonzero is several times faster than a float's
    else:
        rr, cc = np.nonzero(S[live])
        nz = live[rr] * n + cc
    sparse = 4 * nz.size <= flat.size
    if sparse:
        vals = flat[nz]
        key = (S.shape, "nz", hashlib.sha256(nz.tobytes() + vals.tobytes()).digest())
    else:
        key = (S.shape, "all", hashlib.sha256(S.data).digest())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _analyse_nz(S.shape[0], nz, vals) if sparse else _analyse(S)
        _PLANS[key] = plan
        if len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def average_plan(n: int, sources: np.ndarray, weights: np.ndarray) -> RoundPlan:
    """The plan of ``S = w 1^T`` (every column the vector ``w``, non-zero exactly at the sorted rows
    ``sources`` with the finite non-zero ``weights``) in O(len(sources)), without S: the plan
    :func:`round_plan` finds for the same matrix."""
    sources = np.asarray(sources, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    k = sources.size
    # the column abs-sum as the analysis adds it (in row order)
    col_abs_max = float(np.bincount(np.zeros(k, dtype=np.int64), weights=np.abs(weights), minlength=1)[0])
    targets = None
    if k == 1 and weights[0] == 1.0:  # w = e_j: column j is the identity's, the others change
        if n == 1:
            return RoundPlan(RoundKind.IDENTITY, n, col_abs_max=col_abs_max)
        targets = np.delete(np.arange(n, dtype=np.int64), int(sources[0]))
    return RoundPlan(RoundKind.AVERAGE, n, targets=targets, sources=None if k == n else sources.copy(),
                     weights=weights.copy(), col_abs_max=col_abs_max)


@dataclass(frozen=True, eq=False)
class Round:
    """One communication round as every communicator receives it: the round's structure (``plan``, shared
    by every round of the same matrix) and the :class:`~coopsgd.algorithms.schedules.Mix` it came from
    (``None`` for a bare matrix). Built by :func:`plan_round`, the one planner of every engine."""

    plan: RoundPlan
    mix: Mix | None = None
    source: np.ndarray | None = None  # the bare matrix (when ``mix`` is None)

    @property
    def kind(self) -> RoundKind:
        return self.plan.kind

    @property
    def n(self) -> int:
        return self.plan.n

    @property
    def matrix(self) -> np.ndarray:
        """S itself (the Mix's, built on first read when it carries only its structure)."""
        if self.mix is not None:
            return self.mix.matrix
        if self.source is not None:
            return self.source
        return self.plan.matrix()

    @property
    def communicates(self) -> bool:
        """Whether the schedule counts this round as network traffic (a bare matrix: S != I)."""
        return self.mix.communicates if self.mix is not None else self.plan.kind is not RoundKind.IDENTITY

    @property
    def outer(self) -> bool:
        """Whether the round ends with the auxiliary's outer step (DiLoCo, SlowMo: ``info["outer"]``)."""
        return self.mix is not None and bool(self.mix.info.get("outer"))


def plan_round(source: Mix | np.ndarray) -> Round:
    """The one planner: the :class:`Round` of a :class:`~coopsgd.algorithms.schedules.Mix` or of a bare
    matrix S (column convention), for every engine and communicator.

    A Mix that carries its ``structure`` (FedAvg's :class:`~coopsgd.algorithms.schedules.Averaging`) is
    planned from it in O(its non-zeros), its dense matrix neither built nor read; any other matrix through
    :func:`round_plan` (cached: an immutable matrix by identity, any other by a digest of its entries).
    """
    if isinstance(source, Mix):
        st = source.structure
        plan = average_plan(st.n, st.sources, st.weights) if st is not None else round_plan(source.matrix)
        return Round(plan, source)
    return Round(round_plan(source), None, source)


def mix_rows_(rows: Any, S: np.ndarray, plan: RoundPlan | None = None) -> Any:
    """Apply the round ``X <- X S`` to ``rows`` (a torch tensor, nodes as rows) in place; returns ``rows``.

    Same result as ``rows.copy_(apply_mixing(rows, S))`` (up to the order of the sums), with the cheapest
    exact kernel for the structure of S (see the module docstring). ``plan`` skips the cache look-up.
    """
    return (plan or round_plan(S)).apply_(rows)
