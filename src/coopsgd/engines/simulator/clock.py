"""Simulated wall-clock for the one-process simulator ([CSGD] Fig. 2 and §3.3; alpha-beta cost model).

Every worker has its own clock. A local step adds that worker's compute time, from one of three sources:

* :class:`FlopCompute` (the default of the simulator and of every :class:`~coopsgd.train.config.RunConfig`
  run): the FLOPs of the worker's forward + backward pass, counted once per model and batch shape with
  ``torch.utils.flop_counter.FlopCounterMode``, divided by a stated throughput (``gflops``, default
  :data:`DEFAULT_GFLOPS`). It does not depend on the machine or its load: the same run gives the same
  simulated times everywhere;
* a :class:`~coopsgd.theory.cost.ComputeModel`: a seeded draw from a distribution (stragglers);
* ``None``: the compute time the simulator *measured* for the worker (follows the machine's load; two runs
  differ).

A communication
round synchronises the workers -- each waits for the slowest (*idle* time) -- and then costs the
alpha-beta time of the round (:func:`~coopsgd.theory.cost.round_cost` priced by a
:class:`~coopsgd.theory.cost.NetworkModel`):

* blocking rounds: every worker resumes ``c`` seconds after the slowest one arrived;
* overlapped rounds (``spec.overlap``: non-blocking EASGD, hierarchical and generalized elastic averaging):
  the round's communication runs while the next local steps are computed; the next round can start only
  when both are done, and at the end of the run the last round's communication is waited for. Only the
  part of ``c`` that the computation does not hide is charged.

This is exactly the model of :func:`coopsgd.theory.cost.expected_runtime` (a test checks it), stepped one
step at a time. Totals follow its conventions: ``compute_s`` and ``idle_s`` are averages over workers
(idle includes waiting, at the end, for the slowest worker), ``communication_s`` is the exposed
communication, and ``elapsed = compute_s + idle_s + communication_s``.

Patterns (the schedule's :attr:`Mix.pattern`): ``"allreduce"`` and ``"parameter_server"`` as in [CSGD]
Table 3; ``"neighbor"`` with the largest in-degree of the round's matrix; ``"broadcast"`` is LSGD's leader
refresh, priced as an all-gather of the m loss estimates (m handshakes, m floats) plus a binomial-tree
broadcast of the d parameters; ``"local"`` (LSGD's pull toward a locally held leader copy) costs nothing
and does not synchronise.

A compressed round also costs its encoding and decoding (``RoundCost.codec_s``, :mod:`coopsgd.theory.codec`):
the compressor's stated throughputs by default (deterministic), or measured ones (``codec``, from
:func:`coopsgd.engines.simulator.codec.calibrate_all`). Uncompressed rounds have none: their times are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coopsgd.algorithms.communication import compressed_round_cost
from coopsgd.errors import ConfigError, check_float
from coopsgd.theory.codec import CodecSpeed, CodecTime, codec_time
from coopsgd.theory.cost import ComputeModel, NetworkModel, RoundCost, round_cost, worker_speeds

__all__ = ["SimClock", "ComputeTick", "FlopCompute", "DEFAULT_GFLOPS", "round_senders"]

#: Default throughput of :class:`FlopCompute`, in GFLOP/s per worker: a stated, round, conservative figure
#: for one CPU core running PyTorch's float32 training kernels on small per-worker batches. Where it comes
#: from: the float32 peak of a ~3 GHz AVX2 core (two 8-lane FMA units) is 2 x 8 x 2 x 3 = 96 GFLOP/s, and
#: small-batch training reaches a fraction of it. For reference, one thread of an AMD EPYC core (torch 2.13,
#: batch 32, forward + backward, counted FLOPs / measured seconds) gave MLP 44, LeNet 29, LSTM LM 60,
#: ResNet-20 116 and CNN-7 161 GFLOP/s. It is an assumption, not a measurement of this machine: pass
#: ``compute_gflops`` to model another worker (a GPU: thousands).
DEFAULT_GFLOPS = 20.0


@dataclass(frozen=True)
class FlopCompute:
    """Compute time of a local step = the worker's counted FLOPs / (``gflops`` x 1e9).

    The simulator counts the FLOPs of one forward + backward pass of one worker (model + loss) once per
    batch shape with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and
    attention are counted; element-wise operations are not) and passes them to
    :meth:`SimClock.add_compute`. Where a model cannot be counted (an error, or zero counted FLOPs) the
    simulator warns and the clock uses ``fallback``: a :class:`~coopsgd.theory.cost.ComputeModel` (the
    trainer passes ``constant`` ``compute_ms``, which stays deterministic) or ``None`` (measured time).
    """

    gflops: float = DEFAULT_GFLOPS
    fallback: ComputeModel | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gflops", check_float("compute_gflops", self.gflops, low=0.0, low_open=True))
        if self.fallback is not None and not isinstance(self.fallback, ComputeModel):
            raise ConfigError.invalid("fallback", self.fallback, "must be a coopsgd.theory.cost.ComputeModel or None")

    def seconds(self, flops: np.ndarray | float) -> np.ndarray:
        """Seconds of compute for ``flops`` floating-point operations."""
        return np.asarray(flops, dtype=np.float64) / (self.gflops * 1e9)

    def fallback_name(self) -> str:
        """What the clock uses for a model it cannot count, in words."""
        if self.fallback is None:
            return "the measured compute time"
        f = self.fallback
        spread = "" if f.distribution == "constant" else f", spread {f.spread:g}"
        return f"{f.distribution} {f.mean_s * 1e3:g} ms per step{spread} (compute_ms)"


def round_senders(mix: Any, workers: int) -> int | None:
    """The workers that send and receive in the round ``mix`` when not all do: a sampled FedAvg round (a
    ``parameter_server`` round with its :class:`~coopsgd.algorithms.schedules.Averaging` structure) has its k
    sampled clients; the unsampled ones are not synchronised. ``None``: every worker."""
    st = getattr(mix, "structure", None)
    if st is None or mix.pattern != "parameter_server":
        return None
    return int(np.count_nonzero(st.sources < workers))


@dataclass(frozen=True)
class ComputeTick:
    """One step of compute, computed but not yet charged (:meth:`SimClock.compute_tick`): per-worker
    seconds, and the clock generator's state after its draws (``None``: nothing drawn)."""

    dt: np.ndarray
    rng_state: Mapping[str, Any] | None = None


class SimClock:
    """Per-worker simulated clocks plus an alpha-beta network.

    Args:
        network: the alpha-beta network (default: 1 ms latency, 10 Gbit/s).
        compute: a :class:`FlopCompute` (counted FLOPs / throughput), a per-step compute-time distribution
            (:class:`~coopsgd.theory.cost.ComputeModel`), or ``None``: the compute time the simulator
            measured for each worker.
        seed: seed of the compute-time draws.
        speeds: speed classes (:func:`~coopsgd.theory.cost.worker_speeds`): the workers in ``len(speeds)``
            consecutive equal blocks, a worker of speed s taking 1/s times each step's compute time (modelled or
            counted or measured). ``None``: every worker at speed 1.
        codec: measured encode / decode throughputs by compressor name (:func:`codec_time`); ``None``: the
            stated ones (:data:`coopsgd.theory.codec.STATED`).
    """

    def __init__(self, network: NetworkModel | None = None, compute: ComputeModel | FlopCompute | None = None,
                 seed: int = 0, speeds: Sequence[float] | None = None,
                 codec: Mapping[str, CodecSpeed] | None = None) -> None:
        if network is not None and not isinstance(network, NetworkModel):
            raise ConfigError.invalid("network", network, "must be a coopsgd.theory.cost.NetworkModel")
        if compute is not None and not isinstance(compute, (ComputeModel, FlopCompute)):
            raise ConfigError.invalid("compute", compute, "must be a FlopCompute, a coopsgd.theory.cost.ComputeModel "
                                      "or None (measured)")
        self.network = network or NetworkModel()
        self.compute = compute
        self.seed = int(seed)
        self.codec = dict(codec) if codec is not None else None
        self.speeds = tuple(float(v) for v in speeds) if speeds else None
        if self.speeds is not None:
            worker_speeds(self.speeds, len(self.speeds))  # each speed checked now; the count against m at bind
        self.rng = np.random.default_rng(self.seed)
        self.workers = 0
        self.params = 0
        self.bytes_per_param = 4.0
        self.reset_counters(1)
        self.speed = np.ones(1)

    @property
    def compute_kind(self) -> str:
        """``"flops"``, ``"measured"`` or the distribution's name (``"constant"``, ``"lognormal"``, ...)."""
        if isinstance(self.compute, FlopCompute):
            return "flops"
        return "measured" if self.compute is None else self.compute.distribution

    @property
    def counts_flops(self) -> bool:
        """Whether :meth:`add_compute` wants the workers' FLOPs (a :class:`FlopCompute` model)."""
        return isinstance(self.compute, FlopCompute)

    # -- set-up ------------------------------------------------------------------------------------
    def bind(self, workers: int, params: int, bytes_per_param: float) -> SimClock:
        """Size the clock for ``workers`` workers exchanging ``params`` parameters (done by the simulator)."""
        self.workers = int(workers)
        self.params = int(params)
        self.bytes_per_param = float(bytes_per_param)
        self.speed = worker_speeds(self.speeds, self.workers)
        self.reset_counters(self.workers)
        return self

    def reset_counters(self, workers: int) -> None:
        self.t = np.zeros(workers)  # each worker's clock
        self.busy = np.zeros(workers)  # compute time per worker
        self.waited = np.zeros(workers)  # idle time at synchronisations per worker
        self.exposed = 0.0  # communication not hidden by computation (excluding the pending tail)
        self.pending_until = 0.0  # when the last overlapped round's communication ends
        self.bytes_total = 0.0
        self.rounds = 0

    # -- totals ------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Simulated wall-clock: the latest of all workers' clocks and any communication still running."""
        return float(max(self.t.max(initial=0.0), self.pending_until))

    @property
    def compute_s(self) -> float:
        return float(self.busy.mean()) if self.busy.size else 0.0

    @property
    def idle_s(self) -> float:
        if not self.t.size:
            return 0.0
        return float((self.waited + (self.t.max() - self.t)).mean())

    @property
    def communication_s(self) -> float:
        return float(self.exposed + max(0.0, self.pending_until - self.t.max(initial=0.0)))

    def totals(self) -> dict[str, float]:
        return {
            "elapsed_s": self.elapsed,
            "compute_s": self.compute_s,
            "communication_s": self.communication_s,
            "idle_s": self.idle_s,
            "bytes_sent": self.bytes_total,
            "rounds": float(self.rounds),
        }

    # -- stepping ----------------------------------------------------------------------------------
    def add_compute(self, active: np.ndarray | None, measured: np.ndarray | None = None,
                    flops: np.ndarray | None = None) -> np.ndarray:
        """Advance each active worker by one step of compute; returns the per-worker times (0 if inactive).
        (:meth:`compute_tick` then :meth:`commit`.)"""
        tick = self.compute_tick(active, measured, flops=flops)
        self.commit(tick)
        return tick.dt

    def compute_tick(self, active: np.ndarray | None, measured: np.ndarray | None = None,
                     flops: np.ndarray | None = None) -> ComputeTick:
        """One step of compute of each active worker, not yet charged (:meth:`commit` charges it; the clock
        and its generator do not change before): the per-worker times (0 if inactive).

        ``flops`` (length m: each worker's counted FLOPs for this step) is used by a :class:`FlopCompute`
        model; without it (the model could not be counted) that model's ``fallback`` is used. ``measured``
        (length m) is used when the clock has no compute model, or as a ``FlopCompute`` fallback of ``None``.
        """
        m = self.workers
        mask = np.ones(m, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        cm = self.compute
        rng_state = None
        if isinstance(cm, FlopCompute) and flops is not None:
            dt = cm.seconds(flops).reshape(m).copy()
        else:
            if isinstance(cm, FlopCompute):
                cm = cm.fallback
            if cm is None:
                dt = np.zeros(m) if measured is None else np.asarray(measured, dtype=np.float64).copy()
            else:  # drawn from a copy of the generator: the clock's own moves on at commit
                rng = np.random.Generator(type(self.rng.bit_generator)())
                rng.bit_generator.state = self.rng.bit_generator.state
                dt = cm.sample(rng, m)
                rng_state = rng.bit_generator.state
        if self.speeds is not None:
            dt = dt / self.speed
        return ComputeTick(np.where(mask, dt, 0.0), rng_state)

    def commit(self, tick: ComputeTick) -> None:
        """Charge a :meth:`compute_tick` to the workers' clocks."""
        self.t += tick.dt
        self.busy += tick.dt
        if tick.rng_state is not None:
            self.rng.bit_generator.state = tick.rng_state

    def codec_time(self, compressor: str) -> CodecTime:
        """Seconds of one encode and one decode of a row of the clock's d parameters by the compressor named
        ``compressor`` (``"topk"``, ...): :func:`~coopsgd.theory.codec.codec_time` with the clock's ``codec``."""
        return codec_time(compressor, self.params * self.bytes_per_param, self.codec)

    def round_costs(self, pattern: str, matrix: np.ndarray | None = None, *, payload_bytes: float | None = None,
                    reducible: bool = False, senders: int | None = None, compressor: str | None = None,
                    params: int | None = None) -> list[RoundCost]:
        """The alpha-beta cost items of one round of ``pattern`` (see the module docstring).

        ``payload_bytes``: the round sends compressed payloads of this many bytes per node instead of the d
        parameters (``reducible``: payloads a reduction adds on the wire); priced by
        :func:`~coopsgd.algorithms.communication.compressed_round_cost` (SPEC §11), with the codec time of
        ``compressor`` (its name; ``None``: none charged). ``senders``: the workers that take part when not all
        m do (a sampled FedAvg round: its k clients send and receive, the others are not synchronised).
        ``params``: the round sends this many parameters instead of all of them (a Streaming DiLoCo fragment)."""
        m = self.workers if senders is None else int(senders)
        d, bpp = self.params if params is None else int(params), self.bytes_per_param
        if pattern == "local":
            return []
        if payload_bytes is not None:
            codec = None if compressor is None else self.codec_time(compressor)
            return [compressed_round_cost(c, workers=m, params=d, bytes_per_param=bpp, payload_bytes=payload_bytes,
                                          reducible=reducible, codec=codec)
                    for c in self.round_costs(pattern, matrix, senders=senders, params=d)]
        if pattern == "broadcast":
            gather = RoundCost("allgather", m if m > 1 else 0, float(m), float(m) * bpp)
            return [gather, round_cost("broadcast", workers=m, params=d, bytes_per_param=bpp)]
        if pattern == "neighbor":
            deg = 0
            if matrix is not None:
                S = np.asarray(matrix)
                nz = (S != 0) & ~np.eye(S.shape[0], dtype=bool)
                deg = int(nz[:, :m].sum(axis=0).max(initial=0))
            deg = min(max(deg, 1 if m > 1 else 0), m - 1)
            return [round_cost("neighbor", workers=m, params=d, max_degree=deg, bytes_per_param=bpp)]
        return [round_cost(pattern, workers=m, params=d, bytes_per_param=bpp)]

    def communicate(self, costs: list[RoundCost], *, overlap: bool = False) -> float:
        """Synchronise all workers and charge one round; returns the round's alpha-beta seconds."""
        if not costs:
            return 0.0
        c = float(sum(self.network.round_time(cost) for cost in costs))
        arrive = float(self.t.max())
        self.waited += arrive - self.t
        if overlap:
            start = max(arrive, self.pending_until)
            self.exposed += start - arrive
            self.pending_until = start + c
            self.t[:] = start
        else:
            start = max(arrive, self.pending_until)  # a blocking round after overlapped ones
            self.exposed += start - arrive + c
            self.t[:] = start + c
        self.bytes_total += float(sum(cost.bytes_sent for cost in costs))
        self.rounds += 1
        return c

    def wait_pending(self) -> None:
        """Every worker waits for the overlapped communication still running (a delayed update it needs now:
        Streaming DiLoCo's application). Waiting past the slowest worker is exposed communication; a worker
        that arrives before the communication ends idles until then (the totals keep
        ``elapsed = compute_s + idle_s + communication_s``)."""
        tmax = float(self.t.max(initial=0.0))
        if self.pending_until > tmax:
            self.waited += tmax - self.t
            self.exposed += self.pending_until - tmax
            self.t[:] = self.pending_until
        else:
            late = np.maximum(self.pending_until - self.t, 0.0)
            self.waited += late
            self.t += late

    def arrival_costs(self) -> list[RoundCost]:
        """The cost of one asynchronous arrival: a parameter server's push and pull for one worker (1 handshake,
        2d floats)."""
        return [round_cost("parameter_server", workers=1, params=self.params, bytes_per_param=self.bytes_per_param)]

    def arrive(self, worker: int, next_worker: int, costs: list[RoundCost]) -> float:
        """An asynchronous arrival: only ``worker`` pays ``costs`` (its push and pull; no other clock moves, nobody
        waits), and ``next_worker`` (the worker taking its slot; itself when it stays) starts when it ends (the time
        it waited for that counts as idle). Returns the arrival's alpha-beta seconds.

        ``communication_s`` grows by the mean over workers (each worker's clock is its compute, idle and own
        communication, so ``elapsed = compute_s + idle_s + communication_s`` still holds)."""
        c = float(sum(self.network.round_time(cost) for cost in costs))
        w, nxt = int(worker), int(next_worker)
        self.t[w] += c
        self.exposed += c / max(self.workers, 1)
        if nxt != w and self.t[nxt] < self.t[w]:
            self.waited[nxt] += self.t[w] - self.t[nxt]
            self.t[nxt] = self.t[w]
        self.bytes_total += float(sum(cost.bytes_sent for cost in costs))
        self.rounds += 1
        return c

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t.tolist(),
            "busy": self.busy.tolist(),
            "waited": self.waited.tolist(),
            "exposed": self.exposed,
            "pending_until": self.pending_until,
            "bytes_total": self.bytes_total,
            "rounds": self.rounds,
            "rng": _rng_state_to_lists(dict(self.rng.bit_generator.state)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = np.asarray(state["t"], dtype=np.float64)
        self.busy = np.asarray(state["busy"], dtype=np.float64)
        self.waited = np.asarray(state["waited"], dtype=np.float64)
        self.exposed = float(state["exposed"])
        self.pending_until = float(state["pending_until"])
        self.bytes_total = float(state["bytes_total"])
        self.rounds = int(state["rounds"])
        self.rng.bit_generator.state = _rng_state_from_lists(state["rng"])


def _rng_state_to_lists(state: dict[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state with 128-bit ints written as decimal strings (safe for ``weights_only``)."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    return conv(state)


def _rng_state_from_lists(state: dict[str, Any]) -> dict[str, Any]:
    def conv(k: str, v: Any) -> Any:
        if isinstance(v, dict):
            return {kk: conv(kk, x) for kk, x in v.items()}
        if isinstance(v, str) and k != "bit_generator":
            return int(v)
        return v

    return conv("", state)
