"""Compressed rounds on stacked rows (SPEC §11): the encode / decode stage of a round, in process.

A round of a spec with a :class:`~coopsgd.algorithms.communication.Compression` goes through the stages of
:class:`~coopsgd.engines.base.Communicator`: *select* what each node sends, *encode -> transport -> decode*
it with the compressor (:mod:`coopsgd.compression`, batched over every sending row), *combine* the decoded
payloads with the round's weights. Which vector is sent depends on the round's kind
(:func:`round_exchange`, from the one planner's :class:`~coopsgd.engines.mixing.Round`):

``average`` (every changed column of S is one weight vector w over the source rows: sync, local SGD,
    FedAvg, the outer round of DiLoCo / SlowMo)
    x_ref is the state the round's participants agree on: the value the last averaging round over the
    same target rows wrote into them (after the outer step, for an outer round: z), and before any round
    the common start (the workers' mean for per-worker starts). One x_ref is kept per set of target rows
    (a run has one or two: the workers, or every node). Source i sends c_i = x_i − x_ref + e_i; with error
    feedback e_i ← c_i − Q(c_i). Every target row becomes x_ref Σ_i w_i + Σ_i w_i Q(c_i) (Σ w_i = 1: x_ref
    plus the weighted mean of the decoded payloads), which is also the new x_ref.
``gossip`` (only workers are read and changed, every changed column sums to 1: D-PSGD, decentralized
    periodic averaging, MATCHA, CHOCO, SlowMo's gossip base)
    CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2) after the local step: every changed row i
    sends q_i = Q(x_i − x̂_i) (an unbiased Q with variance ω is used as Q/(1 + ω), the paper's rescaling
    that makes it a contraction with δ = 1/(1 + ω)); x̂_i ← x̂_i + q_i (one public copy per node, zero at the start, which every
    neighbour holds); x_i ← x_i + γ Σ_j S[j, i] (x̂_j − x̂_i). With ``none`` the public copies equal the
    models after every round, so none is kept: the round is x ← x + γ (X S − x), and for γ = 1 the
    uncompressed round itself (D-PSGD bit for bit).

``elastic`` (auxiliary nodes, neither of the above: EASGD, generalized elastic averaging, hierarchical
    averaging's group rounds and its global rounds; :func:`~coopsgd.algorithms.communication.elastic_of`)
    Every auxiliary node c keeps a public copy ẑ_c, held by every node that reads it: c's value at the run's
    first elastic round (every node knows it: auxiliary rows change only in rounds), then moved by its
    replies only. A round (1) has every auxiliary node the round reads, and every centre of a read worker,
    send its reply ρ_c = Q(z_c − ẑ_c) (an unbiased Q used as Q/(1 + ω), as in CHOCO), ẑ_c ← ẑ_c + ρ_c: ẑ_c
    is what the readers know of z_c, and z_c − ẑ_c is the centre's residual, carried into its next reply;
    (2) has every worker i that another node reads send u_i = Q(c_i), c_i = x_i − ẑ_{c(i)} + e_i against the
    copy of the one auxiliary node c(i) it reads (its centre), e_i ← c_i − u_i with error feedback; its
    readers use v_i = ẑ_{c(i)} + u_i; (3) sets every changed node j to S[j, j] x_j + Σ_{i≠j} S[i, j] v_i
    (v_c = ẑ_c for an auxiliary node): each node uses its own row exactly and what it received of the others.
    With an exact compressor this is the uncompressed round up to rounding (ẑ + (z − ẑ) is not z in floating
    point).

``pushes`` (DOWNPOUR: sequential pushes through a parameter server;
    :func:`~coopsgd.algorithms.communication.pushes_of`, the order from the round's ``Mix.info["order"]``)
    In the round's order, worker i pushes u_i = Q(c_i), c_i = x_i − b_i + e_i (its progress since its last
    pull b_i, a row of the state; e_i ← c_i − u_i with error feedback); the server adds it, z ← z + u_i, and
    replies r_i = Q(z − b_i) (an unbiased Q used as Q/(1 + ω); keyed by b_i's row), b_i ← b_i + r_i, x_i ← b_i:
    b_i is the copy of z both ends hold, and z − b_i, carried into the next reply, the server's residual.

``leader`` (LSGD: :func:`leader_round`, from S and the leaders the Mix carries)
    on a refresh each slot's leader L sends Q(x_L − s) against the slot s (the public copy its workers hold;
    an unbiased Q used as Q/(1 + ω)), s ← s + Q(·), and every worker i ← P[i, i] x_i + Σ_s P[s, i] s (P read
    back from S = R P); between refreshes the pull toward the copies sends nothing (the uncompressed round).

Averaging rounds with ``none`` are the uncompressed round (the communicator's fused kernel). The draws of
``qsgd`` / ``randk`` / PowerSGD's first factor are keyed by (seed, c, node), c counting the compressor
calls of the run (one per averaging, gossip or LSGD refresh round, two per elastic round, 2m per DOWNPOUR
round), so the reference engine (:class:`ReferenceCompressedRounds`, numpy, one node at a time through
:func:`~coopsgd.compression.reference_roundtrip`) draws the same ones.

The per-node state -- the residuals e (n, width), the public copies x̂ (n, width) of gossip, the copies ẑ
(n, width; the auxiliary rows are used) of elastic rounds, PowerSGD's warm-start
factors (one (n, m_t, R) tensor per compressed matrix), the references x_ref and the round count -- is
created when first used, goes into the engine's checkpoint (:meth:`CompressedRounds.state_dict`) and is
restored by the NaN-skip rollback (:meth:`CompressedRounds.snapshot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.communication import (
    REDUCIBLE,
    Compression,
    ElasticExchange,
    LeaderRound,
    elastic_of,
    elastic_round_cost,
    exchange_of,
    leader_round_of,
    push_round_cost,
    pushes_of,
)
from coopsgd.compression import Compressor, reference_roundtrip
from coopsgd.engines.base import Communicator
from coopsgd.engines.mixing import Round, RoundKind, RoundPlan, apply_mixing
from coopsgd.errors import ConfigError
from coopsgd.theory.codec import CodecTime
from coopsgd.theory.cost import RoundCost

__all__ = ["CompressedRounds", "ReferenceCompressedRounds", "round_exchange", "load_compression_state", "elastic_exchange",
           "push_order"]

_NOT_COMPRESSIBLE = ("not compressible",)  # the cached answer "None" (a plan's cache treats None as missing)


def round_exchange(rnd: Round, workers: int) -> str | None:
    """The kind of round ``rnd`` for compression: ``"identity"``, ``"average"``, ``"gossip"`` or ``None``
    (:func:`~coopsgd.algorithms.communication.exchange_of`; an averaging plan is known without its matrix,
    anything else is analysed once per plan)."""
    if rnd.kind is RoundKind.IDENTITY:
        return "identity"
    if rnd.kind is RoundKind.AVERAGE:
        return "average"
    got = rnd.plan.derived(("exchange", workers), lambda: exchange_of(rnd.matrix, workers) or _NOT_COMPRESSIBLE)
    return None if got is _NOT_COMPRESSIBLE else str(got)


def elastic_exchange(rnd: Round, workers: int) -> ElasticExchange | None:
    """What a compressed elastic round sends (:func:`~coopsgd.algorithms.communication.elastic_of`, analysed
    once per plan), or ``None`` when ``rnd`` is not one."""
    got = rnd.plan.derived(("elastic", workers), lambda: elastic_of(rnd.matrix, workers) or _NOT_COMPRESSIBLE)
    return None if got is _NOT_COMPRESSIBLE else got


def push_order(rnd: Round, workers: int) -> list[int] | None:
    """The order of a round of sequential pushes (:func:`~coopsgd.algorithms.communication.pushes_of`; the
    Mix's ``info["order"]``), or ``None`` when ``rnd`` is not one."""
    order = None if rnd.mix is None else rnd.mix.info.get("order")
    if order is None:
        return None
    seq = [int(i) for i in order]
    ok = rnd.plan.derived(("pushes", workers, tuple(seq)), lambda: pushes_of(rnd.matrix, workers, seq) or _NOT_COMPRESSIBLE)
    return None if ok is _NOT_COMPRESSIBLE else seq


def leader_round(rnd: Round, workers: int) -> LeaderRound | None:
    """The LSGD round ``rnd`` is (:func:`~coopsgd.algorithms.communication.leader_round_of`, analysed once per
    plan; the leaders from the Mix's ``info``), or ``None`` when it is not one."""
    info = {} if rnd.mix is None else rnd.mix.info
    if "local_leaders" not in info or "leader" not in info:
        return None
    key = ("leader", workers, tuple(info["local_leaders"]), info["leader"])
    got = rnd.plan.derived(key, lambda: leader_round_of(rnd.matrix, workers, info["local_leaders"], info["leader"])
                           or _NOT_COMPRESSIBLE)
    return None if got is _NOT_COMPRESSIBLE else got


def _refuse(rnd: Round, spec: str) -> ConfigError:
    return ConfigError.invalid("compress", spec, f"a round of kind {rnd.kind.value} that is neither an average, "
                               "gossip among the workers nor an elastic round in which every worker another node "
                               "reads reads exactly one auxiliary node cannot be compressed")


def _gossip_scale(compressor: Compressor, d: int) -> float:
    """CHOCO's use of an unbiased compressor: Q/(1 + ω) (a contraction with δ = 1/(1 + ω)); 1 for biased ones."""
    omega = compressor.omega(d)
    return 1.0 if omega is None else 1.0 / (1.0 + float(omega))


def _participants(plan: RoundPlan) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """An averaging round's participants, the rows it reads or changes (sorted), and the key of their x_ref
    (``None``: every row). FedAvg with one sampled client j changes every row but j (S = e_j 1^T): j takes
    part too, and gets the round's result like the others."""
    n = plan.n
    if plan.targets is None or plan.sources is None:  # every row is changed or read
        return np.arange(n, dtype=np.int64), None
    rows = np.union1d(plan.targets, plan.sources).astype(np.int64)
    return rows, None if rows.size == n else tuple(int(r) for r in rows)


class CompressedRounds:
    """The compressed rounds of one process's stacked rows (see the module docstring).

    Args:
        compression: the spec's compression (:attr:`AlgorithmSpec.compressed`).
        nodes, workers: rows n (workers first) and workers m.
        width: the columns a round mixes (the row each node sends).
        dtype, device: of the rows.
        seed: the run's seed (keys the compressors' draws).
        layout: the shapes of the tensors a row is made of (PowerSGD compresses each matrix-shaped one).
        start: (width,) x_ref before the first averaging round (the common start).
    """

    def __init__(self, compression: Compression, *, nodes: int, workers: int, width: int, dtype: torch.dtype,
                 device: torch.device, seed: int, layout: Sequence[Sequence[int]] | None, start: Tensor) -> None:
        self.compression = compression
        self.compressor: Compressor = compression.compressor(layout)
        self.compresses = compression.compresses
        self.feedback = compression.feedback(self.compressor)
        self.gamma = compression.gamma(self.compressor, width)
        self.n, self.workers, self.width = int(nodes), int(workers), int(width)
        self.gossip_scale = _gossip_scale(self.compressor, width)
        self.dtype, self.device, self.seed = dtype, device, int(seed)
        self.row_bytes = self.compressor.payload_bytes(width, dtype)
        self.reducible = self.compressor.name in REDUCIBLE
        self.start = start.detach().reshape(1, width).to(device, dtype).clone()
        self.refs: dict[tuple[int, ...] | None, Tensor] = {}
        self.residual: Tensor | None = None
        self.public: Tensor | None = None
        self.copies: Tensor | None = None  # elastic rounds: ẑ (the auxiliary rows are used)
        self.factors: tuple[Tensor, ...] | None = None
        self.calls = 0  # compressor calls so far (keys the draws)

    # -- the round ------------------------------------------------------------------------------------
    def sends_payload(self, rnd: Round) -> bool:
        """Whether round ``rnd`` sends compressed payloads (its bytes are the compressor's)."""
        if not self.compresses:
            return False
        if (lead := leader_round(rnd, self.workers)) is not None:
            return lead.refresh
        kind = round_exchange(rnd, self.workers)
        return kind in ("average", "gossip") or (kind is None and (push_order(rnd, self.workers) is not None
                                                                   or elastic_exchange(rnd, self.workers) is not None))

    def elastic_cost(self, rnd: Round, bytes_per_param: float, codec: CodecTime | None = None) -> RoundCost | None:
        """The cost of round ``rnd`` when it is a compressed elastic round
        (:func:`~coopsgd.algorithms.communication.elastic_round_cost`) or a round of compressed pushes
        (:func:`~coopsgd.algorithms.communication.push_round_cost`), else ``None``; ``codec``: the
        compressor's encode / decode times (:mod:`coopsgd.theory.codec`)."""
        if not self.compresses or leader_round(rnd, self.workers) is not None:
            return None
        if round_exchange(rnd, self.workers) is not None:
            return None
        if push_order(rnd, self.workers) is not None:
            return push_round_cost(self.workers, bytes_per_param=bytes_per_param, payload_bytes=self.row_bytes,
                                   codec=codec)
        ex = elastic_exchange(rnd, self.workers)
        return None if ex is None else elastic_round_cost(ex, bytes_per_param=bytes_per_param,
                                                          payload_bytes=self.row_bytes, codec=codec)

    def communicate(self, rows: Tensor, rnd: Round, comm: Communicator, *, overlap: bool = False) -> None:
        """Round ``rnd`` on ``rows`` (every node's mixed columns) in place; ``comm`` moves what is not compressed."""
        kind = round_exchange(rnd, self.workers)
        if kind == "identity":
            return
        if self.compresses and (lead := leader_round(rnd, self.workers)) is not None:
            if lead.refresh:
                self._leader(rows, lead)
            else:  # the pull toward the copies the workers hold: nothing is sent
                comm.communicate(rows, rnd, overlap=overlap)
            return
        if kind == "average" and self.compresses:
            self._average(rows, rnd.plan)
        elif kind == "gossip":
            self._gossip(rows, rnd, comm, overlap)
        elif kind is None and self.compresses:
            order = push_order(rnd, self.workers)
            if order is not None:
                self._pushes(rows, order)
                return
            ex = elastic_exchange(rnd, self.workers)
            if ex is None:
                raise _refuse(rnd, self.compression.compress)
            self._elastic(rows, rnd, ex)
        else:  # an average with none, or (none, gamma) on a round that is not gossip: uncompressed
            comm.communicate(rows, rnd, overlap=overlap)

    def settle(self, rows: Tensor, rnd: Round) -> None:
        """After an outer step moved the workers to z: z is what the round's participants now agree on (x_ref)."""
        if self.compresses and rnd.kind is RoundKind.AVERAGE:
            part, key = _participants(rnd.plan)
            self.refs[key] = rows[int(part[0]) : int(part[0]) + 1].clone()

    def _roundtrip(self, V: Tensor, nodes: Tensor, idx: Tensor) -> Tensor:
        state = None
        if self.compressor.name == "powersgd":
            if self.factors is None:
                self.factors = tuple(self.compressor.init_state(self.n, self.width, seed=self.seed,  # type: ignore[attr-defined]
                                                                dtype=self.dtype, device=self.device))
            state = tuple(f.index_select(0, idx) for f in self.factors)
        decoded, _, new_state = self.compressor.roundtrip(V, round=self.calls, nodes=nodes, seed=self.seed, state=state)
        if new_state is not None and self.factors is not None:
            for f, g in zip(self.factors, new_state, strict=True):
                f.index_copy_(0, idx, g)
        self.calls += 1
        return decoded

    def _average(self, rows: Tensor, plan: RoundPlan) -> None:
        n = rows.shape[0]
        src = np.arange(n, dtype=np.int64) if plan.sources is None else plan.sources
        idx = torch.as_tensor(src, device=rows.device)
        assert plan.weights is not None
        w = torch.as_tensor(plan.weights, dtype=rows.dtype, device=rows.device).unsqueeze(0)
        part, key = _participants(plan)
        ref = self.refs.get(key, self.start)
        V = rows.index_select(0, idx).sub_(ref)  # what each source sends: its change since x_ref ...
        if self.feedback:
            if self.residual is None:
                self.residual = rows.new_zeros((self.n, self.width))
            V.add_(self.residual.index_select(0, idx))  # ... plus what it did not send before
        decoded = self._roundtrip(V, idx, idx)
        if self.feedback:
            assert self.residual is not None
            self.residual.index_copy_(0, idx, V.sub_(decoded))
        y = torch.matmul(w, decoded).add_(ref * float(plan.weights.sum()))
        if key is None:
            rows.copy_(y.expand_as(rows))
        else:
            tg = torch.as_tensor(part, device=rows.device)
            rows.index_copy_(0, tg, y.expand(tg.numel(), rows.shape[1]))
        self.refs[key] = y

    def _gossip(self, rows: Tensor, rnd: Round, comm: Communicator, overlap: bool) -> None:
        plan = rnd.plan
        if not self.compresses:  # none: x_hat = x after every round
            if self.gamma == 1.0:
                comm.communicate(rows, rnd, overlap=overlap)  # D-PSGD's own round
            else:
                y = rows.clone()
                comm.communicate(y, rnd, overlap=overlap)
                rows.add_(y.sub_(rows), alpha=self.gamma)
            return
        if self.public is None:
            self.public = rows.new_zeros((self.n, self.width))
        P = self.public
        tg = np.arange(rows.shape[0], dtype=np.int64) if plan.targets is None else np.sort(plan.targets)
        idx = torch.as_tensor(tg, device=rows.device)
        decoded = self._roundtrip(rows.index_select(0, idx).sub_(P.index_select(0, idx)), idx, idx)
        if self.gossip_scale != 1.0:
            decoded.mul_(self.gossip_scale)
        P.index_add_(0, idx, decoded)  # every holder of x_hat_i adds q_i
        Y = P.clone()
        plan.apply_(Y)  # sum_j S[j, i] x_hat_j
        rows.index_add_(0, idx, Y.index_select(0, idx).sub_(P.index_select(0, idx)), alpha=self.gamma)

    def _elastic(self, rows: Tensor, rnd: Round, ex: ElasticExchange) -> None:
        if self.copies is None:  # what every node holds of the auxiliary nodes at the first elastic round
            self.copies = rows.clone()
        C, dev = self.copies, rows.device
        V = rows.clone()  # v: what the readers use of each node (its own row where nobody reads it)
        r = torch.as_tensor(ex.replies, device=dev)
        q = self._roundtrip(rows.index_select(0, r).sub_(C.index_select(0, r)), r, r)  # (1) the replies
        if self.gossip_scale != 1.0:
            q.mul_(self.gossip_scale)
        C.index_add_(0, r, q)
        V.index_copy_(0, r, C.index_select(0, r))
        if ex.uploads.size:  # (2) the uploads against the centres' copies
            u = torch.as_tensor(ex.uploads, device=dev)
            ref = C.index_select(0, torch.as_tensor(ex.centres, device=dev))
            c = rows.index_select(0, u).sub_(ref)
            if self.feedback:
                if self.residual is None:
                    self.residual = rows.new_zeros((self.n, self.width))
                c.add_(self.residual.index_select(0, u))
            decoded = self._roundtrip(c, u, u)
            if self.feedback:
                assert self.residual is not None
                self.residual.index_copy_(0, u, c.sub_(decoded))
            V.index_copy_(0, u, ref.add_(decoded))
        ch = torch.as_tensor(ex.changed, device=dev)
        Y = V.clone()
        rnd.plan.apply_(Y)  # (3) sum_i S[i, j] v_i, then node j's own term S[j, j] (x_j - v_j) put right
        diag = torch.as_tensor(ex.diagonal, dtype=rows.dtype, device=dev).unsqueeze(1)
        own = rows.index_select(0, ch).sub_(V.index_select(0, ch)).mul_(diag)
        rows.index_copy_(0, ch, Y.index_select(0, ch).add_(own))

    def _leader(self, rows: Tensor, lead: LeaderRound) -> None:
        """LSGD's refresh: each slot s's leader L sends Q(x_L − s) against the copy its readers hold (one call for
        every slot, keyed by the slots' rows); s ← s + Q(·); every worker i ← P[i, i] x_i + Σ_s P[s, i] s."""
        m, dev = self.workers, rows.device
        slots = torch.as_tensor(lead.slots, device=dev)
        diff = rows.index_select(0, torch.as_tensor(lead.leaders, device=dev)).sub_(rows.index_select(0, slots))
        q = self._roundtrip(diff, slots, slots)
        if self.gossip_scale != 1.0:
            q.mul_(self.gossip_scale)
        rows.index_add_(0, slots, q)
        keep = torch.as_tensor(lead.keep, dtype=rows.dtype, device=dev).unsqueeze(1)
        pull = torch.as_tensor(lead.pull, dtype=rows.dtype, device=dev)
        rows[:m].mul_(keep).add_(pull.T @ rows.index_select(0, slots))

    def _pushes(self, rows: Tensor, order: list[int]) -> None:
        m, dev = self.workers, rows.device
        z = rows[m : m + 1]
        for i in order:
            b = m + 1 + i
            node = torch.tensor([i], device=dev)
            c = rows[i : i + 1] - rows[b : b + 1]  # the push: progress since the last pull ...
            if self.feedback:
                if self.residual is None:
                    self.residual = rows.new_zeros((self.n, self.width))
                c.add_(self.residual[i : i + 1])  # ... plus what earlier pushes did not send
            u = self._roundtrip(c, node, node)
            if self.feedback:
                assert self.residual is not None
                self.residual[i : i + 1] = c.sub_(u)
            z.add_(u)
            slot = torch.tensor([b], device=dev)
            r = self._roundtrip(z - rows[b : b + 1], slot, slot)  # the reply: z's change since b_i
            if self.gossip_scale != 1.0:
                r.mul_(self.gossip_scale)
            rows[b : b + 1].add_(r)
            rows[i : i + 1].copy_(rows[b : b + 1])

    # -- checkpoints and rollbacks ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The per-node state (CPU copies; loadable with ``torch.load(weights_only=True)``)."""
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        keys = list(self.refs)
        return {
            "compress": self.compression.compress, "calls": self.calls, "start": cpu(self.start),
            "ref_targets": [None if k is None else list(k) for k in keys],
            "refs": [cpu(self.refs[k]) for k in keys],
            "residual": cpu(self.residual), "public": cpu(self.public), "copies": cpu(self.copies),
            "factors": None if self.factors is None else [cpu(f) for f in self.factors],
        }

    def load_state_dict(self, state: dict[str, Any], prefix: str = "state_dict.compression") -> None:
        if state.get("compress") != self.compression.compress:
            raise ConfigError.invalid(f"{prefix}.compress", state.get("compress"),
                                      f"the checkpoint's rounds were compressed with {state.get('compress')!r}, this "
                                      f"run uses {self.compression.compress!r}")
        shape = (self.n, self.width)
        for name in ("residual", "public", "copies"):
            t = state.get(name)
            if t is not None and tuple(t.shape) != shape:
                raise ConfigError.invalid(f"{prefix}.{name}", tuple(t.shape), f"expected {shape}")

        def dev(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(self.device, self.dtype).clone()

        self.calls = int(state["calls"])
        self.start = dev(state["start"])  # type: ignore[assignment]
        self.refs = {(None if k is None else tuple(int(i) for i in k)): dev(t)  # type: ignore[misc]
                     for k, t in zip(state["ref_targets"], state["refs"], strict=True)}
        self.residual, self.public = dev(state.get("residual")), dev(state.get("public"))
        self.copies = dev(state.get("copies"))  # absent from checkpoints of runs without elastic rounds
        f = state.get("factors")
        self.factors = None if f is None else tuple(dev(t) for t in f)  # type: ignore[misc]

    def snapshot(self) -> dict[str, Any]:
        """The state for a rollback (copies on the rows' device)."""
        return _copied({"calls": self.calls, "refs": self.refs, "residual": self.residual, "public": self.public,
                        "copies": self.copies, "factors": self.factors})

    def restore(self, snap: dict[str, Any]) -> None:
        """Restore a :meth:`snapshot` (the snapshot stays usable for a later rollback)."""
        s = _copied(snap)
        self.calls, self.refs, self.residual, self.public, self.copies, self.factors = (
            s["calls"], s["refs"], s["residual"], s["public"], s["copies"], s["factors"])


def _copied(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a :meth:`CompressedRounds.snapshot`: its tensors cloned."""
    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.clone()

    f = state["factors"]
    return {"calls": state["calls"], "refs": {k: v.clone() for k, v in state["refs"].items()},
            "residual": c(state["residual"]), "public": c(state["public"]), "copies": c(state.get("copies")),
            "factors": None if f is None else tuple(t.clone() for t in f)}


class ReferenceCompressedRounds:
    """The reference engine's compressed rounds: the same definitions in numpy (float64), one node at a time
    through :func:`~coopsgd.compression.reference_roundtrip` (see the module docstring)."""

    def __init__(self, compression: Compression, *, nodes: int, workers: int, width: int, seed: int,
                 layout: Sequence[Sequence[int]] | None, start: np.ndarray) -> None:
        self.compression = compression
        self.compressor: Compressor = compression.compressor(layout)
        self.compresses = compression.compresses
        self.feedback = compression.feedback(self.compressor)
        self.gamma = compression.gamma(self.compressor, width)
        self.n, self.workers, self.width, self.seed = int(nodes), int(workers), int(width), int(seed)
        self.gossip_scale = _gossip_scale(self.compressor, width)
        self.start = np.array(start, dtype=np.float64).reshape(width)
        self.refs: dict[tuple[int, ...] | None, np.ndarray] = {}
        self.residual: np.ndarray | None = None
        self.public: np.ndarray | None = None
        self.copies: np.ndarray | None = None  # elastic rounds: ẑ (the auxiliary rows are used)
        self.factors: dict[int, Any] = {}  # PowerSGD: node -> its warm-start factors
        self.calls = 0

    def communicate(self, X: np.ndarray, rnd: Round) -> np.ndarray:
        """The state after round ``rnd`` of ``X`` (a new array)."""
        kind = round_exchange(rnd, self.workers)
        if kind == "identity":
            return X
        if self.compresses and (lead := leader_round(rnd, self.workers)) is not None:
            return self._leader(X, lead) if lead.refresh else apply_mixing(X, rnd.matrix)
        if kind == "average" and self.compresses:
            return self._average(X, rnd.plan)
        if kind == "gossip":
            return self._gossip(X, rnd)
        if kind is None and self.compresses:
            order = push_order(rnd, self.workers)
            if order is not None:
                return self._pushes(X, order)
            ex = elastic_exchange(rnd, self.workers)
            if ex is None:
                raise _refuse(rnd, self.compression.compress)
            return self._elastic(X, rnd.matrix, ex)
        return apply_mixing(X, rnd.matrix)

    def settle(self, X: np.ndarray, rnd: Round) -> None:
        if self.compresses and rnd.kind is RoundKind.AVERAGE:
            part, key = _participants(rnd.plan)
            self.refs[key] = X[int(part[0])].copy()

    def _roundtrip(self, V: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        out = np.empty_like(V)
        for r, node in enumerate(nodes.tolist()):
            out[r], state = reference_roundtrip(self.compressor, V[r], round=self.calls, node=node, seed=self.seed,
                                                state=self.factors.get(node))
            if state is not None:
                self.factors[node] = state
        self.calls += 1
        return out

    def _average(self, X: np.ndarray, plan: RoundPlan) -> np.ndarray:
        src = np.arange(X.shape[0], dtype=np.int64) if plan.sources is None else plan.sources
        assert plan.weights is not None
        part, key = _participants(plan)
        ref = self.refs.get(key, self.start)
        V = X[src] - ref
        if self.feedback:
            if self.residual is None:
                self.residual = np.zeros((self.n, self.width))
            V = V + self.residual[src]
        decoded = self._roundtrip(V, src)
        if self.feedback:
            assert self.residual is not None
            self.residual[src] = V - decoded
        y = plan.weights @ decoded + ref * float(plan.weights.sum())
        out = X.copy()
        out[part] = y
        self.refs[key] = y
        return out

    def _gossip(self, X: np.ndarray, rnd: Round) -> np.ndarray:
        if not self.compresses:
            Y = apply_mixing(X, rnd.matrix)
            return Y if self.gamma == 1.0 else X + self.gamma * (Y - X)
        if self.public is None:
            self.public = np.zeros((self.n, self.width))
        P = self.public
        plan = rnd.plan
        tg = np.arange(X.shape[0], dtype=np.int64) if plan.targets is None else np.sort(plan.targets)
        q = self._roundtrip(X[tg] - P[tg], tg)
        P[tg] += q if self.gossip_scale == 1.0 else q * self.gossip_scale
        Y = apply_mixing(P, rnd.matrix)
        out = X.copy()
        out[tg] += self.gamma * (Y[tg] - P[tg])
        return out

    def _elastic(self, X: np.ndarray, S: np.ndarray, ex: ElasticExchange) -> np.ndarray:
        """The definition (module docstring): replies, uploads, then S[j, j] x_j + Σ_{i≠j} S[i, j] v_i."""
        if self.copies is None:
            self.copies = X.copy()
        C = self.copies
        q = self._roundtrip(X[ex.replies] - C[ex.replies], ex.replies)
        C[ex.replies] += q if self.gossip_scale == 1.0 else q * self.gossip_scale
        V = X.copy()
        V[ex.replies] = C[ex.replies]
        if ex.uploads.size:
            ref = C[ex.centres]
            c = X[ex.uploads] - ref
            if self.feedback:
                if self.residual is None:
                    self.residual = np.zeros((self.n, self.width))
                c = c + self.residual[ex.uploads]
            u = self._roundtrip(c, ex.uploads)
            if self.feedback:
                assert self.residual is not None
                self.residual[ex.uploads] = c - u
            V[ex.uploads] = ref + u
        off = np.array(S, dtype=np.float64)
        np.fill_diagonal(off, 0.0)
        out = X.copy()
        out[ex.changed] = ex.diagonal[:, None] * X[ex.changed] + off[:, ex.changed].T @ V
        return out

    def _leader(self, X: np.ndarray, lead: LeaderRound) -> np.ndarray:
        """LSGD's refresh (the definition): s ← s + Q(x_L − s) for every slot; x_i ← P[i, i] x_i + Σ_s P[s, i] s."""
        m = self.workers
        out = X.copy()
        slots, leaders = list(lead.slots), list(lead.leaders)
        q = self._roundtrip(X[leaders] - X[slots], np.asarray(slots))
        out[slots] = X[slots] + (q if self.gossip_scale == 1.0 else q * self.gossip_scale)
        out[:m] = lead.keep[:, None] * X[:m] + lead.pull.T @ out[slots]
        return out

    def _pushes(self, X: np.ndarray, order: list[int]) -> np.ndarray:
        """The definition (module docstring): push Q(x_i − b_i + e_i), reply Q(z − b_i), in order."""
        out = X.copy()
        m = self.workers
        for i in order:
            b = m + 1 + i
            c = out[i] - out[b]
            if self.feedback:
                if self.residual is None:
                    self.residual = np.zeros((self.n, self.width))
                c = c + self.residual[i]
            u = self._roundtrip(c[None, :], np.array([i]))[0]
            if self.feedback:
                assert self.residual is not None
                self.residual[i] = c - u
            out[m] = out[m] + u
            r = self._roundtrip((out[m] - out[b])[None, :], np.array([b]))[0]
            out[b] = out[b] + (r if self.gossip_scale == 1.0 else r * self.gossip_scale)
            out[i] = out[b]
        return out

    def state(self) -> dict[str, Any]:
        """Copies of the per-node state (checkpoints and rollbacks)."""
        def c(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a.copy()

        return {"compress": self.compression.compress, "calls": self.calls,
                "ref_targets": [None if k is None else list(k) for k in self.refs],
                "refs": [v.copy() for v in self.refs.values()], "residual": c(self.residual), "public": c(self.public),
                "copies": c(self.copies), "factors": {str(k): [np.array(f) for f in v] for k, v in self.factors.items()}}

    def load(self, state: dict[str, Any], prefix: str = "state_dict.compression") -> None:
        if state.get("compress") != self.compression.compress:
            raise ConfigError.invalid(f"{prefix}.compress", state.get("compress"),
                                      f"the checkpoint's rounds were compressed with {state.get('compress')!r}, this "
                                      f"run uses {self.compression.compress!r}")

        def c(a: Any) -> np.ndarray | None:
            return None if a is None else np.array(a, dtype=np.float64)

        self.calls = int(state["calls"])
        self.refs = {(None if k is None else tuple(int(i) for i in k)): np.array(v, dtype=np.float64)
                     for k, v in zip(state["ref_targets"], state["refs"], strict=True)}
        self.residual, self.public, self.copies = c(state["residual"]), c(state["public"]), c(state.get("copies"))
        self.factors = {int(k): [np.array(f, dtype=np.float64) for f in v] for k, v in state["factors"].items()}


def load_compression_state(stage: Any, saved: dict[str, Any] | None, *, field: str) -> None:
    """Restore a checkpoint's compressed-round state ``saved`` (its optional ``compression`` key) into ``stage``
    (the engine's compressed stage, ``None`` for an uncompressed run); a checkpoint and a run that disagree about
    compression are refused naming ``field``."""
    if stage is None:
        if saved is not None:
            raise ConfigError.invalid(field, saved.get("compress"), "the checkpoint's rounds were compressed; this "
                                      "run's are not (resume with its compress setting)")
        return
    if saved is None:
        raise ConfigError.invalid(field, None, "missing: the checkpoint's rounds were not compressed, this run "
                                  f"compresses with {stage.compression.compress!r}")
    stage.load_state_dict(saved)
