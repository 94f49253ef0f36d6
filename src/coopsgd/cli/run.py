"""``coopsgd run``: train one algorithm (flags, or ``--config FILE`` with flags over it), or continue a run
from its directory (``--resume DIR``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from coopsgd.cli.common import presets_epilog, print_json, progress_wanted, use_threads
from coopsgd.cli.compare import COMPARE_DEFAULTS
from coopsgd.cli.config_flags import add_config_flags, config_from_args, given_flags
from coopsgd.errors import ConfigError
from coopsgd.settings import default_text as shown_default
from coopsgd.train.config import RunConfig
from coopsgd.train.rundir import RESUME_FIELDS, discard_unused, fresh_run_dir, read_run_json

__all__ = ["register", "cmd_run", "print_summary", "print_notes", "resume_config"]


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd run`` to the sub-command parsers."""
    compare_defaults = ", ".join(f"{k} {shown_default(v)}" for k, v in COMPARE_DEFAULTS.items())
    p = sub.add_parser(
        "run", help="train one algorithm (flags or --config FILE)", formatter_class=fmt, epilog=presets_epilog(),
        description="Train one algorithm on the simulator (default), the exact reference engine or one process "
                    "per worker; flags override --config FILE (flat keys, or [section] tables: the flags' groups "
                    "below).\n"
                    f"Defaults: preset local_sgd, 8 workers, model mlp, 5 epochs of mnist_bundled "
                    f"(`coopsgd compare` uses {compare_defaults} instead).")
    add_config_flags(p)
    p.add_argument("--resume", default=None, help="continue the run in this directory from its checkpoint.pt "
                                                  "(default: none, a new run)")
    p.add_argument("--overwrite", action="store_true", help="replace the run of another configuration in --out (its "
                                                            "files are removed first)")
    p.set_defaults(func=cmd_run)


def print_summary(summary: dict[str, Any]) -> None:
    f = summary["final"]
    metric = ""
    if f.get("test_accuracy") is not None:
        metric = f", test accuracy {f['test_accuracy']:.4f}"
    elif f.get("test_perplexity") is not None:
        metric = f", test perplexity {f['test_perplexity']:.2f}"
    split = summary.get("simulated_split_s") or summary.get("measured_split_s") or {}
    print(f"{summary['preset']} x{summary['workers']}: train loss {f['train_loss']:.4g}, test loss "
          f"{f['test_loss']:.4g}{metric} | {summary['steps']} steps, {summary['communication_rounds']} rounds, "
          f"{summary['bytes_sent'] / 1e6:.3g} MB | "
          f"{summary.get('time_source') or 'simulated'} {summary['time_s']:.3g} s "
          f"(compute {split.get('compute_s', 0):.3g}, comm {split.get('communication_s', 0):.3g}, "
          f"idle {split.get('idle_s', 0):.3g}) | wall {summary['wall_time_s']:.1f} s"
          + (f" | {summary['out']}" if summary.get("out") else ""))


def resume_config(args: argparse.Namespace) -> RunConfig:
    """The config of ``run --resume DIR``: the run's ``config.json`` (flat keys, any version), with the few
    settings a resumed run may change (:data:`RESUME_FIELDS`) taken from the flags."""
    if not str(args.resume).strip():  # e.g. an unset shell variable: never "a new run"
        raise ConfigError.invalid("--resume", args.resume, "must be a run directory, not an empty string (leave "
                                                           "--resume out to start a new run)")
    rdir = Path(args.resume)
    if getattr(args, "overwrite", False):
        raise ConfigError.invalid("--overwrite", True, "cannot be combined with --resume (a resumed run "
                                                        "continues its own run directory)")
    if not (rdir / "config.json").is_file():
        raise ConfigError.invalid("--resume", args.resume, "must be a run directory with config.json and checkpoint.pt")
    cfg_file = rdir / "config.json"
    base = read_run_json(cfg_file, "config")  # empty, truncated, not UTF-8, not an object: one line
    for key in ("engine", "preset"):
        if key not in base:
            raise ConfigError(f"{cfg_file}: key {key!r} is missing (a damaged config.json); the run cannot be "
                              "resumed from it", field=key)
    if args.config:
        raise ConfigError.invalid("--config", args.config, "cannot be combined with --resume (the run's config is used)")
    given = given_flags(args)
    for k in given:
        if k not in RESUME_FIELDS:
            raise ConfigError.invalid("--" + k.replace("_", "-"), given[k],
                                      f"cannot change when resuming; only {', '.join(sorted(RESUME_FIELDS))}")
    if "max_steps" in given:  # the new length replaces the recorded one, whichever way it was given
        base.pop("epochs", None)
    elif "epochs" in given:
        base.pop("max_steps", None)
    base.update(given)
    base["out"] = str(rdir)
    try:
        return RunConfig.from_dict(base, source=str(cfg_file))
    except ConfigError as exc:  # a wrong-typed or out-of-range value in the run's config.json
        if exc.field in given or str(cfg_file) in str(exc):
            raise
        raise ConfigError(f"{cfg_file}: {exc}", field=exc.field, value=exc.value) from None


def print_notes(notes: tuple[str, ...], args: argparse.Namespace) -> None:
    """The choices a run made for the user (:func:`coopsgd.train.problem.settle`), on stderr with its summary (a
    run refused while it is built says only why)."""
    if not getattr(args, "json", False):
        for note in notes:
            print(f"coopsgd: note: {note}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from coopsgd.train.problem import settle  # torch: only when a run starts
    from coopsgd.train.trainer import run

    notes: tuple[str, ...] = ()
    if args.resume is not None:
        resumed = resume_config(args)
        use_threads(resumed)
        summary = run(resumed, progress=progress_wanted(args), resume=Path(args.resume))
    else:
        # the defaults that depend on the run (an adaptive optimizer's lr, a period longer than the run) are
        # written into the config, so config.json says what ran
        config, notes = settle(config_from_args(args))
        use_threads(config)
        fresh = None
        if config.output.out is None:  # a new directory of its own: runs/<preset>-<time>[-N]
            fresh = fresh_run_dir(config.algorithm.preset)
            config = config.replace(out=str(fresh))  # its path is printed with the summary
        try:
            summary = run(config, progress=progress_wanted(args), overwrite=bool(getattr(args, "overwrite", False)))
        except BaseException:
            if fresh is not None:
                discard_unused(fresh)  # refused before anything was written: leave no empty directory behind
            raise
    if args.json:
        print_json({**summary, "notes": list(notes)} if notes else summary)
    else:
        print_notes(notes, args)
        print_summary(summary)
    return 0
