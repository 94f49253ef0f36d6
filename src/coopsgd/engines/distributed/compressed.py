"""Compressed rounds on the distributed engine (SPEC §11): the compressor's payload is what goes on the wire.

One rank is one node: rank r holds worker r's row and the auxiliaries (replicated on every rank). A spec
with compression (``spec.compressed``) sends its rounds through :class:`CompressedMixer`, a
:class:`~coopsgd.engines.base.Communicator` around the engine's
:class:`~coopsgd.engines.distributed.communicator.Mixer` (the engine's round kernel and the
:class:`~coopsgd.wrapper.CooperativeSGD` wrapper hold it in place of the Mixer). It runs the definitions of
the simulator's :class:`~coopsgd.engines.compressed.CompressedRounds` node by node, with the same compressors,
the same draws (keyed by (seed, c, node), c counting the compressed rounds) and the same arithmetic up to the
order of a sum, so the iterates equal the simulator's (float64: to 1e-10, ``tests/integration/test_compressed_distributed.py``):

``average`` (sync, local SGD, FedAvg with sampled clients, the outer round of DiLoCo / SlowMo)
    every source node i sends Q(x_i − x_ref + e_i) (error feedback e_i ← c_i − Q(c_i) kept by its rank);
    every rank adds every payload into x_ref (:meth:`~coopsgd.compression.Compressor.decompress_add`, in the
    sources' order: x_ref Σ w_i + w_1 Q(c_1) + w_2 Q(c_2) + ..., the simulator's product ``w @ decoded``
    summed in sequence, equal to it within rounding), the round's result for every participant and the new
    x_ref. Every rank keeps the same
    x_ref per set of participants. Auxiliary sources (a round that reads z) are encoded by every rank
    itself (each holds z and its residual): nothing travels for them.
``gossip`` (dpsgd, decentralized_periodic, matcha, choco, SlowMo's gossip base)
    CHOCO-SGD: every changed worker i sends q_i = Q(x_i − x̂_i) (an unbiased Q used as Q/(1 + ω)); every rank
    keeps the public copies x̂ of its own node and of the nodes it reads, adds the q_j it receives, and moves
    its worker by γ (Σ_j S[j, r] x̂_j − x̂_r). With ``none`` the round is the uncompressed one (γ = 1: D-PSGD's
    own; else x ← x + γ (X S − x)).

``elastic`` (EASGD, generalized elastic averaging; :func:`~coopsgd.algorithms.communication.elastic_of`)
    every rank holds every auxiliary node, so each computes every centre's reply ρ_c = Q(z_c − ẑ_c) itself
    (the same bits everywhere: nothing travels for it) and keeps the copies ẑ; every worker another node reads
    sends Q(x_i − ẑ_{c(i)} + e_i) (error feedback on its rank); then each rank sets its changed rows to
    S[j, j] x_j + Σ_{i≠j} S[i, j] v_i. Hierarchical averaging: the engine places its group centres on their
    groups' ranks, so each reply is encoded by its centre's host (which holds z_c) and broadcast; every rank
    keeps every copy ẑ and updates the rows it holds.
``leader`` (LSGD)
    the slots (each leader's copy) are on every rank: each leader's rank encodes Q(x_L − s) and broadcasts the
    packed payload (one broadcast per slot); every rank adds them to its slots and pulls its worker toward
    them. Between refreshes nothing is sent.
``pushes`` (DOWNPOUR with ``downpour_order="schedule"``)
    each worker pushes once a round, and its push Q(x_i − b_i + e_i) depends on its own row and copy b_i only:
    every rank encodes its push at once, one all-gather moves them, and every rank (each holds z and every
    b_i) replays them in the schedule's order with the replies Q(z − b_i), exactly the simulator's sequence.
    The real asynchronous order (``downpour_order="async"``, a parameter server on rank 0 applying pushes as
    they arrive) sends dense rows and is refused with a compressor.

The wire. A node's payload (:attr:`coopsgd.compression.Payload.parts`: int8 / fp16 / bf16 values, top-k
values and indices, sign bits and scale, qsgd levels and norm, PowerSGD's factors; ``randk`` sends its
values only, every receiver draws the indices from (seed, c, sender)) is packed into one uint8 buffer of
exactly ``payload_bytes(width, dtype)`` bytes, which one collective moves:

* averaging round where every worker sends: ONE all-gather of the packed payloads; sampled clients
  (FedAvg): one broadcast per sending client. PowerSGD's factors are gathered too: each node
  orthogonalises its own M_i Q_i, so Σ_i w_i P_i Q_iᵀ is not a product of sums and no all-reduce can form
  it (an all-reduce of P and Q is the shared-factor variant of Vogels et al., a different compressor from
  the one the simulator defines). ``fp16`` / ``bf16`` payloads are gathered as well (a reduction in 16
  bits would round the sum, the simulator adds the decoded payloads in the rows' dtype);
* gossip round: point-to-point (batched isend / irecv) from each sender to the ranks that keep its public
  copy -- the nodes that read it in some gossip round of the schedule (the union of its graphs: the
  topology for D-PSGD and CHOCO, the base graph for MATCHA). A schedule whose graphs are not known in
  advance (a custom random one) is served by an all-gather, every rank keeping every public copy.

Accounting. ``bytes_model`` (and the engine's emulated α–β link, :class:`~coopsgd.engines.distributed.communicator.NetEmulation`)
charge a compressed round exactly what the simulator's clock charges
(:meth:`~coopsgd.engines.simulator.clock.SimClock.round_costs` with the payload size:
:func:`~coopsgd.algorithms.communication.compressed_round_cost`); ``bytes_sent`` counts what this rank
put on the wire: (m − 1) p for an all-gather, p (m − 1)/m per broadcast, p per neighbour. They agree with
the model for an averaging round's all-gather (every compressor's, ``fp16`` and ``bf16`` included: the model
charges the all-gather that is performed); the model's neighbour rounds count 2 · deg · p (Table 3: sent and
received). Elastic rounds and pushes put (m − 1) p per rank on the wire (the all-gather of the uploads or
pushes; the replies of the replicated centre or server are computed where they are used), where the model
charges the busiest node of a centre that is one node (2m payloads through EASGD's centre or DOWNPOUR's
server: :func:`~coopsgd.algorithms.communication.elastic_round_cost`, :func:`~coopsgd.algorithms.communication.push_round_cost`).

State per rank (its checkpoint's ``compression`` entry, restored by the NaN-skip rollback): the residuals
of the rows it encodes (its worker, the auxiliaries), its public copies x̂, the centres' copies ẑ (``centres``,
absent before the first elastic round), PowerSGD's warm-start factors, the x_ref rows and the round count.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.communication import (
    REDUCIBLE,
    Compression,
    ElasticExchange,
    LeaderRound,
    elastic_round_cost,
    exchange_of,
    push_round_cost,
    round_kinds,
)
from coopsgd.algorithms.schedules import MatchaSchedule, Schedule
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.compression import Compressor, Payload
from coopsgd.engines.compressed import elastic_exchange, leader_round, push_order, round_exchange
from coopsgd.engines.distributed.collectives import aux_placement
from coopsgd.engines.mixing import Round, RoundKind, RoundPlan
from coopsgd.engines.simulator.clock import SimClock, round_senders
from coopsgd.errors import ConfigError

__all__ = ["CompressedMixer", "check_distributed_compression", "gossip_graph", "average_start", "TRANSPORT_METHODS"]

#: What a communicator needs besides the engines' :class:`~coopsgd.engines.base.Communicator` to carry
#: compressed payloads (:class:`~coopsgd.engines.distributed.communicator.Mixer` has them).
TRANSPORT_METHODS = ("gather_bytes", "broadcast_bytes", "exchange_bytes", "charge")

#: Steps of a schedule whose finite set of matrices is looked up (its gossip graph).
_SAMPLE_STEPS = 4096

#: The round kinds the distributed engine compresses (:func:`~coopsgd.algorithms.communication.round_kinds`).
_KINDS = {"identity", "average", "gossip", "elastic", "pushes"}


def check_distributed_compression(spec: AlgorithmSpec, *, asynchronous: bool = False) -> None:
    """Refuse (``ConfigError`` naming ``compress``) a compressed spec whose rounds the distributed engine cannot
    send compressed: DOWNPOUR's pushes in the real asynchronous order
    (``asynchronous``: ``downpour_order="async"``), auxiliaries placed on subsets of ranks with rounds other
    than elastic ones, and rounds of no compressible kind."""
    comp = spec.compressed
    if comp is None or not comp.compresses:
        return  # none with gamma != 1: only gossip rounds change, and every round can take that
    if spec.schedule.needs_losses:
        return  # LSGD: its slots are on every rank (its rounds need losses: no placement), the leaders broadcast
    if spec.schedule.sequential and asynchronous:
        raise ConfigError.invalid(
            "compress", comp.compress, "compressed pushes run in the schedule's order (downpour_order='schedule'); "
            "the asynchronous parameter server (downpour_order='async') sends dense rows")
    kinds = round_kinds(copy.deepcopy(spec.schedule), spec.workers)
    placed = spec.outer is None and aux_placement(spec) is not None  # (an outer step's z: on every rank)
    if placed and not kinds <= {"identity", "elastic"}:
        raise ConfigError.invalid(
            "compress", comp.compress, f"preset {spec.name!r} keeps auxiliaries on subsets of ranks and has rounds "
            "other than elastic ones: compressed rounds with placed auxiliaries are elastic rounds only on the "
            "distributed engine; run it on the simulator or the reference engine")
    if not kinds <= _KINDS:
        raise ConfigError.invalid(
            "compress", comp.compress, f"preset {spec.name!r} has rounds that are neither averages, gossip among the "
            "workers, elastic rounds nor sequential pushes: use compress=none")


def gossip_graph(schedule: Schedule, workers: int) -> np.ndarray | None:
    """(m, m) bool: ``[j, i]`` when worker i reads worker j's public copy in some gossip round of ``schedule``
    (the union of its gossip graphs, diagonal excluded); ``None`` when the graphs are not known in advance."""
    m = workers
    mats = schedule.matrices(_SAMPLE_STEPS)
    if mats is not None:
        G = np.zeros((m, m), dtype=bool)
        for S in mats:
            if exchange_of(S, m) == "gossip":
                G |= np.asarray(S)[:m, :m] != 0
    elif isinstance(schedule, MatchaSchedule):  # random matchings of a known base graph
        G = (schedule.laplacians != 0).any(axis=0)[:m, :m].copy()
    else:
        return None
    np.fill_diagonal(G, False)
    return G


def _participants(plan: RoundPlan) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """An averaging round's participants (sorted) and the key of their x_ref (``None``: every node), as the
    simulator's stage keys them (targets and sources together)."""
    n = plan.n
    if plan.targets is None or plan.sources is None:
        return np.arange(n, dtype=np.int64), None
    rows = np.union1d(plan.targets, plan.sources).astype(np.int64)
    return rows, None if rows.size == n else tuple(int(r) for r in rows)


def _gossip_scale(compressor: Compressor, d: int) -> float:
    """CHOCO's use of an unbiased compressor: Q/(1 + ω); 1 for biased ones."""
    omega = compressor.omega(d)
    return 1.0 if omega is None else 1.0 / (1.0 + float(omega))


@dataclass(frozen=True)
class _Part:
    """One wire tensor of a node's payload: its name, dtype, shape per node and bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _span(rows: Sequence[int]) -> slice | None:
    """``rows`` as a slice when they are consecutive and ascending, else ``None``."""
    if not rows or list(rows) != list(range(rows[0], rows[0] + len(rows))):
        return None
    return slice(rows[0], rows[0] + len(rows))


def _pack(parts: Mapping[str, Tensor], row: int) -> Tensor:
    """Node ``row``'s wire tensors as one uint8 buffer (the parts' bytes one after the other)."""
    pieces = [t[row].detach().contiguous().reshape(-1).view(torch.uint8) for t in parts.values()]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)


def _unpack(buf: Tensor, fmt: Sequence[_Part]) -> dict[str, Tensor]:
    """(R, N) packed payloads back to the wire tensors, each (R, *shape)."""
    R = buf.shape[0]
    out: dict[str, Tensor] = {}
    at = 0
    for p in fmt:
        raw = buf[:, at : at + p.nbytes]
        if raw.storage_offset() or not raw.is_contiguous():  # a fresh buffer: viewable as any dtype (one row too)
            raw = raw.clone(memory_format=torch.contiguous_format)
        out[p.name] = raw.reshape(-1).view(p.dtype).reshape((R, *p.shape))
        at += p.nbytes
    return out


class CompressedMixer:
    """A rank's compressed rounds (see the module docstring): a Communicator around ``comm``.

    Args:
        comm: the rank's communicator: the :class:`~coopsgd.engines.distributed.communicator.Mixer` (or any
            :class:`~coopsgd.engines.base.Communicator` with :data:`TRANSPORT_METHODS`, ``rank`` and ``m``).
        compression: the spec's compression (:attr:`AlgorithmSpec.compressed`).
        spec: the algorithm (its workers, auxiliaries and schedule).
        width: the columns a round mixes (the row a node sends).
        params: the model's parameter count d (the clock's unit, as the simulator's).
        dtype, device: of the rows.
        seed: the run's seed (keys the compressors' draws).
        layout: the shapes of the tensors a row is made of (PowerSGD compresses each matrix-shaped one).
        start: (width,) x_ref before the first averaging round (the common start).
    """

    def __init__(self, comm: Any, compression: Compression, *, spec: AlgorithmSpec, width: int, params: int,
                 dtype: torch.dtype, device: torch.device, seed: int, layout: Sequence[Sequence[int]] | None,
                 start: Tensor) -> None:
        missing = [name for name in (*TRANSPORT_METHODS, "rank", "m") if not hasattr(comm, name)]
        if missing:
            raise ConfigError.invalid("communicator", type(comm).__name__, "compressed rounds need a communicator "
                                      f"that moves packed payloads (missing: {', '.join(missing)})")
        #: auxiliaries held by subsets of ranks (hierarchical averaging's group centres): elastic rounds only
        self.placed = bool(getattr(comm, "placed", False))
        self.comm = comm
        self.compression = compression
        self.compressor: Compressor = compression.compressor(layout)
        self.compresses = compression.compresses
        self.feedback = compression.feedback(self.compressor)
        self.gamma = compression.gamma(self.compressor, width)
        self.rank, self.m, self.v = int(comm.rank), spec.workers, spec.auxiliaries
        self.n = self.m + self.v
        self.width, self.dtype, self.device, self.seed = int(width), dtype, device, int(seed)
        self.gossip_scale = _gossip_scale(self.compressor, self.width)
        self.row_bytes = self.compressor.payload_bytes(self.width, dtype)
        self.reducible = self.compressor.name in REDUCIBLE
        self.clock = SimClock().bind(self.m, int(params), torch.empty((), dtype=dtype).element_size())
        self.start = start.detach().reshape(1, self.width).to(device, dtype).clone()
        #: the nodes of this rank's rows: its worker, then the auxiliaries
        self.nodes = (self.rank, *range(self.m, self.n))
        # the wire format of one payload (names, dtypes, shapes), from a zero row
        probe = self.compressor.compress(torch.zeros((1, self.width), dtype=dtype, device=device), round=0,
                                         nodes=[0], seed=self.seed)
        self.format = tuple(_Part(k, t.dtype, tuple(t.shape[1:]), (t.numel() * t.element_size()))
                            for k, t in probe.parts.items())
        if sum(p.nbytes for p in self.format) != self.row_bytes:  # never a payload of another size than charged
            raise RuntimeError(f"{self.compressor.spec}: packed payload of {sum(p.nbytes for p in self.format)} "
                               f"bytes, payload_bytes says {self.row_bytes}")
        graph = gossip_graph(spec.schedule, self.m) if self.compresses else None
        self.graph = graph
        if graph is None:  # every rank keeps every public copy (all-gather)
            self.watchers: tuple[int, ...] = tuple(j for j in range(self.m) if j != self.rank)
            self.copy_nodes: tuple[int, ...] = tuple(range(self.m))
        else:
            self.watchers = tuple(int(i) for i in np.flatnonzero(graph[self.rank]))
            self.copy_nodes = tuple(sorted({self.rank, *(int(j) for j in np.flatnonzero(graph[:, self.rank]))}))
        self._copy_row = {j: i for i, j in enumerate(self.copy_nodes)}
        self.refs: dict[tuple[int, ...] | None, Tensor] = {}
        self.residual: Tensor | None = None  # (1 + v, width): the rows this rank encodes in averaging rounds
        self.copies: Tensor | None = None  # (len(copy_nodes), width): the public copies x_hat this rank keeps
        self.factors: tuple[Tensor, ...] | None = None  # PowerSGD: one (1 + v, m_t, R) per compressed matrix
        self.centres: Tensor | None = None  # (v, width): elastic rounds' public copies z_hat of the auxiliaries
        self.calls = 0  # compressed rounds so far (keys the draws)

    # -- the Communicator protocol ---------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return bool(self.comm.pending)

    def finalize(self) -> None:
        self.comm.finalize()

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        return np.asarray(self.comm.gather_floats(values))

    def communicate(self, rows: Tensor, rnd: Round, *, overlap: bool = False) -> None:
        """Round ``rnd`` on ``rows`` (this rank's worker, then the auxiliaries; the mixed columns) in place."""
        kind = round_exchange(rnd, self.m)
        if kind == "identity":
            return
        self.comm.finalize()
        if self.compresses and (lead := leader_round(rnd, self.m)) is not None:
            if lead.refresh:
                self._leader(rows, lead)
            else:  # the pull toward the slot every rank holds: nothing is sent
                self.comm.communicate(rows, rnd, overlap=overlap)
            return
        if kind == "gossip":
            self._gossip(rows, rnd, overlap)
        elif not self.compresses:  # none (gamma != 1 changes gossip rounds only): the uncompressed round
            self.comm.communicate(rows, rnd, overlap=overlap)
        elif self.placed and (kind == "average" or push_order(rnd, self.m) is not None):
            raise ConfigError.invalid("compress", self.compression.compress, "with auxiliaries held by subsets of "
                                      "ranks only elastic rounds are compressed on the distributed engine")
        elif kind == "average":
            self._average(rows, rnd)
        elif (order := push_order(rnd, self.m)) is not None:
            self._pushes(rows, order)
        elif (ex := elastic_exchange(rnd, self.m)) is not None:
            self._elastic(rows, rnd, ex)
        else:  # never a silent uncompressed round
            raise ConfigError.invalid("compress", self.compression.compress, f"a round of kind {rnd.kind.value} that "
                                      "is neither an average, gossip among the workers, an elastic round nor pushes "
                                      "cannot be compressed on the distributed engine")

    def settle(self, rows: Tensor, rnd: Round) -> None:
        """After an outer step moved the workers to z: z is what the round's participants agree on (x_ref)."""
        if not (self.compresses and rnd.kind is RoundKind.AVERAGE):
            return
        part, key = _participants(rnd.plan)
        node = int(part[0])
        if node >= self.m:
            row = 1 + node - self.m
        else:  # every worker restarted from z: each participant's row is z (this rank's, or z itself)
            row = 0 if self.rank in set(part.tolist()) else 1
        self.refs[key] = rows[row : row + 1].clone()

    # -- encoding ----------------------------------------------------------------------------------------
    def _costs(self, rnd: Round, kind: str) -> list[Any]:
        """The simulator's cost items of this round with payloads (its clock's :meth:`round_costs`)."""
        mix = rnd.mix
        if mix is None:
            pattern, matrix = ("neighbor", rnd.matrix) if kind == "gossip" else ("allreduce", None)
        else:
            pattern = mix.pattern
            matrix = None if mix.structure is not None and pattern != "neighbor" else mix.matrix
        return self.clock.round_costs(pattern, matrix, payload_bytes=self.row_bytes, reducible=self.reducible,
                                      senders=None if mix is None else round_senders(mix, self.m),
                                      compressor=self.compressor.name)

    def _encode(self, V: Tensor, nodes: list[int], local: list[int]) -> Payload:
        """Compress rows ``V`` of the nodes ``nodes`` (this rank's rows ``local``), PowerSGD's warm starts kept."""
        state = None
        idx = torch.as_tensor(local, dtype=torch.int64, device=self.device)
        if self.compressor.name == "powersgd":
            if self.factors is None:
                self.factors = tuple(self.compressor.init_state(  # type: ignore[attr-defined]
                    1 + self.v, self.width, seed=self.seed, dtype=self.dtype, device=self.device))
            state = tuple(f.index_select(0, idx) for f in self.factors)
        payload = self.compressor.compress(V, round=self.calls, nodes=nodes, seed=self.seed, state=state)
        if payload.state is not None and self.factors is not None:
            for f, g in zip(self.factors, payload.state, strict=True):
                f.index_copy_(0, idx, g)
        return payload

    def _payload(self, packed: Tensor, nodes: list[int]) -> Payload:
        """The packed payloads (R, N) of ``nodes`` (in that order) as one :class:`Payload` of R rows."""
        parts = _unpack(packed, self.format)
        ids = torch.as_tensor(nodes, dtype=torch.int64, device=self.device)
        return Payload(self.compressor.spec, (len(nodes), self.width), self.dtype, parts, self.calls, ids, self.seed)

    def _decode(self, packed: Tensor, nodes: list[int]) -> Tensor:
        """Decode the packed payloads (R, N) of ``nodes`` (in that order) as one batch: (R, width)."""
        return self.compressor.decompress(self._payload(packed, nodes))

    # -- averaging rounds ------------------------------------------------------------------------------
    def _average(self, rows: Tensor, rnd: Round) -> None:
        plan = rnd.plan
        m, r = self.m, self.rank
        src = np.arange(self.n, dtype=np.int64) if plan.sources is None else np.asarray(plan.sources, dtype=np.int64)
        assert plan.weights is not None
        part, key = _participants(plan)
        ref = self.refs.get(key, self.start)
        wsrc = [int(j) for j in src if j < m]
        asrc = [int(j) for j in src if j >= m]
        sends = r in wsrc
        nodes = ([r] if sends else []) + asrc  # the rows this rank encodes (auxiliaries: every rank alike)
        local = ([0] if sends else []) + [1 + a - m for a in asrc]
        V = None
        payload = None
        lo = _span(local)  # this rank's rows as a slice when they are consecutive (no gathered copies)
        if nodes:
            idx = torch.as_tensor(local, dtype=torch.int64, device=rows.device)
            # what each sends: its change since x_ref ...
            V = torch.sub(rows[lo], ref) if lo is not None else rows.index_select(0, idx).sub_(ref)
            if self.feedback:
                if self.residual is None:
                    self.residual = rows.new_zeros((1 + self.v, self.width))
                # ... plus what it did not send before
                V.add_(self.residual[lo] if lo is not None else self.residual.index_select(0, idx))
            payload = self._encode(V, nodes, local)
            if self.feedback:  # e <- V - Q(V), written in place: this rank's own payloads subtracted from V
                assert self.residual is not None
                if lo is not None:
                    self.compressor.decompress_add(payload, self.residual[lo].copy_(V), -1.0)
                else:
                    # on a copy of V: a payload may be V itself (a cast to the rows' own dtype), and it is packed below
                    self.residual.index_copy_(0, idx, self.compressor.decompress_add(payload, V.clone(), -1.0))
        mine = _pack(payload.parts, 0) if sends and payload is not None else None
        # The combine (after the transport), as the clock prices it (theory/codec.py): each payload decoded on
        # its own and added into x_ref (Compressor.decompress_add: a sparse payload adds its k values alone),
        # x_ref * sum(w) + sum_i w_i Q(c_i) in the order of the sources -- the same operations on every rank, so
        # every rank's x_ref has the same bits. x_ref becomes the result in place (snapshots hold copies).
        total = float(plan.weights.sum())
        y = self.refs.get(key)
        if y is None:
            y = ref * total
        elif total != 1.0:
            y.mul_(total)
        # transport: every worker's payload to every rank
        t0 = time.perf_counter()
        if len(wsrc) == m:
            assert mine is not None
            gathered = self.comm.gather_bytes(mine)
            sent = float(self.row_bytes * (m - 1))
            what = "compressed_all_gather"
        else:
            bufs = []
            for j in wsrc:
                buf = mine.clone() if j == r and mine is not None else torch.empty(self.row_bytes, dtype=torch.uint8,
                                                                                  device=rows.device)
                self.comm.broadcast_bytes(buf, j)
                bufs.append(buf)
            gathered = torch.stack(bufs) if bufs else torch.empty((0, self.row_bytes), dtype=torch.uint8)
            sent = float(self.row_bytes * (m - 1) / m) if sends else 0.0
            what = "compressed_broadcast"
        self.comm.charge(what, t0, self._costs(rnd, "average"), sent)
        if asrc:  # the auxiliaries' payloads were encoded here (after this rank's own row, if it sends)
            assert payload is not None
            first = 1 if sends else 0
            aux = torch.stack([_pack(payload.parts, first + k) for k in range(len(asrc))])
            gathered = torch.cat([gathered, aux.to(gathered.device)])
        for pos, node in enumerate(wsrc + asrc):
            self.compressor.decompress_add(self._payload(gathered[pos : pos + 1], [node]), y, float(plan.weights[pos]))
        members = set(part.tolist())
        for i, node in enumerate(self.nodes):
            if node in members:
                rows[i : i + 1].copy_(y)
        self.refs[key] = y
        self.calls += 1

    # -- gossip rounds (CHOCO-SGD) ---------------------------------------------------------------------------
    def _gossip(self, rows: Tensor, rnd: Round, overlap: bool) -> None:
        if not self.compresses:  # none: x_hat = x after every round
            if self.gamma == 1.0:
                self.comm.communicate(rows, rnd, overlap=overlap)  # D-PSGD's own round
            else:
                y = rows.clone()
                self.comm.communicate(y, rnd, overlap=overlap)
                rows.add_(y.sub_(rows), alpha=self.gamma)
            return
        plan = rnd.plan
        m, r = self.m, self.rank
        tg = np.arange(plan.n, dtype=np.int64) if plan.targets is None else np.sort(plan.targets)
        senders_all = {int(j) for j in tg}
        if self.copies is None:
            self.copies = rows.new_zeros((len(self.copy_nodes), self.width))
        P = self.copies
        sends = r in senders_all
        mine = None
        me_at = self._copy_row[r]
        if sends:
            mine = _pack(self._encode(rows[0:1] - P[me_at : me_at + 1], [r], [0]).parts, 0)
        t0 = time.perf_counter()
        got: dict[int, Tensor]
        if self.graph is not None:
            recv = [j for j in self.copy_nodes if j != r and j in senders_all]
            got = self.comm.exchange_bytes(mine, list(self.watchers) if sends else [], recv, self.row_bytes,
                                           rows.device)
            sent = float(self.row_bytes * len(self.watchers)) if sends else 0.0
            what = "compressed_neighbor"
        else:
            buf = mine if mine is not None else torch.zeros(self.row_bytes, dtype=torch.uint8, device=rows.device)
            everyone = self.comm.gather_bytes(buf)
            got = {j: everyone[j] for j in range(m) if j != r and j in senders_all}
            sent = float(self.row_bytes * (m - 1))
            what = "compressed_all_gather"
        self.comm.charge(what, t0, self._costs(rnd, "gossip"), sent)
        if mine is not None:
            got[r] = mine
        order = sorted(got)
        if order:
            decoded = self._decode(torch.stack([got[j].to(rows.device) for j in order]), order)
            if self.gossip_scale != 1.0:
                decoded.mul_(self.gossip_scale)
            at = torch.as_tensor([self._copy_row[j] for j in order], dtype=torch.int64, device=rows.device)
            P.index_add_(0, at, decoded)  # every holder of x_hat_j adds q_j
        if sends:  # x_r <- x_r + gamma (sum_j S[j, r] x_hat_j - x_hat_r)
            col = rnd.matrix[:, r]
            me = P[me_at]
            y = me * float(col[r])
            for j in (int(j) for j in np.flatnonzero(col)):
                if j == r:
                    continue
                if j not in self._copy_row:
                    raise RuntimeError(f"rank {r}: the gossip round reads node {j}, whose public copy this rank "
                                       "does not keep (the schedule produced a graph outside the one it announced)")
                y.add_(P[self._copy_row[j]], alpha=float(col[j]))
            rows[0].add_(y.sub_(me), alpha=self.gamma)
        self.calls += 1

    # -- elastic rounds (EASGD, generalized elastic, hierarchical) --------------------------------------------
    def _transport(self, mine: Tensor | None, senders: list[int], device: torch.device) -> tuple[Tensor, float, str]:
        """Every sender's packed payload on every rank, (len(senders), N) in the order of ``senders``: one
        all-gather when every worker sends, else one broadcast per sender; the bytes this rank sent."""
        r, m = self.rank, self.m
        if senders == list(range(m)):
            assert mine is not None
            return self.comm.gather_bytes(mine), float(self.row_bytes * (m - 1)), "compressed_all_gather"
        bufs = []
        for j in senders:
            buf = mine.clone() if j == r and mine is not None else torch.empty(self.row_bytes, dtype=torch.uint8,
                                                                              device=device)
            self.comm.broadcast_bytes(buf, j)
            bufs.append(buf)
        out = torch.stack(bufs) if bufs else torch.empty((0, self.row_bytes), dtype=torch.uint8, device=device)
        return out, float(self.row_bytes * (m - 1) / m) if r in senders else 0.0, "compressed_broadcast"

    def _elastic(self, rows: Tensor, rnd: Round, ex: ElasticExchange) -> None:
        """The simulator's elastic round node by node. Every rank holds every auxiliary, so each computes the
        replies Q(z_c − ẑ_c) itself (nothing travels for them, as for the auxiliary sources of an average);
        the uploads Q(x_i − ẑ_{c(i)} + e_i) of the workers another node reads travel (one all-gather, or a
        broadcast per sender); then every changed row j of this rank is S[j, j] x_j + Σ_{i≠j} S[i, j] v_i."""
        m, r, dev = self.m, self.rank, rows.device
        if self.centres is None:  # what every node holds of the auxiliaries at the first elastic round
            self.centres = rows[1:].clone()
        C = self.centres
        v: dict[int, Tensor] = {}
        rep = [int(c) for c in ex.replies]
        at = torch.as_tensor([c - m for c in rep], dtype=torch.int64, device=dev)
        t0 = time.perf_counter()
        sent, what = 0.0, "compressed_elastic"
        if not self.placed:  # every rank holds every centre: each computes the replies itself
            q = self.compressor.decompress(self._encode(rows[1:].index_select(0, at).sub_(C.index_select(0, at)),
                                                        rep, [1 + c - m for c in rep]))
        else:  # placed centres: each reply is encoded by its host (which holds it) and broadcast to every rank
            q = self._placed_replies(rows, rep, dev)
            sent = float(sum(self.row_bytes * (m - 1) / m for c in rep if self.comm.host(c - m) == r))
            what = "compressed_broadcast"
        if self.gossip_scale != 1.0:
            q.mul_(self.gossip_scale)
        C.index_add_(0, at, q)
        self.calls += 1
        for c in rep:
            v[c] = C[c - m]
        if ex.uploads.size:
            ups, centres = [int(i) for i in ex.uploads], [int(c) for c in ex.centres]
            mine, c_r = None, None
            if r in ups:
                c_r = torch.sub(rows[0:1], C[centres[ups.index(r)] - m])
                if self.feedback:
                    if self.residual is None:
                        self.residual = rows.new_zeros((1 + self.v, self.width))
                    c_r.add_(self.residual[0:1])
                mine = _pack(self._encode(c_r, [r], [0]).parts, 0)
            gathered, up_sent, what = self._transport(mine, ups, dev)
            sent += up_sent
            decoded = self._decode(gathered.to(dev), ups)
            if c_r is not None and self.feedback:
                assert self.residual is not None
                k = ups.index(r)
                torch.sub(c_r, decoded[k : k + 1], out=self.residual[0:1])
            for k, (i, c) in enumerate(zip(ups, centres, strict=True)):
                v[i] = C[c - m] + decoded[k]
            self.calls += 1
        cost = elastic_round_cost(ex, bytes_per_param=self.clock.bytes_per_param, payload_bytes=self.row_bytes,
                                  codec=self.clock.codec_time(self.compressor.name))
        self.comm.charge(what, t0, [cost], sent)
        S = rnd.matrix
        changed = {int(j) for j in ex.changed}
        new: list[tuple[int, Tensor]] = []
        for li, j in enumerate(self.nodes):
            if j not in changed or (self.placed and j >= m and not self.comm.holds(j - m)):
                continue  # (an auxiliary this rank does not hold: another rank keeps it current)
            y = rows[li] * float(S[j, j])
            for i in (int(i) for i in np.flatnonzero(S[:, j])):
                if i != j:
                    y.add_(v[i], alpha=float(S[i, j]))
            new.append((li, y))
        for li, y in new:
            rows[li].copy_(y)

    def _placed_replies(self, rows: Tensor, rep: list[int], dev: torch.device) -> Tensor:
        """The replies Q(z_c − ẑ_c) of centres held by subsets of ranks, (len(rep), width) on every rank: the host
        of each encodes it from its current z_c, and one broadcast per reply carries the packed payload."""
        m, r = self.m, self.rank
        bufs = []
        for c in rep:
            host = int(self.comm.host(c - m))
            if host == r:
                assert self.centres is not None
                diff = rows[1 + c - m : 2 + c - m] - self.centres[c - m : c - m + 1]
                buf = _pack(self._encode(diff, [c], [1 + c - m]).parts, 0)
            else:  # (PowerSGD's warm start of c is the host's alone: only the host encodes c's replies)
                buf = torch.empty(self.row_bytes, dtype=torch.uint8, device=dev)
            self.comm.broadcast_bytes(buf, host)
            bufs.append(buf)
        return self._decode(torch.stack(bufs), rep) if bufs else rows.new_zeros((0, self.width))

    # -- LSGD's leader refresh -------------------------------------------------------------------------------
    def _leader(self, rows: Tensor, lead: LeaderRound) -> None:
        """The simulator's refresh: for each slot s (every rank holds every slot), its leader's rank encodes
        Q(x_L − s) (keyed by the slot's row) and broadcasts the packed payload; every rank adds each to its slot
        and pulls its worker: x_r ← P[r, r] x_r + Σ_s P[s, r] s."""
        m, r, dev = self.m, self.rank, rows.device
        t0 = time.perf_counter()
        bufs, sent = [], 0.0
        for s, L in zip(lead.slots, lead.leaders, strict=True):
            sent += float(self.row_bytes * (m - 1) / m)  # a tree broadcast, on average per rank (as Mixer.broadcast)
            if r == L:
                buf = _pack(self._encode(rows[0:1] - rows[1 + s - m : 2 + s - m], [s], [1 + s - m]).parts, 0)
            else:
                buf = torch.empty(self.row_bytes, dtype=torch.uint8, device=dev)
            self.comm.broadcast_bytes(buf, L)
            bufs.append(buf)
        cost = self.clock.round_costs("broadcast", None, payload_bytes=self.row_bytes, reducible=False,
                                      compressor=self.compressor.name)[1:]  # (the losses' all-gather: charged there)
        self.comm.charge("compressed_broadcast", t0, cost, sent)
        q = self._decode(torch.stack(bufs), list(lead.slots))
        if self.gossip_scale != 1.0:
            q.mul_(self.gossip_scale)
        at = torch.as_tensor([1 + s - m for s in lead.slots], dtype=torch.int64, device=dev)
        rows.index_add_(0, at, q)
        self.calls += 1
        y = rows[0:1] * float(lead.keep[r])
        for k in range(len(lead.slots)):
            if lead.pull[k, r] != 0.0:
                y.add_(rows[int(at[k]) : int(at[k]) + 1], alpha=float(lead.pull[k, r]))
        rows[0:1].copy_(y)

    # -- DOWNPOUR's pushes, in the schedule's order ----------------------------------------------------------
    def _pushes(self, rows: Tensor, order: list[int]) -> None:
        """The simulator's round of pushes: worker i's push u_i = Q(x_i − b_i + e_i) depends on its own row and
        copy b_i only (each worker pushes once a round), so every rank encodes its push at once and one
        all-gather moves them; every rank (each holds z and every b_i) then replays the pushes in the order:
        z ← z + u_i, the reply Q(z − b_i) computed by every rank alike, b_i ← b_i + reply, and worker i's rank
        sets x_i ← b_i. The draws are keyed as the simulator's: push j of the order at call c + 2j, its reply
        at c + 2j + 1, by the row (i, and m + 1 + i for the reply)."""
        m, r, dev = self.m, self.rank, rows.device
        base = self.calls
        b_r = 2 + r  # this rank's row of b_r (node m + 1 + r)
        c_r = torch.sub(rows[0:1], rows[b_r : b_r + 1])
        if self.feedback:
            if self.residual is None:
                self.residual = rows.new_zeros((1 + self.v, self.width))
            c_r.add_(self.residual[0:1])
        self.calls = base + 2 * order.index(r)
        mine = _pack(self._encode(c_r, [r], [0]).parts, 0)
        t0 = time.perf_counter()
        gathered, sent, what = self._transport(mine, list(range(m)), dev)
        cost = push_round_cost(m, bytes_per_param=self.clock.bytes_per_param, payload_bytes=self.row_bytes,
                               codec=self.clock.codec_time(self.compressor.name))
        self.comm.charge(what.replace("all_gather", "pushes"), t0, [cost], sent)
        z = rows[1:2]
        for j, i in enumerate(order):
            self.calls = base + 2 * j
            u = self._decode(gathered[i : i + 1].to(dev), [i])
            if i == r and self.feedback:
                assert self.residual is not None
                torch.sub(c_r, u, out=self.residual[0:1])
            z.add_(u)
            b = 2 + i
            self.calls += 1
            reply = self.compressor.decompress(self._encode(z - rows[b : b + 1], [m + 1 + i], [b]))
            if self.gossip_scale != 1.0:
                reply.mul_(self.gossip_scale)
            rows[b : b + 1].add_(reply)
            if i == r:
                rows[0:1].copy_(rows[b : b + 1])
        self.calls = base + 2 * m

    # -- checkpoints and rollbacks ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's compressed-round state (CPU copies; loadable with ``torch.load(weights_only=True)``)."""
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        keys = list(self.refs)
        return {
            "compress": self.compression.compress, "calls": self.calls, "start": cpu(self.start),
            "nodes": list(self.nodes), "copy_nodes": list(self.copy_nodes),
            "ref_targets": [None if k is None else list(k) for k in keys],
            "refs": [cpu(self.refs[k]) for k in keys],
            "residual": cpu(self.residual), "copies": cpu(self.copies),
            "factors": None if self.factors is None else [cpu(f) for f in self.factors],
            "centres": cpu(self.centres),
        }

    def load_state_dict(self, state: dict[str, Any], prefix: str = "checkpoint.ranks.compression") -> None:
        """Restore a :meth:`state_dict` of this rank (same compressor, nodes and public copies)."""
        if state.get("compress") != self.compression.compress:
            raise ConfigError.invalid(f"{prefix}.compress", state.get("compress"),
                                      f"the checkpoint's rounds were compressed with {state.get('compress')!r}, this "
                                      f"run uses {self.compression.compress!r}")
        for name, mine in (("nodes", list(self.nodes)), ("copy_nodes", list(self.copy_nodes))):
            if [int(i) for i in state.get(name, [])] != mine:
                raise ConfigError.invalid(f"{prefix}.{name}", state.get(name), f"this rank holds {mine}")
        for name, rows in (("residual", 1 + self.v), ("copies", len(self.copy_nodes)), ("centres", self.v)):
            t = state.get(name)
            if t is not None and tuple(t.shape) != (rows, self.width):
                raise ConfigError.invalid(f"{prefix}.{name}", tuple(t.shape), f"expected {(rows, self.width)}")

        def dev(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(self.device, self.dtype).clone()

        self.calls = int(state["calls"])
        start = dev(state["start"])
        assert start is not None
        self.start = start
        self.refs = {(None if k is None else tuple(int(i) for i in k)): t
                     for k, t in zip(state["ref_targets"], (dev(t) for t in state["refs"]), strict=True)
                     if t is not None}
        self.residual, self.copies = dev(state.get("residual")), dev(state.get("copies"))
        self.centres = dev(state.get("centres"))  # absent before the first elastic round (and in older checkpoints)
        f = state.get("factors")
        self.factors = None if f is None else tuple(t.to(self.device, self.dtype).clone() for t in f)

    def snapshot(self) -> dict[str, Any]:
        """The state for a rollback (copies on the rows' device)."""
        return _copied({"calls": self.calls, "refs": self.refs, "residual": self.residual, "copies": self.copies,
                        "factors": self.factors, "centres": self.centres})

    def restore(self, snap: dict[str, Any]) -> None:
        """Restore a :meth:`snapshot` (the snapshot stays usable for a later rollback)."""
        s = _copied(snap)
        self.calls, self.refs, self.residual, self.copies, self.factors, self.centres = (
            s["calls"], s["refs"], s["residual"], s["copies"], s["factors"], s["centres"])


def _copied(state: dict[str, Any]) -> dict[str, Any]:
    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.clone()

    f = state["factors"]
    return {"calls": state["calls"], "refs": {k: v.clone() for k, v in state["refs"].items()},
            "residual": c(state["residual"]), "copies": c(state["copies"]),
            "factors": None if f is None else tuple(t.clone() for t in f), "centres": c(state["centres"])}


def average_start(rows: Tensor, per_worker: bool, all_reduce: Any, workers: int) -> Tensor:
    """x_ref before the first averaging round from this rank's ``rows`` (its mixed columns): the common start,
    or the workers' mean (``all_reduce``, a collective) for per-worker starts."""
    t = rows.detach().clone()
    if per_worker:
        all_reduce(t)
        t.div_(workers)
    return t

