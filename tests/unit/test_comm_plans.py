"""The distributed engine's lowering of a round to collectives, and auxiliary placement (pure numpy, no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import MixContext
from coopsgd.engines.distributed.collectives import (
    AuxFrom,
    AuxSource,
    Exchange,
    aux_placement,
    lower,
    lower_placed,
)


def _mix(spec, k: int) -> np.ndarray:
    return spec.schedule.mix(k, MixContext(step=k, lr=0.1, losses=np.arange(spec.workers, dtype=float))).matrix


def test_plan_patterns_follow_the_matrix() -> None:
    m = 8
    assert lower(_mix(presets.sync(m), 0), m, 0).exchange is Exchange.REDUCE
    assert lower(_mix(presets.dpsgd(m, topology="ring"), 0), m, 0).exchange is Exchange.NEIGHBOR
    p = lower(_mix(presets.easgd(m, 1), 0), m, 1)
    assert p.exchange is Exchange.LOCAL and p.aux_sources == (AuxSource(AuxFrom.REDUCE, 0),) and p.deferrable
    assert lower(_mix(presets.downpour(m, 1), 0), m, m + 1).exchange is Exchange.GATHER


def test_replicated_specs_have_no_placement() -> None:
    # every worker reads z (EASGD, generalized elastic), data-dependent or random schedules: every rank holds all
    for spec in (presets.easgd(4, 2), presets.generalized_elastic(4, 1), presets.lsgd(4, 1),
                 presets.fedavg(4, 2, fraction=0.5), presets.local_sgd(4, 2), presets.downpour(4, 1)):
        assert aux_placement(spec) is None, spec.name


def test_hierarchical_auxiliaries_live_on_their_group() -> None:
    spec = presets.hierarchical(6, 2, groups=3, q=2, alpha=0.2)
    holders = aux_placement(spec)
    assert holders == ((0, 1), (2, 3), (4, 5))
    intra = lower_placed(_mix(spec, 1), holders)  # step 1: the group rounds only
    assert intra.worker.exchange is Exchange.LOCAL
    assert intra.reductions == (((0, 1), (0,)), ((2, 3), (1,)), ((4, 5), (2,)))  # one subgroup per group
    assert intra.local_terms.diagonal().all()  # (1 - s alpha) z_g is added by its own holders
    both = lower_placed(_mix(spec, 3), holders)  # step 3: groups, then the auxiliaries mix
    assert both.reductions == ((tuple(range(6)), (0, 1, 2)),)  # one reduction over every contributor
    assert not both.local_terms[0, 1]  # z_0 enters z_1's column through the reduction (host rank 0)


def test_placed_plan_rejects_a_reader_that_does_not_hold() -> None:
    spec = presets.hierarchical(4, 1, groups=2, q=2)
    S = _mix(spec, 0).copy()
    S[4 + 1, 0] = 0.1  # worker 0 suddenly reads group 1's auxiliary
    with pytest.raises(RuntimeError, match=r"auxiliary 1 is read by worker\(s\) \[0\]"):
        lower_placed(S, aux_placement(spec))


def test_the_mixer_lowers_the_one_plan_once_per_plan() -> None:
    # the distributed communicator derives its collectives from the typed round of the one planner
    from coopsgd.engines.distributed.communicator import Mixer
    from coopsgd.engines.mixing import RoundKind, plan_round

    spec = presets.easgd(4, 1)
    S = _mix(spec, 0)
    rnd = plan_round(S)
    mixer = Mixer(0, 4, 1)
    col = mixer.lower(rnd)
    assert col is mixer.lower(plan_round(S))  # the schedule's read-only S: its plan, and its lowering, by identity
    assert col.exchange is lower(S, 4, 1).exchange and mixer.exchanges(rnd)
    assert not mixer.exchanges(plan_round(np.eye(5))) and plan_round(np.eye(5)).kind is RoundKind.IDENTITY
