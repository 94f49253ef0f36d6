"""Communication plans and auxiliary placement of the distributed engine (pure numpy, no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import MixContext
from coopsgd.engines.comm import aux_placement, build_placed_plan, build_plan


def _mix(spec, k: int) -> np.ndarray:
    return spec.schedule.mix(k, MixContext(step=k, lr=0.1, losses=np.arange(spec.workers, dtype=float))).matrix


def test_plan_patterns_follow_the_matrix() -> None:
    m = 8
    assert build_plan(_mix(presets.sync(m), 0), m, 0).worker_mode == "reduce"
    assert build_plan(_mix(presets.dpsgd(m, topology="ring"), 0), m, 0).worker_mode == "neighbor"
    p = build_plan(_mix(presets.easgd(m, 1), 0), m, 1)
    assert p.worker_mode == "local" and p.aux_sources == (("reduce", 0),) and p.deferrable
    assert build_plan(_mix(presets.downpour(m, 1), 0), m, m + 1).worker_mode == "gather"


def test_replicated_specs_have_no_placement() -> None:
    # every worker reads z (EASGD, generalized elastic), data-dependent or random schedules: every rank holds all
    for spec in (presets.easgd(4, 2), presets.generalized_elastic(4, 1), presets.lsgd(4, 1),
                 presets.fedavg(4, 2, fraction=0.5), presets.local_sgd(4, 2), presets.downpour(4, 1)):
        assert aux_placement(spec) is None, spec.name


def test_hierarchical_auxiliaries_live_on_their_group() -> None:
    spec = presets.hierarchical(6, 2, groups=3, q=2, alpha=0.2)
    holders = aux_placement(spec)
    assert holders == ((0, 1), (2, 3), (4, 5))
    intra = build_placed_plan(_mix(spec, 1), holders)  # step 1: the group rounds only
    assert intra.worker.worker_mode == "local"
    assert intra.reductions == (((0, 1), (0,)), ((2, 3), (1,)), ((4, 5), (2,)))  # one subgroup per group
    assert intra.local_terms.diagonal().all()  # (1 - s alpha) z_g is added by its own holders
    both = build_placed_plan(_mix(spec, 3), holders)  # step 3: groups, then the auxiliaries mix
    assert both.reductions == ((tuple(range(6)), (0, 1, 2)),)  # one reduction over every contributor
    assert not both.local_terms[0, 1]  # z_0 enters z_1's column through the reduction (host rank 0)


def test_placed_plan_rejects_a_reader_that_does_not_hold() -> None:
    spec = presets.hierarchical(4, 1, groups=2, q=2)
    S = _mix(spec, 0).copy()
    S[4 + 1, 0] = 0.1  # worker 0 suddenly reads group 1's auxiliary
    with pytest.raises(RuntimeError, match=r"auxiliary 1 is read by worker\(s\) \[0\]"):
        build_placed_plan(S, aux_placement(spec))
