"""Step counting of periodic schedules: the paper's (after every tau local steps) and PyTorch's
(``PeriodicModelAverager``: after the 1st local step, then every tau), in closed form and against torch's own
averager and post-local-SGD hook (driven without processes: their collectives are recorded, not run)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import STEP_COUNTINGS, PeriodicSchedule
from coopsgd.errors import ConfigError

TAUS = (1, 2, 3, 5)
WARMUPS = (0, 1, 3)
K = 40


def _comm_steps(sched: PeriodicSchedule, steps: int = K) -> list[int]:
    return [k for k in range(steps) if sched.mix(k) is not None]


@pytest.mark.parametrize("counting", STEP_COUNTINGS)
def test_communicating_steps_closed_form(counting: str) -> None:
    phase = {"paper": lambda tau: tau - 1, "pytorch": lambda tau: 0}[counting]
    for tau in TAUS:
        for warm in WARMUPS:
            spec = presets.local_sgd(3, tau, warmup_steps=warm, step_counting=counting)
            sched = spec.schedule
            assert isinstance(sched, PeriodicSchedule)
            expected = list(range(min(warm, K))) + [k for k in range(warm, K) if (k - warm) % tau == phase(tau)]
            assert _comm_steps(sched) == expected, (counting, tau, warm)
            # round indices count every communicating step once, in order; rounds_before agrees
            rounds = [sched.mix(k).round for k in expected]  # type: ignore[union-attr]
            assert rounds == list(range(len(expected)))
            for k in range(K + 1):
                assert sched.rounds_before(k) == sum(1 for j in expected if j < k)
            # warm-up rounds are marked as such, the others are not
            assert [bool(sched.mix(k).info.get("warmup")) for k in expected] == [k < warm for k in expected]  # type: ignore[union-attr]
            assert spec.params["step_counting"] == counting


def test_pytorch_counting_is_the_paper_counting_with_one_more_warmup_step() -> None:
    """After local step 0 both warm-up and PyTorch's first round average: local_sgd(tau, W, pytorch) has the
    rounds and matrices of local_sgd(tau, W + 1, paper)."""
    for tau in TAUS:
        for warm in WARMUPS:
            a = presets.local_sgd(4, tau, warmup_steps=warm, step_counting="pytorch").schedule
            b = presets.local_sgd(4, tau, warmup_steps=warm + 1).schedule
            for k in range(K):
                ma, mb = a.mix(k), b.mix(k)
                assert (ma is None) == (mb is None), (tau, warm, k)
                if ma is not None and mb is not None:
                    np.testing.assert_array_equal(ma.matrix, mb.matrix)
                    assert ma.round == mb.round


def test_tau_one_counts_the_same_either_way() -> None:
    for warm in WARMUPS:
        a = presets.local_sgd(2, 1, warmup_steps=warm, step_counting="pytorch").schedule
        b = presets.local_sgd(2, 1, warmup_steps=warm).schedule
        assert _comm_steps(a) == _comm_steps(b) == list(range(K))


def test_time_varying_matrices_cycle_by_round_under_both_countings() -> None:
    mats = [np.eye(3), np.full((3, 3), 1 / 3)]
    for counting in STEP_COUNTINGS:
        s = PeriodicSchedule(3, mats, step_counting=counting)
        steps = _comm_steps(s, 30)
        assert steps == ([2, 5, 8, 11, 14, 17, 20, 23, 26, 29] if counting == "paper" else list(range(0, 30, 3)))
        for r, k in enumerate(steps):
            np.testing.assert_array_equal(s.mix(k).matrix, mats[r % 2])  # type: ignore[union-attr]
        found = s.matrices()
        assert found is not None and len(found) == 2


def test_slower_levels_fire_on_the_same_phase() -> None:
    """A level of period q*tau fires with the fast level: at local steps q*tau-1, 2q*tau-1, ... (paper) or
    0, q*tau, ... (pytorch); the product is fast @ slow."""
    fast, slow = np.diag([2.0, 3.0]), np.array([[0.0, 1.0], [1.0, 0.0]])
    for counting, both in (("paper", [3, 7, 11]), ("pytorch", [0, 4, 8])):
        s = PeriodicSchedule(2, [fast], levels=[(4, [slow], "neighbor")], step_counting=counting)
        fast_only = [k for k in (_comm_steps(s, 12)) if k not in both]
        assert fast_only == ([1, 5, 9] if counting == "paper" else [2, 6, 10])
        for k in both:
            np.testing.assert_array_equal(s.mix(k).matrix, fast @ slow)  # type: ignore[union-attr]
        assert s.rounds_before(12) == 6


def _torch_schedule(period: int, warmup: int, steps: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """The steps at which PyTorch's recipe all-reduces gradients (DDP's post_localSGD_hook) and averages the
    model (PeriodicModelAverager), from torch's own code with its collectives recorded instead of run."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging import averagers
    from torch.distributed.algorithms.model_averaging import utils as avg_utils

    group: Any = object()  # a stand-in process group: nothing is sent
    step = {"k": 0}
    grads, models = [], []

    def fake_allreduce(process_group: Any, tensor: torch.Tensor) -> Any:
        grads.append(step["k"])
        fut: Any = torch.futures.Future()
        fut.set_result(tensor)
        return fut

    monkeypatch.setattr(default_hooks, "_allreduce_fut", fake_allreduce)
    monkeypatch.setattr(avg_utils, "average_parameters_or_parameter_groups",
                        lambda params, process_group: models.append(step["k"]))

    class Bucket:
        def buffer(self) -> torch.Tensor:
            return torch.zeros(3)

        def is_last(self) -> bool:
            return True

    state = post_localSGD_hook.PostLocalSGDState(process_group=group, subgroup=None, start_localSGD_iter=warmup,
                                                  post_local_gradient_allreduce=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # period 1: "only DDP should be used"
        averager = averagers.PeriodicModelAverager(period=period, warmup_steps=warmup, process_group=group)
    for k in range(steps):
        step["k"] = k
        post_localSGD_hook.post_localSGD_hook(state, Bucket())  # the backward pass of step k
        averager.average_parameters([])  # PostLocalSGDOptimizer.step: after the local optimizer step
    return grads, models


def test_pytorch_counting_matches_torch_post_local_sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up rounds are DDP's gradient all-reduces, the others PeriodicModelAverager's model averages."""
    for tau in TAUS:
        for warm in WARMUPS:
            grads, models = _torch_schedule(tau, warm, K, monkeypatch)
            sched = presets.local_sgd(2, tau, warmup_steps=warm, step_counting="pytorch").schedule
            warm_rounds = [k for k in range(K) if (mix := sched.mix(k)) is not None and mix.info.get("warmup")]
            other_rounds = [k for k in range(K) if (mix := sched.mix(k)) is not None and not mix.info.get("warmup")]
            assert grads == warm_rounds and models == other_rounds, (tau, warm)
            paper = presets.local_sgd(2, tau, warmup_steps=warm).schedule
            if tau > 1:
                assert _comm_steps(paper) != grads + models


def test_bad_step_counting_is_one_clear_error() -> None:
    for build in (lambda: presets.local_sgd(2, 2, step_counting="torch"),
                  lambda: PeriodicSchedule(2, [np.eye(2)], step_counting="Paper")):
        with pytest.raises(ConfigError, match=r"step_counting='(torch|Paper)' is invalid: choose one of paper, pytorch") as e:
            build()
        assert e.value.field == "step_counting"


def test_config_files_and_flags_take_step_counting(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from coopsgd.cli import main
    from coopsgd.train import RunConfig, load_config

    path = tmp_path / "run.toml"
    path.write_text('preset = "local_sgd"\nworkers = 2\ntau = 3\nwarmup_steps = 1\nstep_counting = "pytorch"\n')
    spec = RunConfig.from_dict(load_config(path)).build_spec()
    assert spec.params == {"warmup_steps": 1, "step_counting": "pytorch"}
    assert _comm_steps(spec.schedule, 8) == [0, 1, 4, 7]
    assert RunConfig(workers=2, tau=3).build_spec().params["step_counting"] == "paper"
    with pytest.raises(ConfigError, match="step_counting='torch' is invalid") as e:
        RunConfig(workers=2, step_counting="torch").build_spec()
    assert e.value.field == "step_counting"
    with pytest.raises(ConfigError, match="preset 'sync' does not take this setting"):
        RunConfig(preset="sync", workers=2, step_counting="pytorch").build_spec()
    assert main(["theory", "--preset", "local_sgd", "--workers", "2", "--step-counting", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["coopsgd: error: step_counting='torch' is invalid: choose one of paper, pytorch"]
