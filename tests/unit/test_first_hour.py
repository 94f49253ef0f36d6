"""What a new user meets in the first hour (issue 25): the README's preset table, a bare ``coopsgd``, ``coopsgd
theory`` without a preset, the comparison table's headers, rounding below zero in a duration, the defaults that
depend on the run (an adaptive optimizer's learning rate, a period longer than the run) and what an epoch is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coopsgd.algorithms.registry import declarations
from coopsgd.cli import main
from coopsgd.cli.common import use_threads
from coopsgd.cli.compare import _table
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.config.sections import DEFAULT_LR
from coopsgd.train.problem import (
    base_lr,
    build_problem,
    epoch_steps,
    inner_optimizer,
    lr_at,
    run_threads,
    settle,
)
from coopsgd.train.records import nonnegative, time_fields

README = Path(__file__).resolve().parents[2] / "README.md"


def _preset_table() -> list[list[str]]:
    """The rows of the README's preset table: the block of consecutive ``|`` lines after its header."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| preset |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_preset_table_is_one_table_with_every_preset() -> None:
    rows = _preset_table()
    assert set(rows[1][0]) <= {"-", ":"}  # the separator row
    names = [r[0].strip("`") for r in rows[2:]]
    assert names == [n for n in declarations() if n in names]  # in the declarations' order
    assert set(declarations()) <= set(names), f"missing from the README's table: {set(declarations()) - set(names)}"
    assert all(len(r) == len(rows[0]) for r in rows), "a row with another number of cells"


def test_bare_coopsgd_prints_the_usage_and_the_commands(capsys) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: coopsgd")
    for command in ("run", "compare", "reproduce", "theory", "topology", "plot"):
        assert f"\n    {command} " in err or f"\n  {command} " in err, command


def test_theory_without_a_preset_says_what_to_give(capsys) -> None:
    assert main(["theory"]) == 2
    err = capsys.readouterr().err.strip()
    assert "None" not in err and "--preset" in err and "easgd" in err and "heatmap" in err
    assert len(err.splitlines()) == 1


def _result(source: str = "simulated") -> dict:
    return {"final": {"train_loss": 0.1, "test_loss": 0.2, "test_accuracy": 0.97}, "time_s": 1.5,
            "time_source": source, "simulated_split_s": {"communication_s": 0.5}, "communication_rounds": 3,
            "bytes_sent": 1e6, "wall_time_s": 2.0}


def test_comparison_table_headers_are_whole_and_name_the_clock() -> None:
    text = _table({"local_sgd": _result(), "a_very_long_label_of_a_run_x": _result()}, "test_accuracy")
    head, *rows = text.splitlines()
    assert "test accuracy" in head and "simulated s" in head and "wall s" in head and "time s" not in head
    assert all(len(r) == len(head) for r in rows)
    assert "measured s" in _table({"x": _result("measured")}, "test_accuracy")


def test_rounding_below_zero_is_recorded_as_zero() -> None:
    assert nonnegative(-1.8e-15) == 0.0 and nonnegative(-1.0) == -1.0 and nonnegative(None) is None
    assert nonnegative(2.5) == 2.5 and str(nonnegative(-0.0)) == "0.0"
    rec = time_fields({"simulated_time_s": 1.0, "simulated_idle_s": -1.8e-15}, 0.5, 1.0)
    assert rec["simulated_idle_s"] == 0.0


def test_an_adaptive_inner_optimizer_gets_its_own_default_lr() -> None:
    assert base_lr(RunConfig()) == DEFAULT_LR["sgd"] == 0.1
    assert inner_optimizer(RunConfig(preset="diloco")) == "adamw"
    assert base_lr(RunConfig(preset="diloco")) == 1e-3
    assert base_lr(RunConfig(optimizer="adam")) == 1e-3
    assert base_lr(RunConfig(preset="diloco", optimizer="sgd")) == 0.1
    assert base_lr(RunConfig(preset="diloco", lr=0.05)) == 0.05  # a given lr is kept
    assert lr_at(RunConfig(preset="diloco"), 0, 10, 0.0) == 1e-3
    cfg, notes = settle(RunConfig(preset="diloco", max_steps=1000))
    assert cfg.schedule.lr == 1e-3 and any("adamw" in n and "--lr" in n for n in notes)
    cfg, notes = settle(RunConfig(max_steps=10))
    assert cfg.schedule.lr == 0.1 and notes == ()  # sgd's default is written in, without a note


def test_a_default_period_longer_than_the_run_is_fitted_and_said() -> None:
    cfg, notes = settle(RunConfig(preset="diloco", max_steps=155))
    assert cfg.algorithm.tau == 15 and cfg.build_spec().tau == 15
    assert any("tau = 15" in n and "500" in n and "--tau" in n for n in notes)
    # a period the user gives is kept; a default that fits is left alone; settling twice changes nothing
    assert settle(RunConfig(preset="diloco", tau=300, max_steps=155))[0].algorithm.tau == 300
    assert settle(RunConfig(preset="diloco", max_steps=5000))[0].algorithm.tau is None
    assert settle(cfg) == (cfg, ())


@pytest.mark.parametrize("preset", list(declarations()))
def test_every_preset_s_default_run_communicates(preset: str) -> None:
    cfg, _ = settle(RunConfig(preset=preset, eval_samples=10))
    problem = build_problem(cfg)
    spec = problem.spec
    assert problem.total_steps >= 100, "the default run is a few epochs"
    assert spec.tau <= problem.total_steps // 2, f"{preset}: tau = {spec.tau}, {problem.total_steps} steps"


def test_an_epoch_is_one_pass_over_the_training_set() -> None:
    class Loader:
        shard_sizes = (2000, 500, 5000, 500)
        batch_size = 32

    assert epoch_steps(Loader()) == 8000 // (4 * 32)  # not the smallest shard's 500 // 32
    Loader.shard_sizes = (10, 10)
    assert epoch_steps(Loader()) == 1


def test_threads_default_to_one_for_the_small_models_and_follow_the_setting() -> None:
    assert run_threads(RunConfig()) == 1 and run_threads(RunConfig(model="lenet")) == 1
    assert run_threads(RunConfig(model="vgg16")) is None  # torch's own for a large model
    assert run_threads(RunConfig(model="vgg16", threads=2)) == 2
    assert run_threads(RunConfig(engine="reference")) is None
    before = torch.get_num_threads()
    try:
        use_threads(RunConfig(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="cores // workers"):
        use_threads(RunConfig(engine="distributed", threads=2))
    assert main(["run", "--threads", "0"]) == 2
