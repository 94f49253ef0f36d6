"""Robust aggregation and simulated Byzantine clients for FedAvg's rounds (as data, with a numpy definition).

A FedAvg round sends the server the sampled clients' models y_i and sets every node to their weighted mean.
:class:`RobustAggregation` replaces that mean by another rule and lets a fixed set of clients lie about
their model. What the server receives from a sampled client i (k of them in the round, z the server model
before the round):

* an honest client sends y_i;
* a Byzantine client (a set drawn once per run, see :meth:`RobustAggregation.byzantine`) trains honestly and
  sends, in the parameter columns,

  - ``sign_flip``: ``z - (y_i - z)`` (its update negated),
  - ``gaussian``: ``z + sigma xi``, xi ~ N(0, I) drawn from ``default_rng([seed, 0xB12, round, i])`` (float64,
    then the state's dtype), sigma = ``attack_std``,
  - ``scale``: ``z + s (y_i - z)``, s = ``attack_scale``.

The rules, on the k received rows (applied to the models, not to their differences from z; for the
coordinate-wise rules both give the same result up to rounding, for Krum the same distances):

* ``mean``: the weighted mean (FedAvg's weights, the sample counts) -- the rounds are FedAvg's, unchanged;
* ``median``: the coordinate-wise median, unweighted (even k: the mean of the two middle values);
* ``trimmed_mean``: per coordinate, drop the b largest and the b smallest values and take the unweighted mean
  of the k - 2b left, b = floor(trim k) (``trim`` in [0, 0.5); default 0.2, Flower's FedTrimmedAvg);
* ``krum`` (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017): the score of row i is the sum of its
  squared Euclidean distances (parameter columns) to its k - f - 2 nearest other rows; the row of lowest score
  is the aggregate (ties: the lowest client index);
* ``multi_krum``: the weighted mean (renormalised sample-count weights) of the ``multi_krum_keep`` rows of
  lowest score (default k - f, the paper's m = n - f; ties by client index); keeping all k is the mean.

f, the number of Byzantine clients Krum assumes among the k, is ``krum_f`` when given, else
round(byzantine_fraction k). Krum needs k - f - 2 >= 1.

Only the parameter columns are attacked; the other mixed columns (buffers, optimizer state under the "mix"
policy) are sent honestly and aggregated by the same rule (Krum's choice is made on the parameters).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["RobustAggregation", "AGGREGATIONS", "ATTACKS", "aggregate_np", "attack_np"]

AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
ATTACKS = ("sign_flip", "gaussian", "scale")
#: the tag that separates the Byzantine draws from the client sampling's ``(seed, round)`` streams
_TAG = 0xB12


@dataclass(frozen=True)
class RobustAggregation:
    """The aggregation rule of a FedAvg-family spec and its simulated Byzantine clients (module docstring).

    Attributes:
        rule: one of :data:`AGGREGATIONS`.
        workers: the number of clients m; ``clients``: how many are sampled per round (k).
        seed: the run's seed (the Byzantine set and the Gaussian draws).
        trim: ``trimmed_mean``'s fraction cut at each end, in [0, 0.5).
        byzantine_fraction: the fraction of the m clients that are Byzantine, in [0, 1); their number is
            round(byzantine_fraction m).
        attack: what they send (:data:`ATTACKS`).
        attack_std: ``gaussian``'s sigma (> 0); attack_scale: ``scale``'s s.
        krum_f: Krum's f (``None``: round(byzantine_fraction k)); multi_krum_keep: how many rows multi-Krum
            averages (``None``: k - f).
    """

    rule: str
    workers: int
    clients: int
    seed: int = 0
    trim: float = 0.2
    byzantine_fraction: float = 0.0
    attack: str = "sign_flip"
    attack_std: float = 1.0
    attack_scale: float = 10.0
    krum_f: int | None = None
    multi_krum_keep: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise ConfigError.invalid("aggregation", self.rule, f"choose one of {', '.join(AGGREGATIONS)}")
        if self.attack not in ATTACKS:
            raise ConfigError.invalid("attack", self.attack, f"choose one of {', '.join(ATTACKS)}")
        m = check_int("workers", self.workers, minimum=1)
        k = check_int("clients", self.clients, minimum=1, maximum=m)
        object.__setattr__(self, "trim", check_float("trim", self.trim, low=0.0, high=0.5, high_open=True))
        object.__setattr__(self, "byzantine_fraction", check_float("byzantine_fraction", self.byzantine_fraction,
                                                                   low=0.0, high=1.0, high_open=True))
        object.__setattr__(self, "attack_std", check_float("attack_std", self.attack_std, low=0.0, low_open=True))
        object.__setattr__(self, "attack_scale", check_float("attack_scale", self.attack_scale))
        if self.krum_f is not None:
            object.__setattr__(self, "krum_f", check_int("krum_f", self.krum_f, minimum=0))
        if self.rule in ("krum", "multi_krum") and k - self.f - 2 < 1:
            raise ConfigError.invalid("krum_f" if self.krum_f is not None else "aggregation", self.krum_f
                                      if self.krum_f is not None else self.rule,
                                      f"Krum scores each client by its k - f - 2 nearest others: with k = {k} "
                                      f"clients per round and f = {self.f} it needs k >= f + 3")
        if self.multi_krum_keep is not None:
            keep = check_int("multi_krum_keep", self.multi_krum_keep, minimum=1, maximum=k)
            object.__setattr__(self, "multi_krum_keep", keep)
            if self.rule != "multi_krum":
                raise ConfigError.invalid("multi_krum_keep", keep, "only with aggregation multi_krum")

    @property
    def f(self) -> int:
        """Krum's assumed number of Byzantine clients among the k of a round."""
        if self.krum_f is not None:
            return int(self.krum_f)
        return int(round(self.byzantine_fraction * self.clients))

    @property
    def keep(self) -> int:
        """How many rows multi-Krum averages."""
        return int(self.multi_krum_keep) if self.multi_krum_keep is not None else self.clients - self.f

    def trimmed(self, k: int) -> int:
        """b: how many values ``trimmed_mean`` drops at each end of k."""
        return int(np.floor(self.trim * k))

    @property
    def byzantine_count(self) -> int:
        return int(round(self.byzantine_fraction * self.workers))

    @property
    def active(self) -> bool:
        """Whether the rounds differ from FedAvg's weighted mean (a rule other than the mean, or attackers)."""
        return self.rule != "mean" or self.byzantine_count > 0

    def byzantine(self) -> np.ndarray:
        """The sorted Byzantine clients: round(byzantine_fraction m) of the m, drawn once per run without
        replacement from ``default_rng([seed, 0xB12])`` (the same set on every engine and after a resume)."""
        return _byzantine(int(self.seed), int(self.workers), self.byzantine_count).copy()

    def noise(self, round_index: int, client: int, d: int) -> np.ndarray:
        """``gaussian``'s xi for ``client`` at round ``round_index`` (float64, shape (d,))."""
        rng = np.random.default_rng([int(self.seed), _TAG, int(round_index), int(client)])
        return rng.standard_normal(d)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"aggregation": self.rule}
        if self.rule == "trimmed_mean":
            out["trim"] = self.trim
        if self.rule in ("krum", "multi_krum"):
            out["krum_f"] = self.f
        if self.rule == "multi_krum":
            out["multi_krum_keep"] = self.keep
        if self.byzantine_count:
            out.update(byzantine_fraction=self.byzantine_fraction, byzantine=self.byzantine().tolist(),
                       attack=self.attack)
            if self.attack == "gaussian":
                out["attack_std"] = self.attack_std
            if self.attack == "scale":
                out["attack_scale"] = self.attack_scale
        return out


@functools.lru_cache(maxsize=16)
def _byzantine(seed: int, workers: int, count: int) -> np.ndarray:
    """The draw of :meth:`RobustAggregation.byzantine` (cached: every round asks for it)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, _TAG])
    return np.sort(rng.choice(workers, size=count, replace=False)).astype(np.int64)


def attack_np(robust: RobustAggregation, X: np.ndarray, z: np.ndarray, sources: np.ndarray, round_index: int,
              params: slice) -> np.ndarray:
    """What the server receives from the sampled clients ``sources`` whose rows are ``X`` (k, width), z being
    the server model's row (width,); a new array (numpy definition)."""
    out = np.array(X, dtype=np.float64, copy=True)
    bad = np.isin(sources, robust.byzantine())
    for r in np.flatnonzero(bad).tolist():
        y, zp = out[r, params], z[params]
        if robust.attack == "sign_flip":
            out[r, params] = zp - (y - zp)
        elif robust.attack == "scale":
            out[r, params] = zp + robust.attack_scale * (y - zp)
        else:
            out[r, params] = zp + robust.attack_std * robust.noise(round_index, int(sources[r]), y.size)
    return out


def krum_scores_np(P: np.ndarray, f: int) -> np.ndarray:
    """Krum's scores of the rows of ``P`` (k, d): each row's summed squared distances to its k - f - 2 nearest
    other rows."""
    k = P.shape[0]
    D = np.empty((k, k))
    for i in range(k):
        D[i] = ((P - P[i]) ** 2).sum(axis=1)
    near = k - f - 2
    scores = np.empty(k)
    for i in range(k):
        others = np.sort(np.delete(D[i], i))
        scores[i] = others[:near].sum()
    return scores


def aggregate_np(robust: RobustAggregation, X: np.ndarray, weights: np.ndarray, params: slice) -> np.ndarray:
    """The rule's aggregate of the received rows ``X`` (k, width) with FedAvg's ``weights`` (k,): (width,)."""
    X = np.asarray(X, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    k = X.shape[0]
    rule = robust.rule
    if rule == "mean":
        return w @ X
    if rule == "median":
        return np.median(X, axis=0)
    if rule == "trimmed_mean":
        b = robust.trimmed(k)
        return np.sort(X, axis=0)[b : k - b].mean(axis=0)
    scores = krum_scores_np(X[:, params], robust.f)
    order = np.argsort(scores, kind="stable")
    if rule == "krum":
        return X[order[0]].copy()
    keep = np.sort(order[: robust.keep])
    ws = w[keep] / w[keep].sum()
    return ws @ X[keep]
