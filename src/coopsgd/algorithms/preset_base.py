"""What every preset constructor shares: the ``compression=`` keyword (:func:`compressible`), argument checks,
mixing-matrix lists and the settings many presets declare (``tau``, ``seed``, ``topology``, ...).

The presets themselves are in :mod:`coopsgd.algorithms.presets` (the Cooperative SGD family, LSGD, DOWNPOUR,
MATCHA, DiLoCo, SlowMo, CHOCO) and :mod:`coopsgd.algorithms.federated_presets` (FedAvg and its strategies).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coopsgd.algorithms.communication import CompressionArg, as_compression
from coopsgd.algorithms.registry import PresetArg
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.errors import ConfigError, check_int
from coopsgd.topology import TOPOLOGIES, WEIGHT_RULES, MixingMatrix, mixing_schedule

__all__ = ["compressible", "with_compression", "MixingArg"]

MixingArg = MixingMatrix | np.ndarray | Sequence[MixingMatrix] | None


def with_compression(spec: AlgorithmSpec, compression: CompressionArg) -> AlgorithmSpec:
    """``spec`` sending its rounds through ``compression`` (a :class:`Compression`, a compressor spec string such
    as ``"topk:0.01"``, or ``None``: unchanged), checked against its rounds
    (:func:`~coopsgd.algorithms.communication.check_compressible`)."""
    c = as_compression(compression)
    return spec if c is None else dataclasses.replace(spec, compression=c)


def compressible(build: Callable[..., AlgorithmSpec]) -> Callable[..., AlgorithmSpec]:
    """The one path by which every preset constructor takes ``compression=`` (SPEC §11): the constructor builds
    its spec, then :func:`with_compression` applies the compression. The returned function's signature is the
    constructor's plus the keyword ``compression`` (the registry and :func:`make_preset` read it)."""
    sig = inspect.signature(build)

    @functools.wraps(build)
    def constructor(*args: Any, compression: CompressionArg = None, **kwargs: Any) -> AlgorithmSpec:
        return with_compression(build(*args, **kwargs), compression)

    extra = inspect.Parameter("compression", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation="Compression | str | None")
    constructor.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    return constructor


def _workers(workers: int) -> int:
    return check_int("workers", workers, minimum=1)


def _average(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


def _mixing_list(
    workers: int, mixing: MixingArg, topology: str, weights: str, seed: int
) -> list[np.ndarray]:
    """The matrices of a (possibly time-varying) worker topology, validated as m x m."""
    if mixing is None:
        mats = [W.matrix for W in mixing_schedule(topology, workers, weights, seed=seed)]
    elif isinstance(mixing, (MixingMatrix, np.ndarray)):
        mats = [np.asarray(getattr(mixing, "matrix", mixing), dtype=np.float64)]
    else:
        mats = [np.asarray(getattr(W, "matrix", W), dtype=np.float64) for W in mixing]
    for M in mats:
        if M.shape != (workers, workers):
            raise ConfigError.invalid("mixing", f"matrix of shape {M.shape}", f"must be {workers}x{workers} (workers)")
    return mats


def _theory_for(mats: list[np.ndarray]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    if len(mats) > 1:
        return None, ("time-varying mixing: Theorems 1-4 assume one fixed W",)
    W = mats[0]
    M = MixingMatrix(W, check="none", allow_negative=True)
    if M.theory_applies:
        return W, ()
    return W, tuple(f"theorems do not apply: {issue}" for issue in M.theory_issues())



def _renamed(spec: AlgorithmSpec, name: str) -> AlgorithmSpec:
    return dataclasses.replace(spec, name=name)


_TAU = PresetArg("tau", int, help="communication period tau: local steps between rounds", low=1)
_SEED = PresetArg("seed", int, 0, help="random seed (the run's --seed)", kind="shared", low=0)
_TOPOLOGY = PresetArg("topology", str, "ring", help="worker graph", choices=TOPOLOGIES)
_WEIGHTS = PresetArg("weights", str, "metropolis", help="mixing weight rule", choices=tuple(WEIGHT_RULES))
_ALPHA = PresetArg("alpha", float, None, help="elasticity alpha (the auxiliary's pull)")
_STRICT = PresetArg("strict", bool, False, help="error (not warning) for a diverging alpha")
_GROUPS = PresetArg("groups", int, help="number of equal groups of workers", low=1)
_OUTER_LR = PresetArg("outer_lr", float, help="outer learning rate of z (SlowMo's slow lr alpha; the federated "
                      "server learning rate eta)", low=0.0, low_open=True)
_OUTER_MOMENTUM = PresetArg("outer_momentum", float, help="outer momentum of z (SlowMo's slow momentum beta; "
                            "FedAvgM's server momentum)", low=0.0, high=1.0, high_open=True)
