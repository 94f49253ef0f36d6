"""Streaming DiLoCo as a preset (Douillard et al., 2025): DiLoCo's outer step per fragment of the model.

The rounds are :class:`~coopsgd.algorithms.streaming.StreamingSchedule`'s (fragments at staggered offsets, a
delayed application, the merge factor alpha); the outer optimizer and the inner AdamW are DiLoCo's
(:func:`coopsgd.algorithms.presets.diloco`). The declaration is :data:`STREAMING_DECLS`, registered with the
others by :mod:`coopsgd.algorithms.presets`.
"""

from __future__ import annotations

from coopsgd.algorithms.hooks import DILOCO_NO_BOUND, OUTER_FACTS
from coopsgd.algorithms.outer import OuterOptimizer
from coopsgd.algorithms.preset_base import _OUTER_LR, _OUTER_MOMENTUM, _TAU, _workers, compressible
from coopsgd.algorithms.registry import PresetArg, PresetDecl
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.algorithms.streaming import FRAGMENT_SPLITS, StreamingSchedule
from coopsgd.errors import ConfigError, check_float

__all__ = ["streaming_diloco", "STREAMING_DECLS", "STREAMING_OUTER", "DEFAULT_FRAGMENTS"]

#: Streaming DiLoCo's outer optimizers: SGD with Nesterov momentum (the paper's) or heavy-ball SGD. Adam is
#: not offered: its bias correction counts the rounds of the whole model, not of one fragment.
STREAMING_OUTER = ("nesterov", "sgd")
#: The default number of fragments P (the issue's benchmark setting).
DEFAULT_FRAGMENTS = 4


@compressible
def streaming_diloco(
    workers: int,
    tau: int = 500,
    *,
    fragments: int = DEFAULT_FRAGMENTS,
    fragment_delay: int = 0,
    merge_alpha: float = 0.0,
    fragment_split: str = "tensors",
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    outer_optimizer: str = "nesterov",
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Streaming DiLoCo: DiLoCo with the parameters in ``fragments`` = P fragments, fragment p's outer round
    after the steps k with ``(k + 1) mod tau = floor(p tau / P)``, its new value reaching the workers
    ``fragment_delay`` steps later and merged as ``alpha x_local + (1 - alpha) z`` (``merge_alpha`` = alpha).

    P = 1, no delay and alpha = 0 is :func:`~coopsgd.algorithms.presets.diloco` bit for bit. The workers'
    optimizer state stays local (``optimizer_state="local"``: a fragment round does not touch it).
    ``fragment_split``: ``"tensors"`` (consecutive groups of whole parameter tensors of about equal size) or
    ``"coordinates"`` (equal chunks of the flat parameter vector, for models where one tensor outweighs the rest).
    ``compression``: each fragment's round is compressed on its own columns (docs/compression.md).
    """
    m = _workers(workers)
    sched = StreamingSchedule(m, tau, fragments, fragment_delay, merge_alpha, fragment_split)
    if outer_optimizer not in STREAMING_OUTER:
        raise ConfigError.invalid("outer_optimizer", outer_optimizer, f"choose one of {', '.join(STREAMING_OUTER)}")
    lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    mu = check_float("outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True)
    pol = policies or Policies()
    if pol.optimizer_state != "local":
        raise ConfigError.invalid("optimizer_state", pol.optimizer_state, "streaming_diloco keeps the inner optimizer "
                                  "state local (a fragment round moves parameters only)")
    outer = OuterOptimizer("sgd", lr=lr, momentum=mu, nesterov=outer_optimizer == "nesterov" and mu > 0)
    return AlgorithmSpec(
        name="streaming_diloco", workers=m, auxiliaries=1, tau=sched.period, schedule=sched, rule="post_mix",
        center="auxiliary", theory_matrix=None, pattern="allreduce", policies=pol,
        params={"fragments": sched.fragments, "fragment_delay": sched.delay, "merge_alpha": sched.merge_alpha,
                "fragment_split": sched.split,
                "outer_optimizer": outer_optimizer, "outer_lr": lr, "outer_momentum": mu},
        notes=("an outer optimizer on z per fragment: no fixed W describes the round, so [CSGD] Theorems 1-4 do not "
               "apply; with an adaptive inner optimizer (AdamW) no convergence bound is computed",
               f"the cost model counts one whole-model round per tau steps: each of the {sched.fragments} fragment "
               "rounds per tau steps sends about 1/fragments of it (peak_bytes_per_step in a run's records)"),
        outer=outer, inner_optimizer="adamw",
    )


STREAMING_DECLS: tuple[PresetDecl, ...] = (
    PresetDecl(
        "streaming_diloco", streaming_diloco, "Streaming DiLoCo: DiLoCo's outer step per fragment of the model at "
        "staggered steps, applied after a delay, merged by alpha",
        args=(_TAU.replace(default=500, help="communication period tau: local steps between rounds (DiLoCo's H)"),
              PresetArg("fragments", int, DEFAULT_FRAGMENTS, low=1,
                        help="streaming_diloco: fragments P of the model, fragment p synchronised at offset "
                             "floor(p tau / P)"),
              PresetArg("fragment_delay", int, 0, low=0,
                        help="streaming_diloco: inner steps tau_d between a fragment's round and the workers "
                             "receiving its update (< floor(tau / fragments))"),
              PresetArg("merge_alpha", float, 0.0, low=0.0, high=1.0, high_open=True,
                        help="streaming_diloco: merge x <- alpha x_local + (1 - alpha) x_global"),
              PresetArg("fragment_split", str, "tensors", choices=FRAGMENT_SPLITS,
                        help="streaming_diloco: fragments of whole parameter tensors, or equal chunks of the "
                             "coordinates (1/P of the bytes each, whatever the tensor sizes)"),
              _OUTER_LR.replace(default=0.7), _OUTER_MOMENTUM.replace(default=0.9),
              PresetArg("outer_optimizer", str, "nesterov", choices=STREAMING_OUTER,
                        help="streaming_diloco: z's optimizer on each fragment's pseudo-gradient")),
        theory=(OUTER_FACTS, DILOCO_NO_BOUND),
    ),
)
