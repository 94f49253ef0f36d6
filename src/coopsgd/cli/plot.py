"""``coopsgd plot DIR...``: overlay the metrics of run directories in one figure and print a table."""

from __future__ import annotations

import argparse
from typing import Any

from coopsgd.cli.common import print_json

__all__ = ["register", "cmd_plot"]


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd plot`` to the sub-command parsers."""
    p = sub.add_parser("plot", help="overlay runs from their directories", formatter_class=fmt,
                       description="Overlay the metrics of run directories in one figure and print a table.")
    p.add_argument("run_dirs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default="runs/plot.png", help="figure file (png/svg/pdf)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from coopsgd.plots import plot_runs, runs_table

    out = plot_runs(args.run_dirs, args.out, title=args.title)
    rows = runs_table(args.run_dirs)
    if args.json:
        print_json({"plot": str(out), "runs": rows})
    else:
        for r in rows:
            acc = f" acc {r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else ""
            print(f"{r['run']:28s} train loss {r['train_loss']:.4g}{acc} rounds {r['rounds']} "
                  f"{r['time_source'] or 'simulated'} time {r['time_s']:.4g} s  ({r['path']})")
        print(f"figure: {out}")
    return 0
