"""``RunConfig.holdout_fraction``: a seeded held-out part of the training set, never trained on, evaluated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.problem import build_problem, holdout_split


@pytest.mark.parametrize("n, fraction, seed", [(8000, 0.1, 0), (101, 0.33, 7), (5, 0.01, 3)])
def test_split_is_disjoint_covers_everything_and_has_the_stated_size(n: int, fraction: float, seed: int) -> None:
    train, held = holdout_split(n, fraction, seed)
    assert len(held) == max(1, round(fraction * n))
    assert np.intersect1d(train, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)  # sorted: the training order is kept


def test_split_depends_on_the_seed_alone_and_leaves_global_rngs_alone() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = holdout_split(1000, 0.2, 5)
    b = holdout_split(1000, 0.2, 5)
    c = holdout_split(1000, 0.2, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(np_state, np.random.get_state(), strict=True))


def test_fraction_zero_holds_out_nothing() -> None:
    train, held = holdout_split(50, 0.0, 1)
    assert np.array_equal(train, np.arange(50)) and held.size == 0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, math.nan, "a tenth", True])
def test_bad_fractions_are_config_errors_naming_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match="holdout_fraction"):
        RunConfig(holdout_fraction=bad)  # type: ignore[arg-type]


def test_a_fraction_that_leaves_nothing_to_train_on_is_refused() -> None:
    with pytest.raises(ConfigError, match="holdout_fraction.*leave some"):
        holdout_split(3, 0.9, 0)


def test_build_problem_trains_on_the_rest_and_keeps_zero_unchanged() -> None:
    base = dict(workers=2, model="mlp", dataset="mnist_bundled", max_steps=2, seed=4)
    plain = build_problem(RunConfig(**base))
    zero = build_problem(RunConfig(**base, holdout_fraction=0.0))
    held = build_problem(RunConfig(**base, holdout_fraction=0.1))
    assert plain.holdout_set is None and zero.holdout_set is None and held.holdout_set is not None
    assert torch.equal(plain.train_set.x, zero.train_set.x)
    n = len(plain.train_set)
    keep, out = holdout_split(n, 0.1, 4)
    assert len(held.train_set) == n - len(out) and len(held.holdout_set) == len(out)
    assert torch.equal(held.train_set.x, plain.train_set.x[torch.from_numpy(keep)])
    assert torch.equal(held.holdout_set.y, plain.train_set.y[torch.from_numpy(out)])
    # the workers' shards cover exactly the remaining samples
    assert sum(held.loader.shard_sizes) == n - len(out)
    # with the same model initialisation (the split draws from no global RNG)
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), held.model.parameters(), strict=True))


def test_every_evaluation_records_the_centre_models_holdout_loss() -> None:
    from coopsgd.train.trainer import train

    cfg = dict(preset="lsgd", workers=2, model="mlp", max_steps=2, eval_every=2, eval_samples=64, tau=2,
               compute="constant", executor="loop")
    none = train(RunConfig(**cfg))
    zero = train(RunConfig(**cfg, holdout_fraction=0.0))
    assert none["final"] == zero["final"]  # bit-identical
    held = RunConfig(**cfg, holdout_fraction=0.05)
    from coopsgd.train.trainer import build, evaluate_model, iterate

    exp = build(held)
    recs = [r for r in iterate(exp) if r]
    assert [r["step"] for r in recs] == [0, 2] and all(math.isfinite(r["holdout_loss"]) and 0 <= r["holdout_accuracy"] <= 1 for r in recs)
    again = evaluate_model(exp.sim.center_model(), exp.holdout_set.x[:64], exp.holdout_set.y[:64], exp.loss_fn)
    assert recs[-1]["holdout_loss"] == pytest.approx(again["loss"], rel=1e-6)


def test_a_run_directory_of_another_fraction_is_another_configuration() -> None:
    from coopsgd.train.rundir import config_difference

    old = RunConfig().to_dict()
    del old["holdout_fraction"]  # a config.json written before the field existed
    assert config_difference(old, RunConfig().to_dict()) is None
    assert config_difference(old, RunConfig(holdout_fraction=0.1).to_dict()) == ("holdout_fraction", 0.0, 0.1)
