"""Files written before the configuration had sections still load and resume (tests/fixtures/v0_1, written by
coopsgd 0.1.0 at commit 7eeb22e), and the sections keep every flat key in exactly one place."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from coopsgd.cli import main
from coopsgd.errors import ConfigError
from coopsgd.settings import settings_of
from coopsgd.train import RunConfig, load_checkpoint, load_config
from coopsgd.train.config import FLAT_KEYS, SECTIONS, OptimizerSettings, flat_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
#: Every setting added since 0.1, at its default (a file of 0.1 gets these).
_NEW_DEFAULTS = {s.key: s.default for cls in SECTIONS.values() for s in settings_of(cls)
                 if s.key not in EXPECTED["flat_run.toml"]}


@pytest.mark.parametrize("name", ["flat_run.toml", "flat_run_table.yaml"])
def test_a_flat_config_file_of_0_1_loads_to_the_same_settings(name: str) -> None:
    cfg = RunConfig.from_dict(load_config(FIXTURES / name))
    got = cfg.to_dict()
    assert {k: got[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert {k: got[k] for k in got if k not in EXPECTED[name]} == _NEW_DEFAULTS  # settings added since: defaults
    assert RunConfig.from_dict(cfg.to_sections()) == cfg  # the sectioned form holds the same settings


def test_a_run_directory_of_0_1_resumes_bit_identically(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_local_sgd", run)
    assert main(["run", "--resume", str(run), "--max-steps", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    want = EXPECTED["resume_to_8"]
    assert summary["final"] == want["final"]
    assert (summary["steps"], summary["communication_rounds"], summary["bytes_sent"]) == (
        8, want["communication_rounds"], want["bytes_sent"])
    state = load_checkpoint(run / "checkpoint.pt")["engine_state"]["payload"]["state"]
    assert hashlib.sha256(state.numpy().tobytes()).hexdigest() == want["state_sha256"]


def test_a_run_directory_of_0_1_is_the_same_run_for_its_config(tmp_path) -> None:
    """Rerunning the 0.1 config into its directory is the same configuration (not 'another one')."""
    from coopsgd.train.rundir import config_difference

    old = json.loads((FIXTURES / "run_local_sgd" / "config.json").read_text())
    new = RunConfig.from_dict(load_config(FIXTURES / "flat_run.toml")).to_dict()
    assert config_difference(old, new) is None


def test_a_sectioned_file_loads(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[algorithm]\npreset = "easgd"\nworkers = 4\n[optimizer]\nname = "adam"\nbeta1 = 0.8\n'
                 '[schedule]\nlr = 0.01\nmax_steps = 3\n')
    cfg = RunConfig.from_dict(load_config(f))
    assert (cfg.algorithm.preset, cfg.optimizer.name, cfg.optimizer.beta1, cfg.schedule.lr) == ("easgd", "adam", 0.8, 0.01)
    assert cfg == RunConfig(preset="easgd", workers=4, optimizer="adam", beta1=0.8, lr=0.01, max_steps=3)


@pytest.mark.parametrize(("data", "words"), [
    ({"schedule": {"lrr": 0.1}}, ["unknown key 'lrr'", "did you mean 'lr'"]),
    ({"schedule": {"momentum": 0.9}}, ["unknown key 'momentum'", "belongs to [optimizer]"]),
    ({"lr": 0.1, "schedule": {"lr": 0.2}}, ["lr=0.2", "given twice"]),
    ({"optimiser": "adam"}, ["unknown key 'optimiser'", "did you mean 'optimizer'"]),
])
def test_bad_sectioned_keys_are_named(data: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        flat_settings(data)
    for w in words:
        assert w in str(info.value)


def test_every_flat_key_belongs_to_exactly_one_section() -> None:
    seen: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for s in settings_of(cls):
            assert s.key not in seen, f"{s.key} in {seen.get(s.key)} and {section}"
            seen[s.key] = section
    assert seen == {k: v[0] for k, v in FLAT_KEYS.items()}
    # the flat RunConfig of 0.1 had 76 fields: each is one section's setting (later settings are added to them)
    assert set(EXPECTED["flat_run.toml"]) <= set(seen) and len(EXPECTED["flat_run.toml"]) == 76
    assert FLAT_KEYS["optimizer"][1].name == "name" and SECTIONS["optimizer"] is OptimizerSettings


def test_flat_keywords_sections_and_replace() -> None:
    cfg = RunConfig(preset="easgd", lr=0.05, workers=4, optimizer="adamw", weight_decay=0.1)
    assert (cfg.algorithm.preset, cfg.schedule.lr, cfg.algorithm.workers) == ("easgd", 0.05, 4)
    assert cfg.optimizer == OptimizerSettings("adamw", weight_decay=0.1)
    assert RunConfig(optimizer=OptimizerSettings("adamw", weight_decay=0.1), preset="easgd", lr=0.05, workers=4) == cfg
    changed = cfg.replace(out="runs/x", beta1=0.5)
    assert changed.output.out == "runs/x" and changed.optimizer.beta1 == 0.5 and changed.schedule == cfg.schedule
    assert cfg.output.out is None  # frozen: replace made a copy
    with pytest.raises(AttributeError):
        cfg.schedule.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        RunConfig(batchsize=3)


def test_the_sectioned_example_is_the_flat_example() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    flat = RunConfig.from_dict(load_config(examples / "local_sgd.toml"))
    sectioned = RunConfig.from_dict(load_config(examples / "local_sgd_sections.toml"))
    assert sectioned.replace(optimizer=None) == flat  # the example names sgd; the flat one leaves it to the preset
