"""Issue 24, class 5: a setting the run does not use is refused, and a number given as text is refused alike
from the CLI, a config file and the Python API.

The rule is declared beside each setting (``used_when`` in :func:`coopsgd.settings.setting`) and applied by
:class:`coopsgd.train.config.RunConfig` to every configuration, however it was made: a setting given a value
other than its default in a run that does not use it is a :class:`ConfigError` naming the setting, its value
and why (one line, exit status 2 on the CLI, no run directory). A setting left at its default is never
refused. ``RunConfig.replace`` resets what a change leaves unused; a command's own defaults
(``coopsgd compare``'s model) are left out where a run does not use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coopsgd.algorithms.registry import declarations
from coopsgd.cli import build_parser, main
from coopsgd.cli.compare import _compare_plan
from coopsgd.errors import ConfigError
from coopsgd.train.config import ENGINES, RunConfig, config_settings

#: (settings, the refused key, a fragment of why): each would have done nothing.
UNUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"optimizer": "sgd", "beta1": 0.5}, "beta1", "the optimizer is sgd"),
    ({"eps": 1e-6}, "eps", "the optimizer is sgd"),  # local_sgd: sgd unless told otherwise
    ({"optimizer": "adam", "amsgrad": False, "beta2": 0.99, "preset": "sync", "engine": "reference"}, "beta2",
     "reference engine"),
    ({"preset": "diloco", "momentum": 0.9}, "momentum", "the optimizer is adamw"),  # diloco's own optimizer
    ({"engine": "reference", "momentum": 0.9}, "momentum", "reference engine"),
    ({"engine": "reference", "weight_decay": 0.01}, "weight_decay", "reference engine"),
    ({"engine": "distributed", "executor": "vmap"}, "executor", "distributed engine"),
    ({"engine": "distributed", "compute_gflops": 5.0}, "compute_gflops", "distributed engine"),
    ({"engine": "distributed", "compute": "constant"}, "compute", "distributed engine"),
    ({"engine": "distributed", "net_latency_ms": 5.0}, "net_latency_ms", "emulate_network"),
    ({"engine": "distributed", "threads": 2}, "threads", "cores // workers"),
    ({"timeout_s": 5.0}, "timeout_s", "simulate engine"),
    ({"emulate_network": True}, "emulate_network", "simulate engine"),
    ({"engine": "reference", "model": "lenet"}, "model", "reference engine"),
    ({"engine": "reference", "dataset": "digits"}, "dataset", "reference engine"),
    ({"engine": "reference", "augment": True}, "augment", "reference engine"),
    ({"engine": "reference", "eval_samples": 100}, "eval_samples", "reference engine"),
    ({"engine": "reference", "holdout_fraction": 0.1}, "holdout_fraction", "reference engine"),
    ({"engine": "reference", "objective": "quadratic", "batch_size": 8}, "batch_size", "quadratic"),
    ({"engine": "reference", "objective": "quadratic", "partition": "dirichlet"}, "partition", "quadratic"),
    ({"objective": "quadratic"}, "objective", "simulate engine"),
    ({"objective_args": {"sigma": 0.1}}, "objective_args", "simulate engine"),
    ({"dirichlet_beta": 0.3}, "dirichlet_beta", "partition is 'iid'"),
    ({"partition": "dirichlet", "shards_per_worker": 3}, "shards_per_worker", "partition is 'dirichlet'"),
    ({"error_feedback": "on"}, "error_feedback", "compress is 'none'"),
    ({"consensus_step": 0.5}, "consensus_step", "does not gossip"),
    ({"preset": "sync", "loss_estimate": "batch"}, "loss_estimate", "LSGD"),
    ({"preset": "sync", "downpour_order": "schedule"}, "downpour_order", "DOWNPOUR"),
    ({"max_skips": 3}, "max_skips", "nan_policy is 'stop'"),
    ({"compute": "measured", "compute_ms": 5.0}, "compute_ms", "compute is 'measured'"),
    ({"compute_spread": 0.5}, "compute_spread", "compute is 'flops'"),
    ({"engine": "reference", "compute_gflops": 5.0}, "compute_gflops", "reference engine"),
    ({"engine": "reference", "dtype": "float64"}, "dtype", "computes in float64"),
]

#: The same settings where the run uses them: accepted.
USED: list[dict[str, Any]] = [
    {"optimizer": "adam", "beta1": 0.5, "eps": 1e-6, "amsgrad": True},
    {"preset": "diloco", "beta1": 0.8},
    {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"engine": "distributed", "timeout_s": 5.0, "emulate_network": True, "net_latency_ms": 5.0},
    {"engine": "reference", "objective": "quadratic", "objective_args": {"dim": 4}, "compute": "constant",
     "compute_ms": 2.0, "threads": 1},
    {"engine": "reference", "objective": "logistic", "batch_size": 8, "partition": "dirichlet"},
    {"partition": "dirichlet", "dirichlet_beta": 0.3},
    {"partition": "shards", "shards_per_worker": 3},
    {"compress": "topk:0.1", "error_feedback": "on"},
    {"preset": "dpsgd", "consensus_step": 0.5},
    {"preset": "lsgd", "loss_estimate": "batch"},
    {"preset": "downpour", "downpour_order": "schedule"},
    {"nan_policy": "skip", "max_skips": 3},
    {"compute": "lognormal", "compute_ms": 5.0, "compute_spread": 0.5},
    {"compute": "flops", "compute_ms": 5.0, "compute_gflops": 5.0},  # compute_ms: flops' fallback
    {"engine": "simulate", "executor": "vmap", "threads": 2, "model": "lenet", "augment": True},
    {"engine": "distributed", "dtype": "float64"},
]


@pytest.mark.parametrize("settings,key,why", UNUSED, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(UNUSED)])
def test_a_setting_the_run_does_not_use_is_refused_naming_it(settings: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(**settings)
    assert info.value.field == key
    text = str(info.value)
    assert text.startswith(f"{key}=") and why in text and text.endswith("leave it out"), text
    assert "\n" not in text


@pytest.mark.parametrize("settings", USED, ids=[",".join(s) for s in USED])
def test_the_same_settings_are_accepted_where_the_run_uses_them(settings: dict[str, Any]) -> None:
    cfg = RunConfig(**settings)
    assert cfg.unused() == []
    assert {k: v for k, v in cfg.to_dict().items() if k in settings} == settings


def test_defaults_never_refuse_on_any_engine_or_preset() -> None:
    for engine in ENGINES:
        for preset in declarations():
            cfg = RunConfig(engine=engine, preset=preset)
            assert cfg.unused() == [], (engine, preset)


def test_every_condition_names_a_reason_and_leaves_the_defaults_alone() -> None:
    """Each declared ``used_when`` returns None or a non-empty reason, for a run of each engine."""
    declared = [(section, s) for section, s in config_settings() if s.info.used_when is not None]
    assert len(declared) >= 25
    for engine in ENGINES:
        cfg = RunConfig(engine=engine)
        for _, s in declared:
            reason = s.info.used_when(cfg)
            assert reason is None or (isinstance(reason, str) and reason.strip()), (engine, s.key)


def test_replace_resets_what_a_change_leaves_unused_and_refuses_what_it_sets() -> None:
    cfg = RunConfig(executor="vmap", compute="lognormal", compute_spread=0.5, preset="lsgd", loss_estimate="batch")
    moved = cfg.replace(engine="distributed", preset="sync")
    assert moved.execution.executor == "auto" and moved.clock.compute == "flops"
    assert moved.clock.compute_spread == 0.0 and moved.algorithm.loss_estimate == "running_mean"
    assert moved.unused() == []
    with pytest.raises(ConfigError) as info:
        cfg.replace(engine="distributed", executor="loop")
    assert info.value.field == "executor"


def test_shared_settings_keep_what_another_preset_uses() -> None:
    shared = RunConfig.shared(preset="sync", loss_estimate="batch")
    assert [k for k, _, _ in shared.unused()] == ["loss_estimate"]
    assert shared.replace(preset="lsgd").algorithm.loss_estimate == "batch"
    assert shared.replace(preset="sync").algorithm.loss_estimate == "running_mean"
    assert shared.without_unused() == RunConfig(preset="sync")


# -- the CLI: one line, exit 2, nothing written -------------------------------------------------------------


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,expected", [
    (["--optimizer", "sgd", "--beta1", "0.5"], "beta1=0.5 is invalid: an Adam setting; the optimizer is sgd"),
    (["--engine", "distributed", "--executor", "vmap"], "executor='vmap' is invalid: the distributed engine"),
    (["--engine", "reference", "--model", "lenet"], "model='lenet' is invalid: the reference engine"),
    (["--sigma", "0.1"], "objective_args={'sigma': 0.1} is invalid: the simulate engine"),
    (["--consensus-step", "0.5"], "consensus_step=0.5 is invalid: preset 'local_sgd' does not gossip"),
    (["--error-feedback", "off"], "error_feedback='off' is invalid: compress is 'none'"),
    (["--dirichlet-beta", "0.1"], "dirichlet_beta=0.1 is invalid: partition is 'iid'"),
])
def test_run_refuses_a_flag_the_run_does_not_use(argv: list[str], expected: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["run", *argv, "--max-steps", "1", "--out", str(out)])
    line = _error_line(capsys)
    assert code == 2 and line.startswith(f"coopsgd: error: {expected}"), line
    assert not out.exists()


def test_a_flag_at_its_default_is_not_refused() -> None:
    """``--beta1 0.9`` with SGD says nothing new: it is the default, and config.json records the default."""
    args = build_parser().parse_args(["run", "--optimizer", "sgd", "--beta1", "0.9"])
    from coopsgd.cli.config_flags import config_from_args

    assert config_from_args(args).optimizer.beta1 == 0.9


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'optimizer = "sgd"\nbeta1 = 0.5\n'),
    (".yaml", "optimizer: sgd\nbeta1: 0.5\n"),
    (".json", '{"optimizer": "sgd", "beta1": 0.5}'),
])
def test_a_config_file_key_the_run_does_not_use_is_refused_naming_the_file(
        suffix: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    code = main(["run", "--config", str(path), "--max-steps", "1", "--out", str(tmp_path / "run")])
    line = _error_line(capsys)
    assert code == 2 and f"config {str(path)!r}: beta1=0.5 is invalid" in line, line
    assert not (tmp_path / "run").exists()


def test_compare_applies_a_shared_setting_where_a_run_uses_it() -> None:
    args = build_parser().parse_args(["compare", "--presets", "sync,lsgd", "--loss-estimate", "batch",
                                      "--engine", "reference"])
    base, plan = _compare_plan(args)
    runs = dict(plan)
    assert runs["lsgd"].algorithm.loss_estimate == "batch"
    assert runs["sync"].algorithm.loss_estimate == "running_mean"
    assert runs["sync"].problem.model == "mlp"  # compare's own default model: left out where nothing trains one
    assert all(cfg.unused() == [] for cfg in runs.values())


def test_compare_refuses_a_setting_no_preset_would_use(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["compare", "--presets", "sync,local_sgd", "--engine", "distributed", "--executor", "vmap",
                 "--out", str(tmp_path / "c")])
    line = _error_line(capsys)
    assert code == 2 and "executor='vmap' is invalid: the distributed engine does not use it" in line, line
    assert not (tmp_path / "c").exists()


# -- a number given as text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,allowed", [
    ("lr", "0.1", "must be a number, not a string"),
    ("workers", "4", "must be an integer, not a string"),
    ("tau", "4", "must be an integer, not a string"),
    ("alpha", "0.1", "must be a number, not a string"),
    ("momentum", "0.9", "must be a number, not a string"),
    ("consensus_step", "0.5", "must be a number, not a string"),
])
def test_a_number_given_as_text_is_refused_alike_in_every_config_format(
        key: str, value: str, allowed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"alpha": {"preset": "easgd"}, "consensus_step": {"preset": "dpsgd"}}.get(key, {})
    expected = f"{key}={value!r} is invalid: {allowed}"
    with pytest.raises(ConfigError) as info:  # the Python API
        RunConfig(**extra, **{key: value})
    assert str(info.value) == expected and info.value.field == key
    files = {".toml": "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**extra, key: value}.items()),
             ".yaml": "".join(f"{k}: {json.dumps(v)}\n" for k, v in {**extra, key: value}.items()),
             ".json": json.dumps({**extra, key: value})}
    for suffix, text in files.items():
        path = tmp_path / f"c{suffix}"
        path.write_text(text)
        code = main(["run", "--config", str(path), "--out", str(tmp_path / "run")])
        line = _error_line(capsys)
        assert code == 2 and line == f"coopsgd: error: config {str(path)!r}: {expected}", line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,text,allowed", [
    ("--lr", "abc", "must be a number"), ("--workers", "4.5", "must be an integer"), ("--tau", "x", "must be an integer"),
    ("--steps", "ten", "must be an integer"), ("--sigma", "y", "must be a number"),
])
def test_a_flag_whose_text_is_not_a_number_is_one_line_of_the_same_shape(
        flag: str, text: str, allowed: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["run", flag, text, "--out", str(tmp_path / "run")])
    line = _error_line(capsys)
    name = "--max-steps" if flag == "--steps" else flag
    assert code == 2 and line == f"coopsgd: error: {name}={text!r} is invalid: {allowed}", line
    assert not (tmp_path / "run").exists()


def test_error_feedback_is_refused_where_every_round_is_choco_gossip() -> None:
    """CHOCO's public copies carry what a compressed gossip round left out: error feedback is unused there (and
    refused when set), but used by an outer averaging round on top of gossip (SlowMo over D-PSGD)."""
    from coopsgd.train.config import RunConfig

    for preset in ("choco", "dpsgd", "matcha", "decentralized_periodic"):
        with pytest.raises(ConfigError, match="error_feedback.*only gossips"):
            RunConfig(preset=preset, compress="topk:0.1", error_feedback="off")
        assert RunConfig(preset=preset, compress="topk:0.1").communication.error_feedback == "auto"
    cfg = RunConfig(preset="slowmo", base_algorithm="dpsgd", compress="topk:0.1", error_feedback="off")
    assert cfg.communication.error_feedback == "off"
    assert RunConfig(preset="local_sgd", compress="int8", error_feedback="on").communication.error_feedback == "on"


def test_epochs_with_max_steps_is_refused_and_a_resume_replaces_the_recorded_length(tmp_path, capsys) -> None:
    from coopsgd.train.config import RunConfig

    with pytest.raises(ConfigError, match="epochs=3.0 is invalid: max_steps=10 gives the run's length"):
        RunConfig(epochs=3.0, max_steps=10)
    assert RunConfig(epochs=5.0, max_steps=10).schedule.max_steps == 10  # the default epochs: not a choice
    run = tmp_path / "r"
    assert main(["run", "--epochs", "0.1", "--workers", "2", "--checkpoint-every", "2", "--out", str(run)]) == 0
    assert main(["run", "--resume", str(run), "--max-steps", "20"]) == 0  # the recorded epochs (13 steps) replaced
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 20 and saved["epochs"] == 5.0
    capsys.readouterr()
