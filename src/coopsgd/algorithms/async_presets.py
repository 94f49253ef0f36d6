"""The asynchronous presets' declarations (registered, in this order, by :mod:`coopsgd.algorithms.presets`).

The constructors, the schedule and the server's rule are in :mod:`coopsgd.algorithms.asynchronous`.
"""

from __future__ import annotations

from typing import Any

from coopsgd.algorithms.asynchronous import STALENESS_RULES, async_local_sgd, fedbuff
from coopsgd.algorithms.preset_base import _OUTER_LR, _OUTER_MOMENTUM, _SEED, _TAU
from coopsgd.algorithms.registry import PresetArg, PresetDecl, TheoryHook
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.theory import bounds

__all__ = ["ASYNC_DECLS", "ASYNC_NO_BOUND"]


def _async_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    a = spec.asynchronous
    if a is None:
        return
    out["asynchronous_server"] = a.describe()
    describe = getattr(spec.schedule, "describe", None)
    if describe is not None:
        out["asynchronous_slots"] = describe()


def _async_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    res["asynchronous"] = ("no convergence bound applies: each arrival's pseudo-gradient reaches the server with its "
                           "own staleness, outside the analyses of [CSGD] (no fixed W describes the algorithm)")


#: `coopsgd theory` for the asynchronous presets: the server's rule, and no bound.
ASYNC_NO_BOUND = TheoryHook("asynchronous_no_bound", facts=_async_facts, bounds=_async_bounds)

_CONCURRENCY = PresetArg("concurrency", int, None, help="asynchronous server: clients training at any time C",
                         low=1, default_text="max(1, round(fraction m))", excludes=("fraction",))
_FRACTION = PresetArg("fraction", float, 1.0, help="FedAvg client fraction c", low=0.0, high=1.0, low_open=True)

#: The asynchronous presets' declarations.
ASYNC_DECLS: tuple[PresetDecl, ...] = (
    PresetDecl(
        "fedbuff", fedbuff, "FedBuff: buffered asynchronous aggregation of C concurrent clients",
        args=(_TAU.replace(default=5),
              PresetArg("buffer_size", int, 4, help="asynchronous server: arrivals K buffered per server step",
                        low=1),
              _CONCURRENCY, _FRACTION, _OUTER_LR.replace(default=1.0),
              PresetArg("staleness", str, "constant", choices=STALENESS_RULES,
                        help="FedBuff's staleness weight w(s): 1, 1/sqrt(1+s) or (1+s)^-a"),
              PresetArg("staleness_exponent", float, 0.5, help="poly staleness weight: the exponent a", low=0.0),
              _SEED),
        theory=(ASYNC_NO_BOUND,),
    ),
    PresetDecl(
        "async_local_sgd", async_local_sgd,
        "asynchronous local SGD: every arrival moves z by outer Nesterov (inner AdamW)",
        args=(_TAU.replace(default=500), _OUTER_LR.replace(default=0.7), _OUTER_MOMENTUM.replace(default=0.9),
              PresetArg("delayed_nesterov", int, 1, help="asynchronous local SGD: the outer momentum is applied "
                        "once every N arrivals, on the mean of the N; every arrival's step is scaled by 1/N (1: Nesterov at "
                        "every arrival)", low=1),
              PresetArg("dynamic_local_updates", bool, False, help="asynchronous local SGD: worker i runs "
                        "max(1, round(tau s_i / max s)) local steps (s: its speed class; needs two --worker-speeds classes or "
                        "more, not on the distributed engine)")),
        theory=(ASYNC_NO_BOUND,),
    ),
)
