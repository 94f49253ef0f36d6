"""Compressed communication as part of an algorithm's description (SPEC §11): :class:`Compression`.

A spec's ``compression`` says what a round sends, as pure data: the compressor's spec string
(``"topk:0.01"``, parsed by :func:`coopsgd.compression.parse_compressor`), error feedback (``"auto"``: on
for biased compressors) and CHOCO-SGD's consensus step γ. Every engine reads it; the rounds it changes are
classified from their matrices alone (:func:`exchange_of`), never from a preset's name:

``"average"``
    every changed column of S is the same weight vector w (sync, local SGD, FedAvg, the outer round of
    DiLoCo / SlowMo): node i sends Q(x_i − x_ref + e_i), x_ref being the state the round's participants
    agree on; the result is x_ref + Σ_i w_i Q(·); e_i ← (x_i − x_ref + e_i) − Q(·) with error feedback.
``"gossip"``
    the round mixes workers only (no auxiliary row is read or changed) and every changed column sums to 1
    (D-PSGD, decentralized periodic averaging, MATCHA, CHOCO): CHOCO-SGD (Koloskova, Stich, Jaggi, ICML
    2019, Algorithm 2) with public copies x̂ (zero at the start): q_i = Q(x_i − x̂_i), x̂_i ← x̂_i + q_i,
    x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i) (an unbiased Q is used as Q/(1 + ω)).

``"elastic"``
    a round with auxiliary nodes that is neither (EASGD, generalized elastic averaging, hierarchical
    averaging's group and global rounds; :func:`elastic_of`): every auxiliary node c the round reads keeps a
    public copy ẑ_c that every node reading it holds; c first sends its reply Q(z_c − ẑ_c) (ẑ_c ← ẑ_c +
    Q(·), an unbiased Q used as Q/(1 + ω)), then every worker i another node reads sends
    Q(x_i − ẑ_{c(i)} + e_i) against the copy of its centre c(i), with error feedback, and its readers use
    v_i = ẑ_{c(i)} + Q(·); node j becomes S[j, j] x_j + Σ_{i≠j} S[i, j] v_i (v_c = ẑ_c for an auxiliary).

``"pushes"``
    DOWNPOUR's round of sequential pushes through a parameter server (:func:`pushes_of`): in the round's
    order, worker i pushes Q(x_i − b_i + e_i) (its progress since its last pull b_i, error feedback), the
    server adds it to z and replies Q(z − b_i) (an unbiased Q used as Q/(1 + ω)); b_i ← b_i + Q(z − b_i) and
    x_i ← b_i.

``"leader"``
    LSGD's leader refresh fused with its pull (:func:`leader_round_of`; the elected leaders from the round's
    ``Mix.info``): each slot row s (one per group, and a global one with several groups) is the public copy
    of its leader's model that the workers reading it hold; each leader L sends Q(x_L − s) (an unbiased Q used
    as Q/(1 + ω); the copy carries what was not sent, as CHOCO's x̂: no error feedback), s ← s + Q(·), and
    every worker is pulled toward its copies with the pull's weights: x_i ← P[i, i] x_i + Σ_s P[s, i] s. The
    loss estimates of the election are floats sent as they are. The steps between refreshes pull toward the
    same copies and send nothing. See docs/compression.md.

This module imports no torch at import time (the compressor library is imported when a spec string other
than ``none`` is checked), so building a configuration's parser stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from coopsgd.algorithms.schedules import Mix, MixContext, Schedule
from coopsgd.errors import ConfigError, check_float
from coopsgd.theory.codec import CodecTime
from coopsgd.theory.cost import RoundCost

if TYPE_CHECKING:
    from coopsgd.compression import Compressor

__all__ = [
    "Compression",
    "CompressionArg",
    "ERROR_FEEDBACK",
    "EXCHANGES",
    "as_compression",
    "exchange_of",
    "round_kinds",
    "elastic_of",
    "ElasticExchange",
    "check_compressible",
    "elastic_round_cost",
    "elastic_spec_cost",
    "pushes_of",
    "push_round_cost",
    "leader_round_of",
    "LeaderRound",
    "compressed_round_cost",
    "REDUCIBLE",
]

#: ``error_feedback``: ``auto`` (on for biased compressors, SPEC §11), ``on`` or ``off``.
ERROR_FEEDBACK = ("auto", "on", "off")
#: The round kinds without auxiliary nodes compression applies to (:func:`exchange_of`; elastic rounds:
#: :func:`elastic_of`).
EXCHANGES = ("average", "gossip")
#: Compressors whose payloads decode to the row up to the rounding of a cast (γ defaults to 1 with them).
_NEAR_EXACT = ("none", "fp16", "bf16")
#: ``sign``'s δ = ‖x‖₁²/(d‖x‖²) on Gaussian-like vectors (E|x_j| = √(2/π) σ): its default consensus step.
_SIGN_TYPICAL_DELTA = 2.0 / math.pi
#: Compressors whose payloads an all-reduce adds on the wire while keeping the round's exact result
#: (:func:`compressed_round_cost` charges them 2 payloads; every other compressor's, m − 1). None: a 16-bit
#: all-reduce of ``fp16`` / ``bf16`` payloads would round every partial sum to 16 bits, where the round's
#: result is the sum of the decoded payloads in the rows' dtype, so every engine all-gathers them and they
#: are charged the all-gather that is performed (the bytes on the wire are the bytes accounted).
REDUCIBLE: tuple[str, ...] = ()
#: A schedule without a finite list of matrices: :func:`check_compressible` looks at the rounds of its first
#: steps (at most this many steps, at most :data:`_SAMPLE_ROUNDS` rounds).
_SAMPLE_STEPS = 4096
_SAMPLE_ROUNDS = 32
#: ... and of a sequential schedule's (DOWNPOUR: every round is a chain of pushes in some order)
_SAMPLE_SEQUENTIAL = 2


def _canonical(spec: Any) -> str:
    """The canonical spec string (``" TopK:0.01"`` -> ``"topk:0.01"``); ``none`` without importing torch."""
    if spec is None:
        return "none"
    if isinstance(spec, str) and spec.strip().lower() == "none":
        return "none"
    from coopsgd.compression import parse_compressor  # torch: only for a real compressor

    return parse_compressor(spec).spec


@dataclass(frozen=True)
class Compression:
    """What a round sends (SPEC §11), as data.

    Attributes:
        compress: the compressor's spec string (:data:`coopsgd.compression.COMPRESSOR_SPECS`), canonical;
            ``"none"``: rows are sent as they are.
        error_feedback: ``"auto"`` (on for biased compressors), ``"on"`` or ``"off"``; averaging rounds, the
            workers' uploads of elastic rounds and DOWNPOUR's pushes (in gossip rounds CHOCO's public copies
            x̂ carry what was not sent, in the replies of elastic rounds and DOWNPOUR the receivers' copies).
        consensus_step: CHOCO's γ in (0, 1]; ``None``: the default (:meth:`gamma`).
    """

    compress: str = "none"
    error_feedback: str = "auto"
    consensus_step: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress", _canonical(self.compress))
        if self.error_feedback not in ERROR_FEEDBACK:
            raise ConfigError.invalid("error_feedback", self.error_feedback, f"choose one of {', '.join(ERROR_FEEDBACK)}")
        if self.consensus_step is not None:
            object.__setattr__(self, "consensus_step", check_float("consensus_step", self.consensus_step, low=0.0,
                                                                   high=1.0, low_open=True))

    @property
    def compresses(self) -> bool:
        """Whether rows are compressed (the spec is not ``none``)."""
        return self.compress != "none"

    @property
    def active(self) -> bool:
        """Whether any round differs from the uncompressed one: a compressor, or ``none`` with γ != 1 (CHOCO
        gossip x_i ← x_i + γ Σ_j w_ij (x_j − x_i))."""
        return self.compresses or (self.consensus_step is not None and self.consensus_step != 1.0)

    def compressor(self, layout: Any = None) -> Compressor:
        """The :class:`~coopsgd.compression.Compressor` (``layout``: the row's tensor shapes, for PowerSGD)."""
        from coopsgd.compression import parse_compressor

        return parse_compressor(self.compress, layout=layout)

    def feedback(self, compressor: Compressor) -> bool:
        """Whether averaging rounds keep error feedback with ``compressor``."""
        if self.error_feedback == "auto":
            return bool(compressor.biased) and self.compresses
        return self.error_feedback == "on" and self.compresses

    def gamma(self, compressor: Compressor, d: int) -> float:
        """CHOCO's consensus step γ for rows of d coordinates: ``consensus_step`` when given; else 1 for
        ``none``, ``fp16`` and ``bf16`` (exact up to a cast's rounding), δ(d) for another biased compressor
        (k/d for ``topk`` / ``randk``, 1 − C/254² for ``int8``), for ``sign`` its δ = ‖x‖₁²/(d‖x‖²) on
        Gaussian-like vectors, 2/π (its worst case 1/d would stop the gossip), and 1/(1 + ω(d)) for an
        unbiased one (``qsgd``, ``randk:F:unbiased``, which gossip rounds use as Q/(1 + ω), a contraction with
        δ = 1/(1 + ω)): CHOCO-Gossip converges for γ of the order of δ (Koloskova et al. 2019, Theorem 2;
        the paper tunes γ, and so should a study: this default is a safe start, not an optimum)."""
        if self.consensus_step is not None:
            return float(self.consensus_step)
        if compressor.name in _NEAR_EXACT:
            return 1.0
        if compressor.name == "sign":  # its worst case δ = 1/d would stop the gossip
            return _SIGN_TYPICAL_DELTA
        delta = compressor.delta(d)
        if delta is not None and delta > 0:
            return float(min(1.0, delta))
        omega = compressor.omega(d)
        return 1.0 / (1.0 + float(omega)) if omega is not None else 1.0

    def describe(self) -> dict[str, Any]:
        return {"compress": self.compress, "error_feedback": self.error_feedback,
                "consensus_step": "auto" if self.consensus_step is None else self.consensus_step}


#: What ``compression=`` takes: a :class:`Compression`, a spec string, or ``None`` (no compression).
CompressionArg = Compression | str | None


def as_compression(value: CompressionArg) -> Compression | None:
    """``compression=`` as a :class:`Compression` (``None`` stays ``None``; a string is the compressor)."""
    if value is None or isinstance(value, Compression):
        return value
    if isinstance(value, str):
        return Compression(value)
    raise ConfigError.invalid("compress", value, "must be a compressor spec string, a Compression or None")


def exchange_of(S: np.ndarray, workers: int) -> str | None:
    """The kind of a round ``X <- X S`` (column convention) for compression: ``"identity"`` (no change),
    ``"average"`` (every changed column is one vector), ``"gossip"`` (only workers are read and changed and
    every changed column sums to 1), or ``None`` (anything else: not compressible)."""
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    changed = np.flatnonzero((S != np.eye(n)).any(axis=0))
    if changed.size == 0:
        return "identity"
    Sc = S[:, changed]
    if np.all(Sc == Sc[:, :1]):
        return "average"
    read = np.flatnonzero((Sc != 0).any(axis=1))
    if changed.max() >= workers or (read.size and read.max() >= workers):
        return None
    if not np.allclose(Sc.sum(axis=0), 1.0, rtol=0.0, atol=1e-12):
        return None
    return "gossip"


@dataclass(frozen=True, eq=False)
class ElasticExchange:
    """What a compressed elastic round sends (:func:`elastic_of`; docs/compression.md, "Elastic rounds").

    Attributes:
        uploads: the workers another node reads (sorted): each sends Q(x_i − ẑ_{c(i)} + e_i).
        centres: the auxiliary node each of them reads (its centre c(i), whose public copy is its reference).
        replies: the auxiliary nodes that send their reply Q(z_c − ẑ_c) first (sorted): those another node
            reads and the centres of the uploads.
        changed: the nodes (columns of S) the round changes (sorted).
        diagonal: S[j, j] for each of them (a node uses its own row exactly).
        handshakes: the most peers one node exchanges a payload with.
        payloads: the payloads through the busiest node, sent and received (each payload goes point to point
            from its sender to each node that needs it).
        total: every payload the round sends, over all nodes.
    """

    uploads: np.ndarray
    centres: np.ndarray
    replies: np.ndarray
    changed: np.ndarray
    diagonal: np.ndarray
    handshakes: int
    payloads: int
    total: int


def elastic_of(S: np.ndarray, workers: int) -> ElasticExchange | None:
    """The compressed exchange of an elastic round ``X <- X S`` (column convention) with auxiliary nodes
    (rows ``workers`` and up), or ``None`` when the round is not one: it changes nothing, it has no auxiliary
    node that another node reads or that a read worker reads, or a worker that another node reads does not
    read exactly one auxiliary node (its centre, whose public copy is the reference of its payload).

    Node i "reads" node j when S[j, i] != 0 (j != i). The receivers of a payload: an upload of worker i goes to
    every node that reads i; the reply of auxiliary c to every node that reads c, to the workers whose centre
    is c and to every node that reads one of them (all hold ẑ_c)."""
    S = np.asarray(S, dtype=np.float64)
    n, m = S.shape[0], int(workers)
    if n <= m:
        return None
    eye = np.eye(n, dtype=bool)
    changed = np.flatnonzero((S != np.eye(n)).any(axis=0))
    if changed.size == 0:
        return None
    off = (S != 0) & ~eye  # off[j, i]: node i reads node j
    read = np.flatnonzero(off.any(axis=1))
    uploads = read[read < m]
    centres = np.empty(uploads.size, dtype=np.int64)
    for k, i in enumerate(uploads.tolist()):
        aux = np.flatnonzero(off[m:, i]) + m
        if aux.size != 1:
            return None
        centres[k] = aux[0]
    replies = np.union1d(read[read >= m], centres).astype(np.int64)
    if replies.size == 0:
        return None
    sent, recv = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    peers: list[set[int]] = [set() for _ in range(n)]

    def send(src: int, to: np.ndarray) -> None:
        sent[src] += to.size
        recv[to] += 1
        peers[src].update(to.tolist())
        for t in to.tolist():
            peers[t].add(src)

    for i in uploads.tolist():
        send(i, np.flatnonzero(off[i]))
    for c in replies.tolist():
        mine = uploads[centres == c]
        holders = off[c] | off[mine].any(axis=0)
        holders[mine] = True
        # with several centres (hierarchical), every centre keeps every copy z^_h: a later round may have it
        # read h's workers (the global round), and their values there are z^_h + the uploads
        holders[m:] = True
        holders[c] = False
        send(c, np.flatnonzero(holders))
    return ElasticExchange(
        uploads=uploads.astype(np.int64), centres=centres, replies=replies, changed=changed.astype(np.int64),
        diagonal=np.diag(S)[changed].copy(), handshakes=max(len(p) for p in peers),
        payloads=int((sent + recv).max()), total=int(sent.sum()))


def pushes_of(S: np.ndarray, workers: int, order: Any) -> bool:
    """Whether ``X <- X S`` is a round of sequential pushes and pulls through a parameter server in ``order``
    (a permutation of the workers), in DOWNPOUR's layout: the workers, the server z (row ``workers``), and
    worker i's last pulled copy b_i (row ``workers + 1 + i``); each push is z <- z + (x_i − b_i), x_i <- z,
    b_i <- z (:class:`~coopsgd.algorithms.schedules.DownpourSchedule`). Checked against the chain written
    directly (each push reads the original x_i and b_i: z after push k is z + Σ_{l≤k} (x_{i_l} − b_{i_l})), in
    O(m²) rather than the product of m matrices."""
    S = np.asarray(S, dtype=np.float64)
    m = int(workers)
    n, z = 2 * m + 1, m
    try:
        seq = [int(i) for i in order]
    except (TypeError, ValueError):
        return False
    if S.shape != (n, n) or sorted(seq) != list(range(m)):
        return False
    want = np.eye(n)
    running = np.zeros(n)
    running[z] = 1.0
    for i in seq:
        running[i] += 1.0
        running[m + 1 + i] -= 1.0
        want[:, i] = running
        want[:, m + 1 + i] = running
    want[:, z] = running
    return bool(np.allclose(S, want, rtol=0.0, atol=1e-12))


@dataclass(frozen=True, eq=False)
class LeaderRound:
    """A round of LSGD in its layout (:func:`leader_round_of`): the workers, then one slot row per group holding
    its local leader's model and, with several groups, a global slot holding the global leader's.

    Attributes:
        refresh: the slots are refreshed from their leaders in this round (else the round only pulls).
        slots: the slot rows (ascending), and ``leaders`` the worker each one copies.
        pull: (len(slots), m) the weight of each slot in each worker's new row (P[s, i] of S = R P); with
            ``keep`` (m,) the weight of the worker's own row, every worker becomes keep_i x_i + Σ_s pull[s, i] s.
    """

    refresh: bool
    slots: tuple[int, ...]
    leaders: tuple[int, ...]
    pull: np.ndarray
    keep: np.ndarray


def leader_round_of(S: np.ndarray, workers: int, local_leaders: Any, global_leader: Any) -> LeaderRound | None:
    """Whether ``X <- X S`` is a round of LSGD (:class:`~coopsgd.algorithms.schedules.LeaderSchedule`: m workers in
    ``len(local_leaders)`` equal consecutive groups, a slot per group, and a global slot when there are several
    groups), with these elected leaders: a refresh fused with the pull (S = R P: every slot column is e of its
    leader, every worker column supported on itself and the leaders) or a pull alone (every slot column is its
    own e, every worker column supported on itself and the slots); ``None`` otherwise. A refresh's P is read
    back from S: where a worker reads its group's slot and the global slot and both copy the same worker, S has
    their sum, which is split with the two pull weights read where they are apart (another group's worker:
    groups are equal, so one with a non-leader member exists whenever this sum does)."""
    S = np.asarray(S, dtype=np.float64)
    m = int(workers)
    try:
        local = [int(x) for x in local_leaders]
        glob = int(global_leader)
    except (TypeError, ValueError):
        return None
    g = len(local)
    if g < 1 or m % g or not all(0 <= x < m for x in (*local, glob)):
        return None
    multi = g > 1
    slots = tuple(range(m, m + g + (1 if multi else 0)))
    leaders = tuple(local + ([glob] if multi else []))
    if S.shape != (m + len(slots), m + len(slots)):
        return None
    group = np.arange(m) // (m // g)
    reads = np.zeros((len(slots), m), dtype=bool)  # which slots worker i reads
    for i in range(m):
        reads[group[i], i] = i != local[group[i]]
        if multi:
            reads[g, i] = i != glob
    keep = np.diag(S)[:m].copy()
    off = S[:, :m].copy()
    off[np.arange(m), np.arange(m)] = 0.0
    e = np.eye(S.shape[0])
    if all(np.array_equal(S[:, s], e[:, s]) for s in slots):  # a pull alone
        ok = not np.any(off[:m] != 0) and all(np.all(off[slots[k], ~reads[k]] == 0) for k in range(len(slots)))
        return LeaderRound(False, slots, leaders, S[list(slots), :m].copy(), keep) if ok else None
    if np.any(S[m:, :m] != 0) or not all(np.array_equal(S[:, s], e[:, L]) for s, L in zip(slots, leaders,
                                                                                           strict=True)):
        return None
    pull = np.zeros((len(slots), m))
    a_loc = a_glob = None
    for i in range(m):  # the weights where each slot's leader appears alone in the worker's column
        L_i = local[group[i]]
        if reads[group[i], i] and not (multi and reads[g, i] and L_i == glob):
            a_loc = off[L_i, i]
        if multi and reads[g, i] and not (reads[group[i], i] and L_i == glob):
            a_glob = off[glob, i]
    for i in range(m):
        want = {k for k in range(len(slots)) if reads[k, i]}
        support = set(np.flatnonzero(off[:, i]).tolist())
        if not support <= {leaders[k] for k in want}:
            return None
        for k in want:
            L = leaders[k]
            shared = [q for q in want if leaders[q] == L]
            if len(shared) == 1:
                pull[k, i] = off[L, i]
            elif a_loc is None or a_glob is None:
                return None
            else:
                pull[k, i] = a_glob if k == g else a_loc
    return LeaderRound(True, slots, leaders, pull, keep)


def push_round_cost(workers: int, *, bytes_per_param: float, payload_bytes: float,
                    codec: CodecTime | None = None) -> RoundCost:
    """The cost of a compressed round of pushes (:func:`pushes_of`): every byte passes through the server, m
    pushes in and m replies out (2 m payloads), one handshake per worker: the parameter server's round of
    [CSGD] Table 3 with payloads in place of the d parameters each way. ``codec``: the compressor's times;
    the pushes are sequential, so 2m encodes and 2m decodes (:mod:`coopsgd.theory.codec`)."""
    m, p, bpp = int(workers), float(payload_bytes), float(bytes_per_param)
    return RoundCost("parameter_server", m, 2 * m * p / bpp, 2 * m * p, _codec_s(codec, 2 * m, 2 * m))


def _codec_s(codec: CodecTime | None, encodes: int, decodes: int) -> float:
    return 0.0 if codec is None else codec.seconds(encodes, decodes)


def _kind(S: np.ndarray, workers: int, mix: Mix | None = None) -> str | None:
    """:func:`exchange_of`, ``"elastic"`` for a round :func:`elastic_of` can compress, or ``"pushes"`` for a
    round of sequential pushes (:func:`pushes_of`; its order is the Mix's ``info["order"]``)."""
    kind = exchange_of(S, workers)
    if kind is not None:
        return kind
    order = None if mix is None else mix.info.get("order")
    if order is not None and pushes_of(S, workers, order):
        return "pushes"
    if elastic_of(S, workers) is not None:
        return "elastic"
    return None


def round_kinds(schedule: Schedule, workers: int) -> set[str | None]:
    """The kinds of the rounds ``schedule`` produces (``"identity"``, ``"average"``, ``"gossip"``, ``"elastic"``,
    ``"pushes"``, ``None``: none of these): from its finite set of matrices, else from the rounds of its first
    steps (random schedules: FedAvg's samples, MATCHA's matchings)."""
    mats = schedule.matrices(_SAMPLE_STEPS)
    if mats is not None:
        return {_kind(M, workers) for M in mats}
    kinds: set[str | None] = set()
    state = schedule.init_state()
    rounds = 0
    for k in range(_SAMPLE_STEPS):
        mix, state = schedule.advance(k, MixContext(step=k), state)
        if mix is None:
            continue
        kinds.add("average" if mix.structure is not None else _kind(mix.matrix, workers, mix))
        rounds += 1
        if rounds >= (_SAMPLE_SEQUENTIAL if schedule.sequential else _SAMPLE_ROUNDS):
            break
    return kinds


def check_compressible(name: str, schedule: Schedule, workers: int, rule: str, compression: Compression) -> None:
    """Refuse (``ConfigError`` naming ``compress``) a compression the spec's rounds cannot take: LSGD's leader
    rounds, rounds that are neither averages, gossip among the workers, elastic rounds (:func:`elastic_of`)
    nor sequential pushes (:func:`pushes_of`), gossip under the pre-mix rule, and PowerSGD on gossip rounds."""
    if not compression.compresses:
        return  # none: only gossip rounds change (γ != 1), and every round can take that
    spec = compression.compress
    if schedule.needs_losses:  # LSGD: its rounds need the losses to be built, so they are not sampled here
        return
    kinds = round_kinds(schedule, workers)
    if None in kinds:
        raise ConfigError.invalid(
            "compress", spec,
            f"preset {name!r} has rounds that are neither averages, gossip among the workers, sequential pushes "
            "nor elastic rounds in which every worker another node reads reads exactly one auxiliary node: use "
            "compress=none")
    if "gossip" in kinds and rule != "post_mix":
        raise ConfigError.invalid("compress", spec, f"preset {name!r}: CHOCO gossip follows the local step "
                                  "(the post_mix rule)")
    if "gossip" in kinds and spec.startswith("powersgd"):
        raise ConfigError.invalid("compress", spec, f"preset {name!r} gossips: powersgd compresses "
                                  "averaging rounds only among rounds of the workers alone (elastic rounds take it "
                                  "too): its warm-started factors approximate a difference against a reference the "
                                  "receivers share; use topk, randk, sign, int8, qsgd, fp16 or bf16")


def elastic_round_cost(exchange: ElasticExchange, *, bytes_per_param: float, payload_bytes: float,
                       codec: CodecTime | None = None) -> RoundCost:
    """The cost of a compressed elastic round (SPEC §11): every payload goes point to point from its sender to
    each node that needs it (:func:`elastic_of`); like a parameter server's round, it is charged the traffic
    of the busiest node, sent and received (``exchange.payloads`` payloads of ``payload_bytes``), with one
    handshake per peer of that node (``exchange.handshakes``). For EASGD with m workers: m uploads received and
    the reply sent to m workers by the centre, 2 m payloads, m handshakes. ``codec``: the compressor's times
    (2 encodes, the upload's and the reply's; h + 1 decodes, h = ``exchange.handshakes``)."""
    p, bpp = float(payload_bytes), float(bytes_per_param)
    h = int(exchange.handshakes)
    return RoundCost("parameter_server", h, exchange.payloads * p / bpp, exchange.payloads * p,
                     _codec_s(codec, 2, h + 1))


def compressed_round_cost(cost: RoundCost, *, workers: int, params: int, bytes_per_param: float,
                          payload_bytes: float, reducible: bool, codec: CodecTime | None = None) -> RoundCost:
    """The cost of a round that sends compressed payloads of ``payload_bytes`` per node, from the uncompressed
    round's ``cost`` ([CSGD] Table 3, :func:`coopsgd.theory.cost.round_cost`) with m = ``workers`` and d =
    ``params``; the bytes are the payloads' (SPEC §11):

    * ``"neighbor"``: a payload where the uncompressed round sends d parameters (2 · max degree payloads);
    * ``"allreduce"``: the payloads are all-gathered, a ring of m − 1 handshakes passing m − 1 payloads
      through each node (indices, scales and factors differ from node to node, and a 16-bit sum would round
      the result: no compressor of :data:`REDUCIBLE`); ``reducible`` charges an all-reduce of payloads
      (2 payloads) instead, for a compressor whose payloads a reduction adds exactly;
    * ``"parameter_server"``: m payloads up, and the server's dense reply (m · d parameters) down;
    * ``"broadcast"`` (LSGD's leader refresh): the leader's payload in place of its d parameters at every hop;
    * any other pattern (the election's all-gather of loss estimates): unchanged (not compressed).

    ``codec``: the compressor's times (:mod:`coopsgd.theory.codec`): one encode, and a decode of each payload
    the busiest node adds into its row (m all-gathered -- its own payload is added like the others' --, max
    degree for gossip, m at the server; 1 after a reduction).
    """
    m, d, bpp, p = int(workers), int(params), float(bytes_per_param), float(payload_bytes)
    if d <= 0:
        return cost
    if cost.pattern == "parameter_server":
        return RoundCost("parameter_server", cost.handshakes, m * p / bpp + m * d, m * p + m * d * bpp,
                         _codec_s(codec, 1, m))
    if cost.pattern == "allreduce" and not reducible:
        hops = m - 1 if m > 1 else 0
        return RoundCost("allgather", hops, hops * p / bpp, hops * p, _codec_s(codec, 1, m))
    if cost.pattern in ("allreduce", "neighbor", "broadcast"):
        ratio = p / (d * bpp)  # a payload in place of one row (LSGD's refresh: the leader's payload down the tree)
        decodes = cost.handshakes if cost.pattern == "neighbor" else 1
        return RoundCost(cost.pattern, cost.handshakes, cost.floats_sent * ratio, cost.bytes_sent * ratio,
                         _codec_s(codec, 1, decodes))
    return cost


def elastic_spec_cost(schedule: Schedule, workers: int, *, bytes_per_param: float,
                      payload_bytes: float, codec: CodecTime | None = None) -> RoundCost | None:
    """The cost of the costliest compressed elastic round of ``schedule`` (:func:`elastic_round_cost` over its
    finite set of matrices; :func:`push_round_cost` for sequential pushes), or ``None`` when it has no such
    round or no finite set of matrices (the per-round cost of ``coopsgd theory`` and of reference runs)."""
    if schedule.sequential and round_kinds(schedule, workers) == {"pushes"}:
        return push_round_cost(workers, bytes_per_param=bytes_per_param, payload_bytes=payload_bytes, codec=codec)
    mats = schedule.matrices(_SAMPLE_STEPS)
    if mats is None:
        return None
    costs = [elastic_round_cost(ex, bytes_per_param=bytes_per_param, payload_bytes=payload_bytes, codec=codec)
             for ex in (elastic_of(M, workers) for M in mats if exchange_of(M, workers) is None) if ex is not None]
    return max(costs, key=lambda c: (c.bytes_sent, c.handshakes)) if costs else None
