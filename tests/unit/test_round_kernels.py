"""Structure-aware rounds (engines/mixing.py: mix_rows_) equal the dense reference product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.algorithms.presets import PRESETS
from coopsgd.algorithms.schedules import MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines import mixing
from coopsgd.engines.kernel import InProcess
from coopsgd.engines.mixing import RoundKind, apply_mixing, mix_rows_, plan_round, round_plan
from coopsgd.topology import TOPOLOGIES

TOL = 1e-12
LONG_ROW = mixing._ROW_ELEMENTS + 3

#: workers for each preset (hierarchical's groups must divide m; the rest take the defaults)
PRESET_WORKERS = {"hierarchical": 8, "lsgd": 6}


def spec_matrices(spec: AlgorithmSpec, steps: int = 12) -> list[np.ndarray]:
    """The matrices of the first ``steps`` rounds of a spec (LSGD gets loss estimates and a learning rate)."""
    sched = spec.schedule
    state = sched.init_state()
    rng = np.random.default_rng(1)
    out = []
    for step in range(steps):
        losses = rng.random(spec.workers) if sched.needs_losses else None
        mix, state = sched.advance(step, MixContext(step=step, lr=0.1, losses=losses), state)
        if mix is not None:
            out.append(np.asarray(mix.matrix, dtype=np.float64))
    assert out, f"{spec.name} did not mix in {steps} steps"
    return out


def check(S: np.ndarray, d: int = 5, *, strided: bool = True) -> RoundKind:
    n = S.shape[0]
    gen = torch.Generator().manual_seed(n * 7919 + d)
    full = torch.randn(n, d + 4, dtype=torch.float64, generator=gen)
    rows = full[:, 2 : 2 + d] if strided else full[:, :d].contiguous()  # a column range of the state, as in the kernel
    expected = apply_mixing(rows.clone(), S)
    untouched = full[:, :2].clone(), full[:, 2 + d :].clone()
    out = mix_rows_(rows, S)
    assert out is rows
    torch.testing.assert_close(rows, expected, rtol=0, atol=TOL)
    if strided:  # columns outside the range are not touched
        assert torch.equal(full[:, :2], untouched[0]) and torch.equal(full[:, 2 + d :], untouched[1])
    plan = round_plan(S)
    np.testing.assert_array_equal(plan.matrix(), S)  # the plan carries S exactly (the distributed lowering reads it)
    return plan.kind


#: presets with no mixing matrix: an asynchronous server's arrivals (tests/unit/test_asynchronous.py)
ASYNCHRONOUS = ("fedbuff", "async_local_sgd")


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n not in ASYNCHRONOUS))
def test_every_preset_round_matches_dense(name: str) -> None:
    spec = PRESETS[name](PRESET_WORKERS.get(name, 8))
    for S in spec_matrices(spec, steps=max(12, spec.tau)):  # at least one round (diloco's H = 500)
        check(S)
        check(S, LONG_ROW)


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_every_topology_round_matches_dense(topology: str) -> None:
    for m in (8, 16):
        spec = presets.dpsgd(m, topology=topology)
        for S in spec_matrices(spec, steps=5):
            check(S)
            if m == 8:
                check(S, LONG_ROW)  # rows long enough for the row-at-a-time in-place path


def test_random_matrices_match_dense() -> None:
    rng = np.random.default_rng(0)
    kinds = set()
    for n in (1, 2, 5, 9, 33):
        dense = rng.random((n, n))  # not symmetric: pins the column convention
        sparse = np.where(rng.random((n, n)) < 0.1, rng.standard_normal((n, n)), 0.0) + np.eye(n)
        column_constant = np.outer(rng.random(n) * (rng.random(n) < 0.5), np.ones(n))
        partial = np.eye(n)
        partial[:, : max(1, n // 3)] = rng.random((n, max(1, n // 3)))  # only some rows change
        for S in (dense, sparse, column_constant, partial, np.eye(n)):
            for d in (1, 7, 300_000):  # 300k: the one-row-at-a-time gather
                kinds.add(check(S, d if n <= 9 else min(d, 7)))
    assert kinds == {RoundKind.IDENTITY, RoundKind.AVERAGE, RoundKind.SPARSE, RoundKind.DENSE}


def test_zero_columns() -> None:
    S = np.eye(6)
    S[:, 1] = 0.0  # node 1 is zeroed
    S[:, 4] = 0.0
    S[2, 4] = 0.5
    for d in (3, 40_000):  # short rows (blocks) and long rows (in place, row by row)
        assert check(S, d) is RoundKind.SPARSE
    assert check(np.zeros((5, 5))) is RoundKind.AVERAGE


def test_non_symmetric_column_convention() -> None:
    # node 0 takes node 1's model, node 1 keeps its own, node 2 averages 0 and 2: column i is node i's input
    S = np.array([[0.0, 0.0, 0.5], [1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    mix_rows_(x, S)
    assert x.flatten().tolist() == [2.0, 2.0, 2.5]
    check(S)
    check(S.T.copy())


def test_float32_and_empty_columns() -> None:
    S = spec_matrices(presets.dpsgd(8), 1)[0]
    x = torch.randn(8, 11)
    expected = apply_mixing(x.clone(), S)
    torch.testing.assert_close(mix_rows_(x, S), expected, rtol=1e-6, atol=1e-6)
    empty = torch.zeros(8, 0)
    mix_rows_(empty, S)
    with pytest.raises(ValueError):
        mix_rows_(torch.zeros(7, 3), S)


def test_kernel_choice() -> None:
    J = spec_matrices(presets.local_sgd(8), 4)[0]
    assert round_plan(J).kind is RoundKind.AVERAGE and round_plan(J).touched == 8
    ring = spec_matrices(presets.dpsgd(8), 1)[0]
    assert round_plan(ring).kind is RoundKind.SPARSE and round_plan(ring).touched == 8
    big_ring = spec_matrices(presets.dpsgd(64), 1)[0]
    assert round_plan(big_ring).kind is RoundKind.SPARSE
    S = spec_matrices(presets.fedavg(8, fraction=0.25), 5)[0]
    plan = round_plan(S)
    assert plan.kind is RoundKind.AVERAGE and plan.sources is not None and plan.sources.size == 2  # the 2 sampled clients
    assert round_plan(np.random.default_rng(3).random((8, 8))).kind is RoundKind.DENSE
    assert round_plan(np.eye(5)).kind is RoundKind.IDENTITY and round_plan(np.eye(5)).touched == 0


def test_plans_are_cached() -> None:
    S = spec_matrices(presets.dpsgd(12), 1)[0]
    assert round_plan(S) is round_plan(S.copy())


def test_downpour_rounds_use_the_chain_kernel() -> None:
    # DOWNPOUR's composed pushes are ~50% dense, but each column is the previous one plus two entries
    for m in (3, 8):
        for S in spec_matrices(presets.downpour(m), 2):
            assert round_plan(S).kind is RoundKind.CHAIN
            assert (S != 0).mean() > 0.25
            check(S, mixing._CHAIN_ROW_ELEMENTS + 1)  # long rows: the chain itself
            check(S, 3)  # short rows: the product over the changed columns


def test_chain_that_would_read_an_overwritten_row_stays_dense() -> None:
    # column 1 = column 0 + e_0 reads row 0 after column 0 wrote it; the chain kernel must refuse
    S = np.eye(4)
    S[:, 0] = [0.0, 1.0, 1.0, 1.0]
    S[:, 1] = [1.0, 1.0, 1.0, 1.0]
    assert round_plan(S).kind is not RoundKind.CHAIN
    check(S, mixing._CHAIN_ROW_ELEMENTS + 1)


def test_col_abs_max_and_non_finite_entries() -> None:
    rng = np.random.default_rng(4)
    mats = [spec_matrices(presets.fedavg(40, 1, fraction=0.1), 1)[0], spec_matrices(presets.dpsgd(12), 1)[0],
            spec_matrices(presets.downpour(5), 1)[0], rng.standard_normal((6, 6)), np.eye(3)]
    for S in mats:
        assert round_plan(S).col_abs_max == pytest.approx(float(np.abs(S).sum(axis=0).max()), rel=1e-12)
    for bad in (np.nan, np.inf):
        for S in (spec_matrices(presets.dpsgd(12), 1)[0].copy(), rng.random((5, 5))):
            S[1, 2] = bad
            assert not np.isfinite(round_plan(S).col_abs_max)


def test_deferred_broadcast_equals_the_full_round() -> None:
    spec = presets.fedavg(30, 1, fraction=0.1, seed=2)
    mats = spec_matrices(spec, 4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(31, 9, dtype=torch.float64, generator=gen)
    ref = x.clone()
    comm = InProcess(lazy_rows=30)
    for r, S in enumerate(mats):
        active = spec.schedule.clients(r).tolist()
        comm.materialize(x, active)  # what the simulator does before a step reads the active rows
        torch.testing.assert_close(x[active], ref[active], rtol=0, atol=TOL)
        bump = torch.randn(len(active), 9, dtype=torch.float64, generator=gen)  # the local steps
        x[active] += bump
        ref[active] += bump
        comm.mix(x, S)
        mix_rows_(ref, S)
        deferred = comm.deferred
        assert deferred is not None and deferred.sum() == 30  # no client row written, only the server's
        torch.testing.assert_close(x[30], ref[30], rtol=0, atol=TOL)
    comm.materialize(x)
    assert comm.deferred is None
    torch.testing.assert_close(x, ref, rtol=0, atol=TOL)


def test_structured_fedavg_mix_equals_its_matrix_and_the_analysed_plan() -> None:
    # FedAvg's Mix carries its structure: the plan comes from the sampled clients' weights (no n x n matrix),
    # the matrix is built only when read, equal to w 1^T, and the plan is the one its analysis finds
    rng = np.random.default_rng(6)
    for m, c, steps in ((8, 1.0, 2), (40, 0.1, 3), (30, 1 / 30, 3), (1000, 0.01, 1)):  # 1/30: one client, w = e_j
        counts = rng.integers(1, 50, m).astype(float)
        spec = presets.fedavg(m, 1, fraction=c, sample_counts=counts, seed=3)
        for step in range(steps):
            mix = spec.schedule.mix(step)
            assert mix is not None and mix.structure is not None
            plan = plan_round(mix).plan
            assert mix._matrix is None  # the plan did not build the matrix
            chosen = spec.schedule.clients(step)
            w = np.zeros(m + 1)
            w[chosen] = counts[chosen] / counts[chosen].sum()
            np.testing.assert_array_equal(mix.matrix, np.tile(w[:, None], (1, m + 1)))
            assert mix.matrix is mix.matrix and mix.info["clients"] == chosen.tolist()
            ref = round_plan(mix.matrix.copy())
            assert (plan.kind, plan.touched, plan.col_abs_max) == (ref.kind, ref.touched, ref.col_abs_max)
            for name in ("targets", "sources", "weights"):
                a, b = getattr(plan, name), getattr(ref, name)
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_array_equal(a, b)
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(m + 1, 7, dtype=torch.float64, generator=gen)
            expected = apply_mixing(x.clone(), mix.matrix)
            fresh = spec.schedule.mix(step)  # a new Mix: the round through the communicator, from the structure
            assert fresh is not None
            InProcess().communicate(x, plan_round(fresh))
            assert fresh._matrix is None
            torch.testing.assert_close(x, expected, rtol=0, atol=TOL)


def test_mix_is_immutable_and_pickles() -> None:
    import copy
    import pickle

    mix = presets.fedavg(20, 1, fraction=0.2).schedule.mix(0)
    assert mix is not None
    with pytest.raises(AttributeError):
        mix.pattern = "local"  # type: ignore[misc]
    for clone in (pickle.loads(pickle.dumps(mix)), copy.deepcopy(mix)):
        assert clone.structure is not None and (clone.pattern, clone.round, clone.info) == (mix.pattern, 0, mix.info)
        np.testing.assert_array_equal(clone.matrix, mix.matrix)
    with pytest.raises(ValueError, match="matrix or its structure"):
        type(mix)(None, "allreduce")


def test_immutable_matrices_are_found_by_identity() -> None:
    sched = presets.dpsgd(12).schedule
    S = sched.mix(0).matrix
    assert not S.flags.writeable and sched.mix(7).matrix is S  # the schedule hands out one read-only array
    plan = round_plan(S)
    assert round_plan(S) is plan and mixing._immutable(S) and mixing._immutable(S[:])
    # a read-only view of a writable array can still change: looked up by its entries every time
    base = np.eye(4)
    view = base.view()
    view.setflags(write=False)
    assert not mixing._immutable(view) and round_plan(view).kind is RoundKind.IDENTITY
    base[:, 1] = [0.5, 0.5, 0.0, 0.0]
    assert round_plan(view).kind is not RoundKind.IDENTITY
    check(view)
    # a user's writable matrix is copied by the schedule: changing it later does not change the rounds
    from coopsgd.algorithms.schedules import PeriodicSchedule

    W = np.full((3, 3), 1 / 3)
    periodic = PeriodicSchedule(1, [W])
    W[0, 0] = 5.0
    got = periodic.mix(0)
    assert got is not None
    np.testing.assert_array_equal(got.matrix, np.full((3, 3), 1 / 3))


def test_products_of_levels_are_computed_once() -> None:
    sched = presets.hierarchical(8).schedule  # levels: period 2 (intra-group) and 4 (between groups)
    (fast_period, fast_mats, _), (slow_period, slow_mats, _) = sched._levels
    assert (fast_period, slow_period, len(fast_mats), len(slow_mats)) == (2, 4, 1, 1)
    a, b, only_fast = sched.mix(3), sched.mix(7), sched.mix(1)  # both levels fire after steps 3 and 7
    assert a is not None and b is not None and only_fast is not None
    assert a.matrix is b.matrix and not a.matrix.flags.writeable  # one read-only product, computed once
    np.testing.assert_array_equal(a.matrix, fast_mats[0] @ slow_mats[0])
    assert only_fast.matrix is fast_mats[0]
