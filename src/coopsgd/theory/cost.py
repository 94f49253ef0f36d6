"""Communication cost per round and an alpha-beta wall-clock model ([CSGD] Table 3, §3 and Fig. 2).

Three layers:

1. :func:`round_cost` — how many handshakes and how much data one communication round of a pattern
   costs ([CSGD] Table 3), as a :class:`RoundCost`.
2. :class:`NetworkModel` — the alpha-beta (latency-bandwidth) model turning a RoundCost into seconds:
   ``handshakes * latency_s + bytes / bandwidth_Bps``.
3. :class:`ComputeModel` + :func:`expected_runtime` — per-worker compute time per local step drawn from a
   (possibly heavy-tailed, "straggler") distribution, and a Monte Carlo estimate of the wall-clock time
   of K steps with period tau, blocking or with communication overlapped ([CSGD] Fig. 2, §3.3).

Data sizes are counted along the busiest link / node, which is what the alpha-beta model charges: for
all-reduce 2d floats per worker (ring all-reduce sends ~2d(m-1)/m), for a parameter server 2dm floats
through the server (m pushes and m pulls of d floats), for neighbour exchange 2d per neighbour.

Pure numpy; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coopsgd.errors import ConfigError, check_choice, check_float, check_int

__all__ = [
    "worker_speeds",
    "PATTERNS",
    "DISTRIBUTIONS",
    "RoundCost",
    "round_cost",
    "NetworkModel",
    "ComputeModel",
    "expected_runtime",
]

PATTERNS: tuple[str, ...] = ("allreduce", "neighbor", "parameter_server", "broadcast", "none")
_PATTERN_ALIASES = {"all_reduce": "allreduce", "decentralized": "neighbor", "neighbour": "neighbor",
                    "ps": "parameter_server"}  # after check_choice's normalisation ("-" is "_")

DISTRIBUTIONS: tuple[str, ...] = ("constant", "exponential", "lognormal", "pareto")
_DISTRIBUTION_ALIASES = {"straggler": "pareto"}


# ---------------------------------------------------------------------------------------------------------
# Per-round cost ([CSGD] Table 3)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundCost:
    """Cost of one communication round.

    Attributes:
        pattern: canonical pattern name (one of :data:`PATTERNS`).
        handshakes: sequential connection set-ups on the critical path (each costs one latency).
        floats_sent: floats through the busiest link / node.
        bytes_sent: ``floats_sent * bytes_per_param``.
        codec_s: seconds of encoding and decoding on the critical path of a compressed round
            (:mod:`coopsgd.theory.codec`); 0 for an uncompressed one.
    """

    pattern: str
    handshakes: int
    floats_sent: float
    bytes_sent: float
    codec_s: float = 0.0



def round_cost(
    pattern: str,
    *,
    workers: int,
    params: int,
    max_degree: int | None = None,
    bytes_per_param: float = 4,
) -> RoundCost:
    """Handshakes and data of one round of ``pattern`` with m = ``workers`` and d = ``params``.

    ========================  ====================  =====================
    pattern                   handshakes            floats sent
    ========================  ====================  =====================
    ``"allreduce"``           m                     2d            ([CSGD] Table 3)
    ``"neighbor"``            max_degree            2d * max_degree   (decentralized, Table 3)
    ``"parameter_server"``    m                     2dm           ([CSGD] Table 3)
    ``"broadcast"``           ceil(log2 m)          d * ceil(log2 m)  (our choice, see below)
    ``"none"``                0                     0
    ========================  ====================  =====================

    ``"broadcast"`` (one node sends its d floats to all others, e.g. a leader refresh) is modelled as a
    binomial-tree broadcast: ceil(log2 m) sequential hops of d floats each. ``max_degree`` (required for
    ``"neighbor"``) is the largest number of neighbours of a node, self excluded. With a single worker
    all-reduce, neighbour exchange and broadcast cost nothing; a parameter server (a separate node) still
    costs 1 handshake and 2d floats. Aliases: ``decentralized``/``neighbour`` → neighbor,
    ``all_reduce`` → allreduce, ``ps`` → parameter_server.
    """
    key = check_choice("pattern", pattern, PATTERNS, _PATTERN_ALIASES)
    m = check_int("workers", workers, minimum=1)
    d = check_int("params", params, minimum=0)
    bpp = check_float("bytes_per_param", bytes_per_param, low=0.0, low_open=True)

    if key == "neighbor":
        if max_degree is None:
            raise ConfigError.invalid("max_degree", max_degree, "is required for pattern 'neighbor'")
        deg = check_int("max_degree", max_degree, minimum=0, maximum=m - 1)
        hs, floats = deg, 2.0 * d * deg
    else:
        if max_degree is not None:
            check_int("max_degree", max_degree, minimum=0, maximum=m - 1)
        if key == "allreduce":
            hs, floats = (m, 2.0 * d) if m > 1 else (0, 0.0)
        elif key == "parameter_server":
            hs, floats = m, 2.0 * d * m
        elif key == "broadcast":
            hops = math.ceil(math.log2(m)) if m > 1 else 0
            hs, floats = hops, float(d) * hops
        else:  # none
            hs, floats = 0, 0.0
    return RoundCost(
        pattern=key, handshakes=int(hs), floats_sent=float(floats), bytes_sent=float(floats) * bpp
    )


# ---------------------------------------------------------------------------------------------------------
# Alpha-beta network model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkModel:
    """alpha-beta network: each handshake costs ``latency_s`` (alpha), each byte ``1/bandwidth_Bps`` (beta).

    Defaults: 1 ms latency, 1.25e9 B/s (10 Gbit/s).
    """

    latency_s: float = 1e-3
    bandwidth_Bps: float = 1.25e9

    def __post_init__(self) -> None:
        object.__setattr__(self, "latency_s", check_float("latency_s", self.latency_s, low=0.0))
        object.__setattr__(
            self, "bandwidth_Bps", check_float("bandwidth_Bps", self.bandwidth_Bps, low=0.0, low_open=True)
        )

    @classmethod
    def from_mbps(cls, latency_ms: float, bandwidth_mbps: float) -> NetworkModel:
        """Build from a latency in milliseconds and a bandwidth in megabits per second (1 Mbit = 1e6 bit)."""
        lat = check_float("latency_ms", latency_ms, low=0.0)
        bw = check_float("bandwidth_mbps", bandwidth_mbps, low=0.0, low_open=True)
        return cls(latency_s=lat / 1e3, bandwidth_Bps=bw * 1e6 / 8.0)

    def round_time(self, cost: RoundCost) -> float:
        """Seconds of one round: its transfer (:meth:`transfer_time`) plus its codec time ``cost.codec_s`` (0
        for an uncompressed round, whose time is then the transfer's, bit for bit)."""
        t = self.transfer_time(cost)
        return t + cost.codec_s if cost.codec_s else t

    def transfer_time(self, cost: RoundCost) -> float:
        """Seconds on the wire: ``handshakes * latency_s + bytes_sent / bandwidth_Bps``."""
        if not isinstance(cost, RoundCost):
            raise ConfigError.invalid("cost", cost, "must be a RoundCost (see round_cost)")
        return cost.handshakes * self.latency_s + cost.bytes_sent / self.bandwidth_Bps


# ---------------------------------------------------------------------------------------------------------
# Compute-time model (stragglers)
# ---------------------------------------------------------------------------------------------------------


def worker_speeds(speeds: Sequence[float] | None, workers: int) -> np.ndarray:
    """Each worker's relative speed from speed classes: the workers split into ``len(speeds)`` consecutive
    blocks of equal size (``numpy.array_split``: the first blocks take one more worker when m does not
    divide), block j running at ``speeds[j]``. A worker of speed s takes 1/s times the compute time of a
    step; ``None`` or an empty list: every worker at speed 1. ``speeds = (1, 0.5)`` with m = 8: workers 0-3
    at full speed, workers 4-7 twice as slow."""
    m = check_int("workers", workers, minimum=1)
    if not speeds:
        return np.ones(m)
    vals = [check_float("worker_speeds", float(s), low=0.0, low_open=True) for s in speeds]
    if len(vals) > m:
        raise ConfigError.invalid("worker_speeds", ",".join(f"{v:g}" for v in vals),
                                  f"at most one speed class per worker ({m} workers)")
    out = np.empty(m)
    for block, v in zip(np.array_split(np.arange(m), len(vals)), vals, strict=True):
        out[block] = v
    return out


@dataclass(frozen=True)
class ComputeModel:
    """Distribution of one worker's compute time for one local step; every choice has mean ``mean_s``.

    ``spread`` = s >= 0 sets the variability (s = 0 is always the constant ``mean_s``):

    * ``"constant"``: always ``mean_s`` (``spread`` ignored).
    * ``"exponential"``: shifted exponential ``mean_s*(1-s) + Exp(scale=mean_s*s)``, s in [0, 1];
      s = 1 is a pure exponential (coefficient of variation s).
    * ``"lognormal"``: ``mean_s * exp(s*Z - s^2/2)``, Z ~ N(0, 1): s is the std of the log-time.
    * ``"pareto"`` (alias ``"straggler"``): heavy tail, classical Pareto with shape a = 1 + 1/s and scale
      ``mean_s/(1+s)``; the variance is finite only for s < 1 (rare, very slow stragglers as s grows).
    """

    mean_s: float = 0.01
    distribution: str = "constant"
    spread: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean_s", check_float("mean_s", self.mean_s, low=0.0))
        key = check_choice("distribution", self.distribution, DISTRIBUTIONS, _DISTRIBUTION_ALIASES)
        object.__setattr__(self, "distribution", key)
        high = 1.0 if key == "exponential" else None
        object.__setattr__(self, "spread", check_float("spread", self.spread, low=0.0, high=high))

    @property
    def deterministic(self) -> bool:
        return self.distribution == "constant" or self.spread == 0.0

    def sample(self, rng: np.random.Generator, size: int | Sequence[int]) -> np.ndarray:
        """``size`` i.i.d. per-step compute times (seconds)."""
        mu, s = self.mean_s, self.spread
        if self.deterministic:
            return np.full(size, mu, dtype=np.float64)
        if self.distribution == "exponential":
            return mu * (1.0 - s) + rng.exponential(mu * s, size)
        if self.distribution == "lognormal":
            return mu * np.exp(s * rng.standard_normal(size) - 0.5 * s * s)
        a = 1.0 + 1.0 / s  # pareto
        return (mu / (1.0 + s)) * (1.0 + rng.pareto(a, size))


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo wall-clock
# ---------------------------------------------------------------------------------------------------------

_CHUNK_FLOATS = 4_000_000  # samples drawn at once (32 MB of float64)


def _round_compute(
    compute: ComputeModel, rng: np.random.Generator, trials: int, lengths: list[int], workers: int
) -> np.ndarray:
    """Per-(trial, round, worker) compute time: the sum of that round's per-step times. Shape (T, R, m)."""
    R = len(lengths)
    if compute.deterministic:
        row = np.array([n * compute.mean_s for n in lengths], dtype=np.float64)
        return np.broadcast_to(row[None, :, None], (1, R, workers)).copy()
    out = np.empty((trials, R, workers))
    full = [i for i, n in enumerate(lengths) if n == lengths[0]]
    rest = [i for i, n in enumerate(lengths) if n != lengths[0]]
    steps_per_trial = sum(lengths) * workers
    chunk = max(1, _CHUNK_FLOATS // max(1, steps_per_trial))
    for t0 in range(0, trials, chunk):
        t1 = min(trials, t0 + chunk)
        n = lengths[0]
        out[t0:t1, full, :] = compute.sample(rng, (t1 - t0, len(full), workers, n)).sum(axis=-1)
        for i in rest:  # at most one trailing partial round
            out[t0:t1, i, :] = compute.sample(rng, (t1 - t0, workers, lengths[i])).sum(axis=-1)
    return out


def expected_runtime(
    *,
    steps: int,
    tau: int,
    workers: int,
    cost: RoundCost,
    network: NetworkModel,
    compute: ComputeModel,
    overlap: bool = False,
    seed: int = 0,
    trials: int = 200,
) -> dict[str, float]:
    """Expected wall-clock time of ``steps`` local steps with period ``tau`` on ``workers`` workers.

    Model ([CSGD] Fig. 2): the run is split into rounds of ``tau`` local steps (a trailing partial round
    of ``steps % tau`` steps has no communication, matching S_k = W only when k mod tau = 0). In round j
    worker i computes for C_ji (the sum of its sampled per-step times); the round's compute phase ends
    when the slowest worker is done, max_i C_ji; then the round's communication takes
    c = ``network.round_time(cost)`` seconds.

    * ``overlap=False`` (blocking): total = sum_j (max_i C_ji + c_j).
    * ``overlap=True`` (non-blocking, [CSGD] §3.3): round j's communication runs while round j+1's local
      steps are computed, and round j+1's communication can start only once both are done:
      total = max_i C_1i + sum_{j>=2} max(c_{j-1}, max_i C_ji) + c_R. With constant compute and R
      communicating rounds this is tau*mu + (R-1)*max(tau*mu, c) + c: the first round's compute and the
      last round's communication are never hidden.

    Returns the trial means of: ``total_s``; ``compute_s`` (a worker's busy time, averaged over workers);
    ``idle_s`` (time waiting for the slowest worker, averaged over workers); ``communication_s`` (exposed
    communication, i.e. total minus the compute phases); so total = compute + idle + communication. Also
    ``per_step_s`` = total/steps, ``communication_fraction`` = communication/total, ``total_std_s`` (std over
    trials) and ``rounds`` (number of communication rounds, steps // tau).
    """
    steps = check_int("steps", steps, minimum=1)
    tau = check_int("tau", tau, minimum=1)
    m = check_int("workers", workers, minimum=1)
    trials = check_int("trials", trials, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(cost, RoundCost):
        raise ConfigError.invalid("cost", cost, "must be a RoundCost (see round_cost)")
    if not isinstance(network, NetworkModel):
        raise ConfigError.invalid("network", network, "must be a NetworkModel")
    if not isinstance(compute, ComputeModel):
        raise ConfigError.invalid("compute", compute, "must be a ComputeModel")
    if not isinstance(overlap, bool):
        raise ConfigError.invalid("overlap", overlap, "must be True or False")

    n_comm, rem = divmod(steps, tau)
    lengths = [tau] * n_comm + ([rem] if rem else [])
    comm = network.round_time(cost)
    c = np.array([comm] * n_comm + ([0.0] if rem else []), dtype=np.float64)

    rng = np.random.default_rng(seed)
    C = _round_compute(compute, rng, trials, lengths, m)  # (T, R, m)
    slowest = C.max(axis=2)  # (T, R)
    busy = C.sum(axis=1).mean(axis=1)  # (T,)
    phases = slowest.sum(axis=1)  # (T,)
    if overlap:
        total = slowest[:, 0] + np.maximum(c[None, :-1], slowest[:, 1:]).sum(axis=1) + c[-1]
    else:
        total = phases + c.sum()
    idle = phases - busy
    exposed = total - phases
    mean_total = float(total.mean())
    mean_comm = float(exposed.mean())
    return {
        "total_s": mean_total,
        "compute_s": float(busy.mean()),
        "communication_s": mean_comm,
        "idle_s": float(idle.mean()),
        "per_step_s": mean_total / steps,
        "communication_fraction": mean_comm / mean_total if mean_total > 0 else 0.0,
        "total_std_s": float(total.std()),
        "rounds": float(n_comm),
    }
