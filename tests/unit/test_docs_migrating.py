"""docs/migrating.md: every Python block runs (its assertions are the correspondences the page states),
and every ``coopsgd`` command line parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
NOT_RUN = "# not run by the tests"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


def _runnable() -> list[str]:
    return [b for b in _blocks("python") if not b.startswith(NOT_RUN)]


def test_the_page_has_runnable_blocks() -> None:
    assert len(_runnable()) >= 5
    assert len(_blocks("python")) - len(_runnable()) == 2  # PyTorch's own recipe, the wrapper (processes)


@pytest.mark.parametrize("index", range(len(_runnable())))
def test_python_block_runs(index: int) -> None:
    code = _runnable()[index]
    exec(compile(code, f"{DOC.name}[python block {index}]", "exec"), {"__name__": f"migrating_{index}"})


def test_command_lines_parse() -> None:
    """Each ``coopsgd ...`` line parses with the real CLI parser, every flag spelled in full (argparse
    would take a prefix such as ``--optimizer`` for ``--optimizer-state``), and names a declared preset."""
    from coopsgd.algorithms.registry import declarations
    from coopsgd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    lines = [line for b in _blocks("bash") for line in b.splitlines() if line.startswith("coopsgd ")]
    assert len(lines) >= 2
    for line in lines:
        argv = shlex.split(line)[1:]
        parser.parse_args(argv)
        known = set(sub.choices[argv[0]]._option_string_actions)
        flags = [a.split("=")[0] for a in argv if a.startswith("--")]
        assert all(f in known for f in flags), (line, [f for f in flags if f not in known])
        if "--preset" in argv:
            assert argv[argv.index("--preset") + 1] in declarations(), line


def test_config_blocks_build_a_spec(tmp_path: Path) -> None:
    from coopsgd.train import RunConfig, load_config

    blocks = _blocks("toml")
    assert blocks
    for i, b in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(b, encoding="utf-8")
        spec = RunConfig.from_dict(load_config(path)).build_spec()
        assert spec.params["step_counting"] == "pytorch"
