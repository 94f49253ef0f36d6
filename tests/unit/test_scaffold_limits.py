"""SCAFFOLD's option II, c_i+ = c_i - c + (z - y_i) / sum_k lr_k, is the client's (lr-weighted) mean gradient over
the round only for plain SGD steps: other optimizers are refused (one line naming the setting), never run with
control variates that are not gradient estimates. An lr that changes inside a round is divided out exactly (the
sum of the learning rates of the client's steps), on every engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.engines import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig


class _Linear:
    """F(x) = a . x: every gradient is a, so the exact c_i after a round is a."""

    dim = 2
    a = np.array([1.0, -2.0])

    def gradient(self, x: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
        return self.a.copy()

    def value(self, x: np.ndarray) -> np.ndarray:
        return np.atleast_2d(x) @ self.a

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(2)


def test_constant_lr_gives_the_mean_gradient_and_a_changing_lr_is_divided_out_exactly() -> None:
    eng = ReferenceEngine(presets.scaffold(1, 3), _Linear(), np.zeros(2))
    for _ in range(3):
        eng.step(None, 0.05)
    assert eng.control is not None
    np.testing.assert_allclose(eng.control[0], _Linear.a, rtol=0, atol=1e-12)
    # lrs 0.01, 0.02, 0.03 in one round: z - y = 0.06 a, divided by 0.06 (not by 3 x 0.03 = 0.09)
    eng = ReferenceEngine(presets.scaffold(1, 3), _Linear(), np.zeros(2))
    for lr in (0.01, 0.02, 0.03):
        eng.step(None, lr)
    assert eng.control is not None
    np.testing.assert_allclose(eng.control[0], _Linear.a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {"optimizer": "adam"}])
def test_the_simulator_refuses_an_optimizer_that_is_not_plain_sgd(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        Simulator(presets.scaffold(2, 2), lambda: nn.Linear(2, 1), loss_fn=lambda o, y: o.sum(),
                  dtype=torch.float64, seed=0, **kwargs)
    assert "SCAFFOLD" in str(err.value) and "\n" not in str(err.value)


def test_the_simulator_divides_by_the_sum_of_the_rounds_learning_rates() -> None:
    # F(x) = x . (1, 1) (o.sum() of a bias-free linear layer with input 1): every gradient is (1, 1)
    sim = Simulator(presets.scaffold(1, 2), lambda: nn.Linear(2, 1, bias=False), loss_fn=lambda o, y: o.sum(),
                    dtype=torch.float64, seed=0)
    batch = [(torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))]
    sim.step(batch, 0.1)
    sim.step(batch, 0.05)  # the round's lrs sum to 0.15: c_1 = (z - y) / 0.15 = the gradient
    assert sim.control is not None
    torch.testing.assert_close(sim.control[0], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("change", [{"optimizer": "adamw"}, {"momentum": 0.5}])
def test_the_run_configuration_refuses_them_before_the_run(change: dict) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig(preset="scaffold", **change)
    assert next(iter(change)) in str(err.value) and "\n" not in str(err.value)
    RunConfig(preset="fedavg", **change)  # FedAvg takes them
    RunConfig(preset="scaffold", lr_warmup_steps=5, lr_decay_epochs=[1.0])  # divided out exactly: accepted
