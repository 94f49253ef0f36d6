"""A CLI that explains itself: every flag's default and choices in ``--help``, the presets listed, the run /
compare defaults stated, and ``--help`` / ``--version`` answered without importing torch.

The speed test asserts on *what is imported* (robust on a loaded machine), not on wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest

from coopsgd import __version__
from coopsgd.algorithms.registry import declarations
from coopsgd.catalog import REPRODUCTIONS
from coopsgd.cli import COMPARE_DEFAULTS, build_parser, main

#: Modules that building the parser, --help and --version must not load.
HEAVY = ("torch", "matplotlib", "sklearn", "tqdm", "yaml", "coopsgd.experiments", "coopsgd.models", "coopsgd.data",
         "coopsgd.engines", "coopsgd.train.trainer", "coopsgd.plots")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_help_and_version_import_nothing_heavy() -> None:
    code = f"""
import io, json, sys, contextlib
from coopsgd.cli import build_parser, main
build_parser()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["--version"]) == 0
    for argv in ([], ["run"], ["compare"], ["reproduce"], ["theory"], ["topology"], ["plot"]):
        try:
            main([*argv, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, argv
heavy = {HEAVY!r}
print(json.dumps(sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_python_m_coopsgd_and_console_script() -> None:
    res = subprocess.run([sys.executable, "-m", "coopsgd", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"coopsgd {__version__}"
    exe = shutil.which("coopsgd")
    cmd = [exe] if exe else [sys.executable, "-m", "coopsgd"]
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for command in ("topology", "theory", "reproduce", "run", "compare", "plot"):
        assert command in res.stdout
    assert "presets: sync, local_sgd" in res.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")


def test_every_run_and_compare_flag_has_help_and_its_default(capsys) -> None:
    """Read back from the printed --help: every flag of run and compare has a help text that states its default."""
    import re

    for command in ("run", "compare"):
        out = _help(capsys, command)
        entries = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
        flags = [e for e in entries if e.startswith("--")]
        assert len(flags) > 80, command
        for entry in flags:
            text = " ".join(entry.split())
            head = text.split()[0]
            if head == "--help":
                continue
            assert "(default" in text or "alias of" in text, f"{command} {head}: {text}"
            words = text.split(maxsplit=2)
            assert len(words) > 2 and len(words[2]) > 12, f"{command} {head} has no help text: {text}"


def test_every_flag_states_its_default() -> None:
    parser = build_parser()
    missing = []
    for name, sub in _subparsers(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action)
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[0]}: {text}")
    assert missing == []


def _choices_and_defaults(out: str, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """Every setting that takes a name shows its choices (from the registries) and its default."""
    from coopsgd.settings import default_text
    from coopsgd.train.config import config_settings

    checked = 0
    for _, s in config_settings():
        names = s.info.allowed()
        if names is None or s.info.preset or not s.info.flag or s.key in skip:
            continue
        default = default_text(defaults[s.key]) if s.key in (defaults or {}) else s.default_text()
        assert f"choices: {', '.join(names)} (default: {default}" in out, s.key
        checked += 1
    assert checked >= 15


def test_run_help_lists_presets_defaults_and_choices(capsys) -> None:
    out = " ".join(_help(capsys, "run").split())  # one line: the wrapping does not matter
    for name, decl in declarations().items():
        assert name in out and " ".join(decl.summary.split()) in out
    _choices_and_defaults(out)
    assert "choices: reference, simulate, distributed (default: simulate)" in out
    assert "choices: mlp, lenet, cnn7, resnet20, vgg16, lstm_lm, gpt (default: mlp)" in out
    assert "choices: cpu, cuda, cuda:N, mps (default: cpu)" in out
    assert "(default: local_sgd)" in out and "--workers WORKERS number of workers m (default: 8)" in out
    assert "--lr LR learning rate (default: 0.1 for sgd, 0.001 for adam and adamw)" in out
    # run's defaults, and that compare's differ
    assert "model mlp, 5 epochs" in out
    assert f"`coopsgd compare` uses model {COMPARE_DEFAULTS['model']}, epochs 15" in out


def test_compare_help_states_its_own_defaults(capsys) -> None:
    out = " ".join(_help(capsys, "compare").split())
    _choices_and_defaults(out, COMPARE_DEFAULTS, skip=("preset",))  # compare takes --presets
    assert "(default: lenet; coopsgd run: mlp)" in out
    assert "(default: 15; coopsgd run: 5)" in out
    assert "model lenet, epochs 15" in out and "`coopsgd run` defaults to model mlp, 5 epochs" in out
    assert "(default: sync,local_sgd,easgd,dpsgd,lsgd)" in out
    for name in declarations():
        assert name in out


def test_reproduce_help_lists_every_experiment(capsys) -> None:
    out = _help(capsys, "reproduce")
    for name, r in REPRODUCTIONS.items():
        assert name in out and r.description.split(":")[0] in out
    assert "lsgd-matrix-completion" in out


def test_top_level_help_names_the_presets(capsys) -> None:
    out = " ".join(_help(capsys).split())
    assert "presets: " + ", ".join(declarations()) in out
