"""The ``coopsgd`` command line: run | compare | reproduce | theory | topology | plot.

One module per sub-command (``register`` adds its parser, ``cmd_*`` runs it); :mod:`.common` holds what they
share and :mod:`.config_flags` the flags generated from the run configuration's sections. Library code never
prints; this package does. Every bad input ends as one line ``coopsgd: error: ...`` naming the flag and what
is allowed, with exit status 2. Building the parser imports neither torch, matplotlib nor the experiments (a
test checks), so ``coopsgd --help`` and ``--version`` answer at once: the commands import them when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from coopsgd import __version__
from coopsgd.algorithms.registry import declarations
from coopsgd.cli import compare, plot, reproduce, run, theory, topology
from coopsgd.cli.common import HelpFormatter, Parser, one_line
from coopsgd.cli.compare import COMPARE_DEFAULTS, COMPARE_PRESETS, COMPARE_SETS, CompareSet, _compare_plan
from coopsgd.errors import ConfigError, CoopSGDError, Interrupted, describe_os_error

__all__ = ["main", "build_parser", "COMPARE_DEFAULTS", "COMPARE_PRESETS", "COMPARE_SETS", "CompareSet",
           "_compare_plan"]

#: The sub-commands in the order ``coopsgd --help`` lists them.
COMMANDS = (topology, theory, reproduce, run, compare, plot)


def build_parser() -> argparse.ArgumentParser:
    """The ``coopsgd`` parser. Cheap: it imports neither torch, matplotlib nor the experiments (a test checks),
    so ``coopsgd --help`` and ``--version`` answer at once."""
    presets = ", ".join(declarations())
    parser = Parser(
        prog="coopsgd", formatter_class=HelpFormatter,
        description="Cooperative SGD: local-update SGD algorithms as A(tau, W, v).",
        epilog=f"presets: {presets}\n`coopsgd command --help` lists a command's flags with their defaults.")
    parser.add_argument("--version", action="version", version=f"coopsgd {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="command", title="commands")
    sub.required = True
    for command in COMMANDS:
        command.register(sub, HelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coopsgd`` console script; returns the exit status."""
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:  # fast path: no parser at all
        print(f"coopsgd {__version__}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not list(sys.argv[1:] if argv is None else argv):  # a bare `coopsgd`: the usage and the commands
        print(build_parser().format_help(), end="", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
        saved = warnings.formatwarning
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.formatwarning = lambda msg, cat, *a, **k: f"coopsgd: warning: {msg}\n"
                return int(args.func(args) or 0)
        finally:
            warnings.formatwarning = saved
    except ConfigError as exc:
        msg = one_line(exc)
        print(f"coopsgd: error: {msg}" if not msg.startswith("coopsgd") else f"{msg}", file=sys.stderr)
        return 2
    except CoopSGDError as exc:
        print(f"coopsgd: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # SIGTERM / SIGINT during a distributed run: its ranks were stopped
        print(f"coopsgd: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("coopsgd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file or directory the command needs: missing, unreadable, unwritable, a full disk
        print(f"coopsgd: error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2
