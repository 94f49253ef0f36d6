"""What every ``coopsgd`` command shares: the parser class and help format, JSON output, integer flags,
progress, and the preset flags of ``theory`` (from the preset declarations).

Imports nothing heavy (no torch, matplotlib, experiments): the parser is built from it at once.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms.registry import declarations, settings_table, spec_from_settings, takers
from coopsgd.catalog import reproduction_names
from coopsgd.errors import INT64_MAX, ConfigError, check_int
from coopsgd.fileio import atomic_write_bytes

__all__ = ["Parser", "HelpFormatter", "print_json", "write_json", "flag_int", "progress_wanted", "use_threads", "one_line",
           "experiment_names", "presets_epilog", "setting_help", "add_preset_args", "spec_from_args"]


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as ConfigError (one line, exit 2) instead of printing usage noise.

    Flags must be spelled in full: an abbreviation would silently pick another flag (``--optim`` could be
    ``--optimizer`` or ``--optimizer-state``), and a new flag could change what an old command means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (tables stay tables); every option's default in its help.

    ``(default: X)`` is added unless the help already states a default; ``None`` (not given) is shown as
    ``none``, a switch's ``False`` as ``off``.
    """

    def __init__(self, prog: str) -> None:
        width = max(80, min(shutil.get_terminal_size().columns, 120)) - 2
        super().__init__(prog, max_help_position=32, width=width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # each line is a paragraph, wrapped; indented lines (tables) are kept as written
        return "\n".join(indent + line if line.startswith("  ") or len(line) <= width
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse leaves the sub-commands' extra indent out of the column width: count it
        subactions = getattr(action, "_get_subactions", None)
        if action.help is not argparse.SUPPRESS and subactions is not None:
            for sub in subactions():
                width = len(self._format_action_invocation(sub)) + self._current_indent + self._indent_increment
                self._action_max_length = max(self._action_max_length, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        default = action.default
        if default is argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        if default is False and action.nargs == 0:
            return text + " (default: off)"
        if default is None or (isinstance(default, list) and not default):
            return text + " (default: none)"
        return text + " (default: %(default)s)"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace non-finite floats by None so the JSON is strict."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)) and not math.isfinite(float(o)):
        return None
    return o


def _dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, default=_json_default, allow_nan=False)


def print_json(obj: Any) -> None:
    print(_dumps(obj))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename) so a crash never leaves a half-written file."""
    atomic_write_bytes(path, _dumps(data).encode())


def flag_int(flag: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """An integer flag checked against its range (one line naming the flag)."""
    try:
        return check_int(flag, value, minimum=minimum, maximum=INT64_MAX if maximum is None else maximum)
    except ConfigError as exc:
        raise ConfigError(str(exc), field=flag, value=value) from None


def progress_wanted(args: argparse.Namespace) -> bool:
    """Show progress on stderr unless the output is JSON (an explicit ``--progress``/``--no-progress`` wins):
    a bar on a terminal, a plain line every ~10 s or 10% elsewhere (:mod:`coopsgd.train.progress`)."""
    explicit = getattr(args, "progress", None)
    if isinstance(explicit, bool):
        return explicit
    return not getattr(args, "json", False)


def use_threads(config: Any) -> None:
    """Set torch's threads for a run of ``config`` in this process (:func:`coopsgd.train.problem.run_threads`:
    ``--threads``, else 1 for the small models). The distributed engine's ranks take max(1, cores // workers)
    threads each (``--threads`` there is refused with the config: :meth:`coopsgd.train.config.RunConfig.unused`)."""
    import torch

    from coopsgd.train.problem import run_threads

    if config.execution.engine == "distributed":
        return
    threads = run_threads(config)
    if threads is not None:
        torch.set_num_threads(threads)


def one_line(exc: object) -> str:
    """An error message on one line (a message with line breaks would read as several errors)."""
    return " ".join(str(exc).split("\n")).strip()


def experiment_names() -> list[str]:
    # a static table (checked against the experiments' registry by a test): listing the names must not
    # import the experiments (torch, matplotlib)
    return reproduction_names()


def presets_epilog() -> str:
    """The presets, one line each, from their declarations."""
    decls = declarations()
    width = max(len(n) for n in decls) + 2
    lines = [f"  {n:{width}s}{d.summary}" for n, d in decls.items()]
    return "presets:\n" + "\n".join(lines)  # an epilog is not %-formatted (only "%(prog)" is)


def setting_help(name: str, *, with_defaults: bool = True) -> str:
    """Help of a preset setting from the declarations: what it does, choices / range, which presets take it
    (with each one's default)."""
    arg = settings_table()[name]
    parts = [arg.help]
    if arg.choices:
        parts.append("choices: " + ", ".join(arg.choices))
    rng = arg.range_str()
    if rng:
        parts.append(rng)
    users = takers(name)
    if with_defaults:
        parts.append("presets (default): " + ", ".join(f"{n} ({a.default_str()})" for n, a in users))
    else:
        parts.append("presets: " + ", ".join(n for n, _ in users))
    return "; ".join(parts).replace("%", "%%")


def add_preset_args(p: argparse.ArgumentParser, *, preset: str | None = "", with_preset: bool = True) -> None:
    """``--preset``, ``--workers``, one flag per declared preset setting, ``--seed``.

    Flags, types and help come from the preset declarations (:mod:`coopsgd.algorithms.registry`).
    Settings that need the data (``--local-epochs``) are left out: they only make sense for ``run``.
    """
    if with_preset:
        names = ", ".join(declarations())
        p.add_argument("--preset", default=preset, help=f"algorithm: {names} (default {preset})")
    p.add_argument("--workers", type=int, default=8, help="number of workers m (default 8)")
    for name, arg in settings_table().items():
        if arg.kind == "derived":
            continue
        if arg.type is bool:
            p.add_argument(arg.flag, dest=name, action="store_true", help=setting_help(name))
        else:
            conv = {int: int, float: float, str: str}[arg.type]
            p.add_argument(arg.flag, dest=name, type=conv, default=None, help=setting_help(name))
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def spec_from_args(args: argparse.Namespace, preset: str | None = None) -> Any:
    """Build the AlgorithmSpec from CLI flags; a flag the preset does not take is an error naming it.

    With ``preset`` (``compare``-style sharing) flags apply only where the preset takes them.
    """
    name = preset or args.preset
    table = settings_table()
    settings = {k: getattr(args, k, None) for k, a in table.items() if a.kind != "derived"}
    decl = declarations().get(name)
    if decl is not None and preset is None:
        for key, value in settings.items():
            if value is not None and value is not False and not decl.takes(key):
                raise ConfigError.invalid(table[key].flag, value, f"preset {name!r} does not take this flag")
    return spec_from_settings(name, args.workers, settings, seed=args.seed, lenient=preset is not None)
