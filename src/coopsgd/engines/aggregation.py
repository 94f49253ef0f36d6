"""Robust aggregation of FedAvg's rounds in torch, batched over the sampled rows (the simulator's kernel).

The rules and attacks are defined in :mod:`coopsgd.algorithms.robust` (with their numpy definition, which
the reference engine runs); this module computes the same in torch on the rows of the round's sampled
clients, and :class:`RobustRounds` turns a FedAvg round into one the in-process communicator applies as it
applies FedAvg's: the aggregate is written into one sampled row and the round copies that row to every node
(a plan with one source of weight 1, so the deferred broadcast of sampled rounds is kept: a round still
costs O(sampled clients) rows, plus the rule's own work -- O(k d log k) for the coordinate-wise rules,
O(k^2 d) for Krum's distances). On the distributed engine each rank holds its own client: the kernel
all-gathers every rank's row and each rank computes the same aggregate (:meth:`RobustRounds.aggregate_round`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.robust import RobustAggregation
from coopsgd.engines.mixing import Round, RoundKind, RoundPlan

__all__ = ["RobustRounds", "aggregate", "attack_", "krum_scores"]


def attack_(robust: RobustAggregation, X: Tensor, z: Tensor, sources: np.ndarray, round_index: int,
            params: slice) -> Tensor:
    """Replace, in place, the rows of ``X`` (k, width: what the sampled clients ``sources`` send) that belong
    to Byzantine clients by their attack (z: the server model's row before the round); returns ``X``."""
    bad = np.flatnonzero(np.isin(sources, robust.byzantine()))
    for r in bad.tolist():
        y, zp = X[r, params], z[params]
        if robust.attack == "sign_flip":
            y.copy_(zp - (y - zp))
        elif robust.attack == "scale":
            y.copy_(zp + robust.attack_scale * (y - zp))
        else:
            xi = torch.as_tensor(robust.noise(round_index, int(sources[r]), y.numel()), dtype=X.dtype,
                                 device=X.device)
            y.copy_(zp + robust.attack_std * xi)
    return X


def krum_scores(P: Tensor, f: int) -> Tensor:
    """Krum's scores of the rows of ``P`` (k, d): each row's summed squared distances to its k - f - 2 nearest
    other rows (distances row by row: O(k d) memory)."""
    k = P.shape[0]
    D = torch.stack([((P - P[i]) ** 2).sum(dim=1) for i in range(k)])
    D.fill_diagonal_(float("inf"))  # a row is not its own neighbour: it sorts last
    near = k - f - 2
    return torch.sort(D, dim=1).values[:, :near].sum(dim=1)


def aggregate(robust: RobustAggregation, X: Tensor, weights: Tensor, params: slice) -> Tensor:
    """The rule's aggregate of the received rows ``X`` (k, width) with FedAvg's ``weights`` (k,): (1, width)."""
    k = X.shape[0]
    rule = robust.rule
    if rule == "mean":
        return torch.matmul(weights.unsqueeze(0), X)
    if rule == "median":
        s = torch.sort(X, dim=0).values
        h = k // 2
        y = s[h] if k % 2 else (s[h - 1] + s[h]) / 2
        return y.unsqueeze(0)
    if rule == "trimmed_mean":
        b = robust.trimmed(k)
        return torch.sort(X, dim=0).values[b : k - b].mean(dim=0, keepdim=True)
    scores = krum_scores(X[:, params], robust.f).cpu().numpy()
    order = np.argsort(scores, kind="stable")  # ties: the lowest client index
    if rule == "krum":
        return X[int(order[0])].unsqueeze(0).clone()
    keep = torch.as_tensor(np.sort(order[: robust.keep]), device=X.device)
    ws = weights.index_select(0, keep)
    return torch.matmul((ws / ws.sum()).unsqueeze(0), X.index_select(0, keep))


class RobustRounds:
    """The kernel's stage for a spec with :class:`RobustAggregation`: turns each FedAvg round (an averaging
    plan with weights) into the round that sends the robust aggregate of what the sampled clients send.

    Args:
        robust: the rule and the attackers.
        workers: the clients' rows are ``0 .. workers - 1``, the server model row ``workers``.
        params: the parameter columns inside the mixed column range.
    """

    def __init__(self, robust: RobustAggregation, workers: int, params: slice) -> None:
        self.robust = robust
        self.m = int(workers)
        self.params = params

    @staticmethod
    def applies(rnd: Round) -> bool:
        return rnd.kind is RoundKind.AVERAGE and rnd.plan.weights is not None and rnd.mix is not None

    def aggregate_round(self, clients: Tensor, z: Tensor, rnd: Round) -> Tensor:
        """The round's aggregate (1, width) from ``clients`` (every client's row, client i at row i: more rows
        may follow) and the server model's row ``z`` before the round: the sampled rows, attacked where a
        Byzantine client sends them, combined by the rule."""
        plan = rnd.plan
        assert plan.weights is not None and rnd.mix is not None
        sources = np.arange(plan.n) if plan.sources is None else plan.sources
        X = clients.index_select(0, torch.as_tensor(sources, device=clients.device))
        attack_(self.robust, X, z, sources, int(rnd.mix.round), self.params)
        w = torch.as_tensor(plan.weights, dtype=clients.dtype, device=clients.device)
        return aggregate(self.robust, X, w, self.params)

    def prepare(self, rows: Tensor, rnd: Round) -> Round:
        """Compute the round's aggregate from ``rows`` (every node, the mixed columns; the sampled rows must
        be materialized), write it into the first sampled row, and return the round that sends that row to
        every node the original round changes."""
        plan = rnd.plan
        y = self.aggregate_round(rows, rows[self.m], rnd)
        sources = np.arange(plan.n) if plan.sources is None else plan.sources
        j = int(sources[0])
        rows[j].copy_(y[0])
        one = RoundPlan(RoundKind.AVERAGE, plan.n, targets=plan.targets, sources=np.array([j], dtype=np.int64),
                        weights=np.ones(1), col_abs_max=1.0)
        return Round(one, rnd.mix, rnd.source)
