"""The ``coopsgd`` command line: run | compare | reproduce | theory | topology.

Library code never prints; this module does. Every bad input ends as one line ``coopsgd: error: ...``
naming the flag and what is allowed, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd import __version__
from coopsgd.errors import ConfigError, CoopSGDError, Interrupted, describe_os_error

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as ConfigError (one line, exit 2) instead of printing usage noise.

    Flags must be spelled in full: an abbreviation would silently pick another flag (``--optim`` could be
    ``--optimizer`` or ``--optimizer-state``), and a new flag could change what an old command means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (tables stay tables); every option's default in its help.

    ``(default: X)`` is added unless the help already states a default; ``None`` (not given) is shown as
    ``none``, a switch's ``False`` as ``off``.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=_help_width())

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # each line is a paragraph, wrapped; indented lines (tables) are kept as written
        import textwrap

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


def _help_width() -> int:
    import shutil

    return max(80, min(shutil.get_terminal_size().columns, 120)) - 2


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


def _print_json(obj: Any) -> None:
    print(json.dumps(_clean(obj), indent=2, default=_json_default, allow_nan=False))


def _positive_int(name: str):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}={text!r} is invalid: must be an integer") from None
        return v

    return conv


def _setting_help(name: str, *, with_defaults: bool = True) -> str:
    """Help of a preset setting from the declarations: what it does, choices / range, which presets take it
    (with each one's default)."""
    from coopsgd.algorithms.registry import settings_table, takers

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


def _flag_type(arg: Any) -> Any:
    return {int: int, float: float, str: str}[arg.type]


def _add_preset_args(p: argparse.ArgumentParser, *, preset: str | None = "", with_preset: bool = True) -> None:
    """``--preset``, ``--workers``, one flag per declared preset setting, ``--seed``.

    Flags, types and help come from the preset declarations (:mod:`coopsgd.algorithms.registry`).
    Settings that need the data (``--local-epochs``) are left out: they only make sense for ``run``.
    """
    from coopsgd.algorithms.registry import declarations, settings_table

    if with_preset:
        names = ", ".join(declarations())
        p.add_argument("--preset", default=preset, help=f"algorithm: {names} (default {preset})")
    p.add_argument("--workers", type=int, default=8, help="number of workers m (default 8)")
    for name, arg in settings_table().items():
        if arg.kind == "derived":
            continue
        if arg.type is bool:
            p.add_argument(arg.flag, dest=name, action="store_true", help=_setting_help(name))
        else:
            p.add_argument(arg.flag, dest=name, type=_flag_type(arg), default=None, help=_setting_help(name))
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _spec_from_args(args: argparse.Namespace, preset: str | None = None) -> Any:
    """Build the AlgorithmSpec from CLI flags; a flag the preset does not take is an error naming it.

    With ``preset`` (``compare``-style sharing) flags apply only where the preset takes them.
    """
    from coopsgd.algorithms.registry import declarations, settings_table, spec_from_settings

    name = preset or args.preset
    table = settings_table()
    settings = {k: getattr(args, k, None) for k, a in table.items() if a.kind != "derived"}
    decl = declarations().get(name)
    if decl is not None and preset is None:
        for key, value in settings.items():
            if value is not None and value is not False and not decl.takes(key):
                raise ConfigError.invalid(table[key].flag, value, f"preset {name!r} does not take this flag")
    return spec_from_settings(name, args.workers, settings, seed=args.seed, lenient=preset is not None)


# ---------------------------------------------------------------------------------------------------------
# topology
# ---------------------------------------------------------------------------------------------------------


def _cmd_topology(args: argparse.Namespace) -> int:
    from coopsgd.topology import TIME_VARYING, load_matrix, mixing_schedule, plot_mixing_matrix

    if args.name == "custom":
        if not args.matrix:
            raise ConfigError.invalid("--matrix", None, "topology 'custom' needs --matrix FILE (.npy, .csv, .txt, .json)")
        mats = [load_matrix(args.matrix)]
    else:
        kw: dict[str, Any] = {"seed": args.seed}
        if args.p is not None:
            kw["p"] = args.p
        if args.groups is not None:
            kw["groups"] = args.groups
        if args.rows is not None:
            kw["rows"] = args.rows
        from coopsgd.topology.spectra import CLOSED_FORM_ABOVE, CLOSED_FORMS

        if args.name in CLOSED_FORMS and isinstance(args.workers, int) and args.workers > CLOSED_FORM_ABOVE:
            return _topology_closed_form(args, kw)
        mats = mixing_schedule(args.name, args.workers, args.weights, **kw)
    if args.plot:
        from coopsgd.fileio import check_output_path

        check_output_path(args.plot, "--plot")
    # the n x n entries only where they can be read (and do not take longer to print than to compute)
    info = mats[0].to_dict(matrix=mats[0].n <= MAX_PRINTED_MATRIX)
    if len(mats) > 1 or args.name in TIME_VARYING:
        product = mats[0].matrix
        for W in mats[1:]:
            product = product @ W.matrix
        from coopsgd.theory.spectral import zeta as _z

        info = {
            "name": args.name,
            "n": mats[0].n,
            "time_varying": True,
            "rounds": [W.to_dict() for W in mats],
            "zeta": max(W.zeta for W in mats),
            "zeta_of_product": _z(product),
            "spectral_gap": 1.0 - max(W.zeta for W in mats),
            "eigenvalues": mats[0].to_dict()["eigenvalues"],
            "note": "time-varying: each round's matrix is listed; the product over one cycle has zeta_of_product",
        }
    if args.plot:
        plot_mixing_matrix(mats[0], args.plot)
        info["plot"] = str(args.plot)
    if args.json:
        _print_json(info)
        return 0
    W = mats[0]
    print(f"{W.name}: n={W.n}, zeta={info['zeta']:.6f}, spectral gap={info['spectral_gap']:.6f}")
    print(f"  degrees: min {int(W.degrees.min())}, max {W.max_degree}; connected: {W.is_connected}; "
          f"symmetric: {W.is_symmetric}; doubly stochastic: {W.is_doubly_stochastic}")
    ev = np.asarray(W.eigenvalues)
    print("  eigenvalues: " + ", ".join(f"{complex(e).real:.4f}" for e in ev[:12]) + (" ..." if ev.size > 12 else ""))
    if not W.theory_applies:
        print("  theorems do not apply: " + "; ".join(W.theory_issues()))
    if len(mats) > 1:
        print(f"  time-varying: {len(mats)} matrices per cycle; zeta of their product = {info['zeta_of_product']:.3g}")
    if args.plot:
        print(f"  plot written to {args.plot}")
    return 0


#: ``coopsgd topology --json`` lists the matrix entries up to this many nodes (``"matrix": null`` above).
MAX_PRINTED_MATRIX = 64


def _topology_closed_form(args: argparse.Namespace, kw: dict[str, Any]) -> int:
    """``coopsgd topology`` for a large named graph: its spectrum in closed form, no matrix built."""
    from coopsgd.topology.builders import _normalise
    from coopsgd.topology.spectra import closed_form_summary
    from coopsgd.topology.weights import WEIGHT_RULES

    if args.plot:
        raise ConfigError.invalid("--plot", args.plot, f"draws the n x n matrix: at most "
                                  f"{_closed_form_above()} nodes (workers={args.workers})")
    weights = _normalise("weights", args.weights, list(WEIGHT_RULES))
    info = closed_form_summary(args.name, args.workers, weights, rows=kw.get("rows"), groups=kw.get("groups", 2))
    info["note"] = ("spectrum in closed form (coopsgd.topology.spectra); the matrix is not built above "
                    f"{_closed_form_above()} nodes")
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['name']}: n={info['n']}, zeta={info['zeta']:.10f}, spectral gap={info['spectral_gap']:.6g}")
    print(f"  degrees: min {info['degree_min']}, max {info['degree_max']}; connected: {info['connected']}; "
          "symmetric: True; doubly stochastic: True")
    print("  eigenvalues: " + ", ".join(f"{e:.10f}" for e in info["eigenvalues"])
          + f" ... {info['smallest_eigenvalue']:.10f}")
    if not info["theory_applies"]:
        print(f"  theorems do not apply: zeta = {info['zeta']:.6g}")
    print(f"  ({info['note']})")
    return 0


def _closed_form_above() -> int:
    from coopsgd.topology.spectra import CLOSED_FORM_ABOVE

    return CLOSED_FORM_ABOVE


# ---------------------------------------------------------------------------------------------------------
# theory
# ---------------------------------------------------------------------------------------------------------


def _parse_circles(items: Sequence[str]) -> list[tuple[float, float]]:
    out = []
    for it in items:
        try:
            t, z = it.split(":")
            out.append((float(t), float(z)))
        except ValueError:
            raise ConfigError.invalid("--circle", it, "use TAU:ZETA, e.g. --circle 4:0.5") from None
    return out


#: Keys of :func:`coopsgd.analysis.analyze` that every spec has (the rest come from theory hooks).
_THEORY_BASE_KEYS = frozenset({
    "preset", "workers", "auxiliaries", "tau", "params", "zeta", "spectral_gap", "eigenvalues", "theory_applies",
    "communication_per_round", "bounds", "notes", "warnings",
})


def _cmd_theory(args: argparse.Namespace) -> int:
    if args.what == "heatmap":
        from coopsgd.theory.heatmap import plot_network_error_heatmap

        if not args.out:
            raise ConfigError.invalid("--out", None, "coopsgd theory heatmap needs --out FILE (.png, .svg or .pdf)")
        from coopsgd.fileio import check_output_path

        check_output_path(args.out, "--out")
        taus = range(1, _flag_int("--max-tau", args.max_tau, 1, MAX_HEATMAP_TAU) + 1)
        path = plot_network_error_heatmap(args.out, taus=taus, circled=_parse_circles(args.circle))
        if args.json:
            _print_json({"plot": str(path)})
        else:
            print(f"network-error heatmap written to {path}")
        return 0
    if args.preset is None:
        raise ConfigError.invalid("--preset", None, "coopsgd theory needs --preset (or the 'heatmap' form)")
    from coopsgd.analysis import analyze
    from coopsgd.theory.bounds import ProblemConstants

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = _spec_from_args(args)
    const_flags = {"L": args.L, "sigma2": args.sigma2, "lr": args.lr, "steps": args.steps, "f_gap": args.f_gap}
    constants = None
    if any(v is not None for v in const_flags.values()):
        missing = [k for k, v in const_flags.items() if v is None]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ConfigError.invalid(flags, None, "the bounds need all of --L, --sigma2, --lr, --steps, --f-gap")
        constants = ProblemConstants(
            L=args.L, sigma2=args.sigma2, f_gap=args.f_gap, lr=args.lr, steps=args.steps, kappa2=args.kappa2 or 0.0
        )
    out = analyze(spec, constants, params=args.params)
    out["warnings"] = [str(w.message) for w in caught]
    if args.json:
        _print_json(out)
        return 0
    print(f"{spec.name}: m={spec.workers}, v={spec.auxiliaries}, tau={spec.tau}")
    if out["zeta"] is not None:
        print(f"  zeta = {out['zeta']:.6f}   spectral gap = {out['spectral_gap']:.6f}")
    # the entries the preset's theory hooks added, the familiar ones first
    first = ("alpha", "best_alpha", "alpha_limit", "zeta_at_alpha", "zeta_at_best_alpha", "zeta_W", "zeta_tau",
             "dpsgd_beats_psasgd_with_tau")
    for key in (*first, *(k for k in out if k not in first and k not in _THEORY_BASE_KEYS)):
        val = out.get(key)
        if val is None:
            continue
        if isinstance(val, float):
            print(f"  {key} = {val:.6g}")
        elif isinstance(val, list):
            print(f"  {key} = [" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in val) + "]")
        elif not isinstance(val, dict):
            print(f"  {key} = {val}")
    c = out["communication_per_round"]
    print(f"  per round ({c['model_params']:,} params): {c['pattern']}, {c['handshakes']} handshakes, "
          f"{c['bytes'] / 1e6:.3g} MB")
    for _name, rep in out.get("bounds", {}).items():
        if isinstance(rep, dict) and "terms" in rep:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in rep["terms"].items())
            ok = "holds" if rep["condition_holds"] else "VIOLATED"
            print(f"  {rep['name']}: bound {rep['total']:.4g} ({terms}); condition {rep['condition']} {ok}")
        elif isinstance(rep, str):
            print(f"  {rep}")
    for note in out["notes"] + out["warnings"]:
        print(f"  note: {note}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# reproduce
# ---------------------------------------------------------------------------------------------------------


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from coopsgd.experiments.report import REPORT_ORDER, render_report

    name = "matrix-completion" if args.name == "lsgd-matrix-completion" else args.name
    if args.dir is not None and name != "report":
        raise ConfigError.invalid("DIR", args.dir, f"only `reproduce report DIR` takes a directory; use --out with {name}")
    _check_dry_run_flags(name, args)
    if args.device != "cpu":
        from coopsgd.experiments.registry import DRY_RUNS
        from coopsgd.train.config import check_device

        if name not in (*DRY_RUNS, "all"):
            raise ConfigError.invalid("--device", args.device, f"{name} computes with numpy on the CPU; --device "
                                      f"applies to {', '.join(DRY_RUNS)} or all")
        try:
            check_device(args.device, engine=args.engine or "simulate")
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("device=", "--device=", 1), field="--device", value=args.device) from None
    if name == "report":
        target = args.dir if args.dir is not None else args.out
        if target is None:
            raise ConfigError.invalid("DIR", None, "give the directory of a `reproduce all` run: reproduce report DIR")
        path = render_report(target)
        print(f"report: {path}")
        return 0
    if args.out is not None:
        from coopsgd.fileio import check_output_path

        check_output_path(args.out, "--out", directory=True)
    default_dir = f"{name}-dry-run" if args.dry_run else name
    out_dir = Path(Path("runs") / default_dir if args.out is None else args.out)
    args.seed = _flag_int("--seed", args.seed, 0)
    if args.seeds is not None:
        args.seeds = _flag_int("--seeds", args.seeds, 1, 100)
    if name != "matrix-completion":
        for flag in ("ranks", "trials", "steps", "d"):
            if getattr(args, flag) is not None:
                raise ConfigError.invalid("--" + flag, getattr(args, flag), f"a matrix-completion flag; {name} does "
                                          "not take it")
    if name == "all":
        from coopsgd.experiments.registry import DRY_RUNS

        summaries = []
        if args.dry_run:
            print(f"dry run of the full-scale experiments ({', '.join(DRY_RUNS)}); "
                  f"{', '.join(e for e in REPORT_ORDER if e not in DRY_RUNS)} have no full scale on real data and "
                  "are not run", flush=True)
        for exp in (DRY_RUNS if args.dry_run else REPORT_ORDER):
            data = _reproduce_one(exp, args, out_dir / exp)
            _write_json(out_dir / exp / "result.json", data)
            summaries += data.get("summary", [])
            print("\n".join(data.get("summary", [])), flush=True)
        path = render_report(out_dir)
        print(f"report: {path}")
        return 0
    data = _reproduce_one(name, args, out_dir)
    _write_json(out_dir / "result.json", data)
    if args.json:
        _print_json(data)
    else:
        for line in data.get("summary", []):
            print(line)
        if data.get("plots"):
            print(f"plots: {', '.join(str(p) for p in data['plots'])}")
    return 0


def _reproduce_one(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run experiment ``name`` as ``reproduce`` was asked to (seeds, scale, engine) into ``out_dir``."""
    from coopsgd.experiments import (
        MC_QUICK,
        MC_SETTINGS,
        parse_ranks,
        plot_matrix_completion,
        public,
        run_matrix_completion,
    )
    from coopsgd.experiments.registry import EXPERIMENTS

    if name == "matrix-completion":
        if args.seeds is not None and args.name != "all":
            raise ConfigError.invalid("--seeds", args.seeds, "matrix-completion repeats over --trials (each trial "
                                      "is its own seed)")
        base = MC_QUICK if args.quick else MC_SETTINGS
        ranks = parse_ranks(args.ranks) if args.ranks is not None else base["ranks"]
        d = base["d"] if args.d is None else _flag_int("--d", args.d, 2)
        if d * max(ranks) > MC_MAX_PARAMS:
            raise ConfigError.invalid("--d", d, f"d x rank = {d} x {max(ranks)} parameters per model must be <= "
                                      f"{MC_MAX_PARAMS:,} (every worker and the centre hold one)")
        import time

        from coopsgd.experiments.matrix_completion import mc_assessment

        t0 = time.perf_counter()
        # a given 0 is refused (never "the default"): only an absent flag takes the setting's default
        res = run_matrix_completion(
            d=d, ranks=ranks,
            trials=base["trials"] if args.trials is None else _flag_int("--trials", args.trials, 1),
            steps=base["steps"] if args.steps is None else _flag_int("--steps", args.steps, 1),
            seed=args.seed, progress=_progress(args),
        )
        plot = plot_matrix_completion(res, out_dir / "matrix_completion.png")
        data = public(res)
        data.update(mc_assessment(data))
        data.update({"experiment": "matrix-completion", "quick": args.quick, "seeds": list(range(data["settings"]["trials"])),
                     "description": "[LSGD] matrix completion: EASGD's centre vs LSGD's leader over ranks",
                     "scale": f"d={d}, ranks {ranks}, {data['settings']['trials']} trials, "
                              f"{data['settings']['steps']} steps, p=8, lr 5e-4, lambda 1/5",
                     "runtime_s": round(time.perf_counter() - t0, 1)})
        data["plots"] = [str(plot)]
        data["summary"] = [
            f"matrix completion, d={data['settings']['d']}, {data['settings']['trials']} trials, "
            f"{data['settings']['steps']} steps; final centre objective (mean +- std):"
        ] + [
            f"  r={r:<4d} EASGD {data['easgd'][str(r)]['mean']:.4g} +- {data['easgd'][str(r)]['std']:.2g}   "
            f"LSGD {data['lsgd'][str(r)]['mean']:.4g} +- {data['lsgd'][str(r)]['std']:.2g}"
            for r in data["settings"]["ranks"]
        ] + [f"  [{c['verdict']}] {c['paper']}" for c in data["claims"]]
        return data
    if name not in EXPERIMENTS:
        raise ConfigError.invalid("NAME", args.name, f"choose one of {', '.join(_experiment_names())}")
    from coopsgd.experiments.harness import OVERWRITE
    from coopsgd.experiments.multiseed import DEFAULT_QUICK_SEEDS, run_seeds

    entry = EXPERIMENTS[name]
    engine = args.engine or entry.engines[0]
    if engine not in entry.engines:
        raise ConfigError.invalid("--engine", engine, f"{name} runs on {', '.join(entry.engines)}")
    n = args.seeds if args.seeds is not None else (DEFAULT_QUICK_SEEDS if args.quick else 1)
    dry = {"dry_run": True, "all_settings": bool(args.all_settings)} if args.dry_run else {}
    from coopsgd.experiments.harness import DEVICE

    token, device = OVERWRITE.set(bool(args.overwrite)), DEVICE.set(args.device)
    try:
        return run_seeds(name, quick=args.quick, engine=engine, out=out_dir,
                         seeds=[args.seed + k for k in range(n)], progress=_progress(args), **dry)
    finally:
        OVERWRITE.reset(token)
        DEVICE.reset(device)


def _check_dry_run_flags(name: str, args: argparse.Namespace) -> None:
    """``--dry-run`` / ``--all-settings``: refuse the combinations that make no sense (one line, exit 2)."""
    if args.all_settings and not args.dry_run:
        raise ConfigError.invalid("--all-settings", True, "only a --dry-run takes it (every setting of each sweep)")
    if not args.dry_run:
        return
    from coopsgd.experiments.registry import DRY_RUNS

    if name == "report":
        raise ConfigError.invalid("--dry-run", True, "`reproduce report DIR` renders a report and runs nothing")
    if name not in (*DRY_RUNS, "all"):
        raise ConfigError.invalid("--dry-run", True, f"{name} has no full scale on real data to smoke-test; "
                                  f"--dry-run takes {', '.join(DRY_RUNS)} or all")
    if args.quick:
        raise ConfigError.invalid("--quick", True, "cannot be combined with --dry-run (a dry run smoke-tests the "
                                  "full scale: two steps on synthetic data of the real shapes)")
    if args.seeds is not None:
        raise ConfigError.invalid("--seeds", args.seeds, "a --dry-run runs one seed (choose it with --seed)")


#: Largest tau of ``theory heatmap`` (one column per tau).
MAX_HEATMAP_TAU = 1000
#: Largest matrix-completion model, d x rank parameters (80 MB of float64; each worker and the centre hold one).
MC_MAX_PARAMS = 10**7


def _flag_int(flag: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    from coopsgd.errors import INT64_MAX, check_int

    try:
        return check_int(flag, value, minimum=minimum, maximum=INT64_MAX if maximum is None else maximum)
    except ConfigError as exc:
        raise ConfigError(str(exc), field=flag, value=value) from None


def _experiment_names() -> list[str]:
    # a static table (checked against the experiments' registry by a test): listing the names must not
    # import the experiments (torch, matplotlib)
    from coopsgd.catalog import reproduction_names

    return reproduction_names()


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename) so a crash never leaves a half-written file."""
    from coopsgd.fileio import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(_clean(data), indent=2, default=_json_default, allow_nan=False).encode())


# ---------------------------------------------------------------------------------------------------------
# run / compare / plot
# ---------------------------------------------------------------------------------------------------------

_RUN_HELP = {
    "engine": "reference (analytic objectives, exact, numpy) | simulate (m workers of a torch model in one process) "
              "| distributed (one process per worker, torch.distributed)",
    "workers": "number of workers m",
    "downpour_order": "DOWNPOUR push order: clock (order of arrival: on the simulated clock, or at a real "
                      "asynchronous server with --engine distributed) | schedule (seeded, deterministic) | async "
                      "(distributed only)",
    "nan_policy": "on NaN/Inf: stop | skip (drop the round, keep the last good state)",
    "max_skips": "consecutive skipped rounds before stopping", "checkpoint_every": "steps between checkpoints",
    "buffers": "buffer policy (BatchNorm statistics): mixed like parameters, or kept per worker",
    "optimizer_state": "what a round does to every worker's optimizer state (momentum, Adam's moments): keep it, "
                       "reset it (with the step counts) or mix it like the parameters (step counts stay local)", "model": "simulate / distributed: model",
    "dataset": "simulate / distributed: data set (mnist_bundled ships with the package; mnist, cifar10 need "
               "torchvision and --download)",
    "data_root": "directory of downloaded data", "augment": "random crop + horizontal flip on training batches",
    "download": "allow torchvision downloads",
    "partition": "how the training set is split over the workers", "dirichlet_beta": "Dirichlet concentration (label skew)",
    "shards_per_worker": "class shards per worker", "objective": "reference engine: analytic objective",
    "lr": "learning rate", "momentum": "SGD momentum", "nesterov": "Nesterov momentum",
    "optimizer": "every worker's inner optimizer, with torch.optim's semantics and defaults (another torch.optim "
                 "class through the Python API); choices: sgd, adam, adamw",
    "beta1": "adam / adamw: beta1 (the first moment's decay)", "beta2": "adam / adamw: beta2 (the second moment's "
                                                                       "decay)",
    "eps": "adam / adamw: eps added to the denominator", "amsgrad": "adam / adamw: AMSGrad",
    "weight_decay": "the optimizer's weight decay (adamw: decoupled)", "batch_size": "batch size per worker", "epochs": "simulate / distributed: epochs",
    "max_steps": "number of steps (overrides --epochs)", "lr_decay_epochs": "decay the lr at these epochs, e.g. 100,150",
    "lr_decay_times_s": "decay the lr at these simulated times (s)", "lr_decay_factor": "lr decay factor",
    "lr_warmup_steps": "linear lr warm-up steps", "loss_estimate": "LSGD's leader election: loss estimate",
    "dtype": "floating-point type of the models", "executor": "simulator: local steps in a loop over the workers or "
                                                               "vectorised (vmap); auto times both once per workload and "
                                                               "machine and caches the choice ($COOPSGD_CACHE_DIR)",
    "device": "where the models live and train: cpu | cuda (distributed: each local rank on its own GPU, "
              "cuda:LOCAL_RANK) | cuda:N | mps; the reference engine is numpy (cpu only)",
    "seed": "random seed",
    "eval_every": "steps between evaluations", "eval_samples": "training / test samples used per evaluation",
    "holdout_fraction": "share of the training set held out before the workers' partition (seeded, never "
                        "trained on); every evaluation records the centre model's holdout_loss on it, for tuning",
    "compute": "simulated compute time per step: flops (counted FLOPs / --compute-gflops; deterministic, the "
               "default), measured (follows the machine's load), or drawn from a distribution",
    "compute_ms": "mean compute time per step for a modelled compute time (ms); also the constant fallback of "
                  "flops for a model that cannot be FLOP-counted",
    "compute_gflops": "throughput of one worker for --compute flops (GFLOP/s; the default is one CPU core)",
    "compute_spread": "spread of the compute-time distribution (stragglers)",
    "net_latency_ms": "network latency per handshake (ms)", "net_bandwidth_mbps": "network bandwidth (Mbit/s)",
    "timeout_s": "distributed: communication timeout; a dead or hung rank stops the run within it",
    "emulate_network": "distributed: delay every message by --net-latency-ms and --net-bandwidth-mbps",
    "out": "run directory",
    "tensorboard": "write TensorBoard scalars of the metrics to OUT/tensorboard/ (needs coopsgd[tensorboard])",
}

#: Defaults that are computed or mean "none", in words.
_RUN_DEFAULT_TEXT = {
    "max_steps": "from --epochs; the reference engine: 300",
    "eval_every": "the smaller of one epoch and a tenth of the run; the reference engine: every steps/200",
    "checkpoint_every": "once, at the end of a run with a run directory",
    "data_root": "$COOPSGD_DATA, else ~/.cache/coopsgd",
    "lr_decay_epochs": "none", "lr_decay_times_s": "none",
    "out": "a new runs/PRESET-YYYYmmdd-HHMMSS", "tensorboard": "on when the tensorboard package is installed",
    "optimizer": "the preset's own (diloco: adamw), else sgd",
    "weight_decay": "torch's: 0 (sgd, adam), 0.01 (adamw)",
}


def _run_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the RunConfig fields that take a name (a test checks them against RunConfig)."""
    from coopsgd.catalog import DATASETS, MODELS
    from coopsgd.objectives import OBJECTIVES
    from coopsgd.train.config import COMPUTE_MODELS, DTYPES, ENGINES, EXECUTORS, LOSS_ESTIMATES, PARTITIONS

    return {
        "engine": ENGINES, "model": MODELS, "dataset": DATASETS, "partition": PARTITIONS,
        "objective": tuple(OBJECTIVES), "loss_estimate": LOSS_ESTIMATES, "dtype": DTYPES, "executor": EXECUTORS,
        "compute": COMPUTE_MODELS, "nan_policy": ("stop", "skip"), "buffers": ("mix", "local"),
        "optimizer_state": ("local", "reset", "mix"), "downpour_order": ("clock", "schedule", "async"),
        "device": ("cpu", "cuda", "cuda:N", "mps"),
    }


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _presets_epilog() -> str:
    """The presets, one line each, from their declarations."""
    from coopsgd.algorithms.registry import declarations

    decls = declarations()
    width = max(len(n) for n in decls) + 2
    lines = [f"  {n:{width}s}{d.summary}" for n, d in decls.items()]
    return "presets:\n" + "\n".join(lines).replace("%", "%%")


def _add_config_flags(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = (),
                      defaults: dict[str, Any] | None = None, other: str = "",
                      default_text: dict[str, str] | None = None) -> None:
    """One flag per RunConfig field (``--batch-size`` for ``batch_size``); only given flags are kept.

    The preset settings' flags are RunConfig fields too (see :data:`coopsgd.train.config.PRESET_SETTING`);
    their help (with each preset's default) comes from the preset declarations. Every other flag's help
    says its choices and its default: RunConfig's, or ``defaults`` (a command's own, e.g. ``compare``'s;
    ``other`` names the command whose default is RunConfig's, shown next to it), or ``default_text``.
    """
    import dataclasses

    from coopsgd.train.config import RunConfig

    choices = _run_choices()
    own = defaults or {}
    words = {**_RUN_DEFAULT_TEXT, **(default_text or {})}
    for f in dataclasses.fields(RunConfig):
        if f.name in skip or f.name in ("objective_args", "model_args"):
            continue
        flag = "--" + f.name.replace("_", "-")
        t = str(f.type)
        if f.metadata.get("preset"):
            # a preset setting's help (choices, range, each preset's default) comes from the declarations
            help_ = _setting_help(f.name)
        else:
            if f.name == "preset":
                from coopsgd.algorithms.registry import declarations

                help_ = f"algorithm, one of the presets (described below): {', '.join(declarations())}"
            else:
                help_ = _RUN_HELP.get(f.name, f.name.replace("_", " "))
            if f.name in choices:
                help_ += "; choices: " + ", ".join(choices[f.name])
            if f.name in own:
                base = f.default if f.default is not dataclasses.MISSING else None
                help_ += f" (default: {_default_text(own[f.name])}; {other}: {_default_text(base)})"
            elif f.name in words:
                help_ += f" (default: {words[f.name]})"
            elif f.default is not dataclasses.MISSING:
                help_ += f" (default: {_default_text(f.default)})"
            elif f.default_factory is not dataclasses.MISSING:
                help_ += f" (default: {_default_text(f.default_factory())})"
            help_ = help_.replace("%", "%%")
        if t == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_)
            continue
        if t == "bool | None":  # on, off or unset (auto): --NAME / --no-NAME
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
            continue
        conv: Any = str
        if t.startswith("int"):
            conv = int
        elif t.startswith("float"):
            conv = float
        p.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, help=help_)
    p.add_argument("--steps", dest="max_steps", type=int, default=argparse.SUPPRESS, help="alias of --max-steps (same default)")
    for name, conv in (("sigma", float), ("heterogeneity", float), ("dim", int), ("rank", int)):
        p.add_argument(f"--{name}", dest=f"obj_{name}", type=conv, default=argparse.SUPPRESS,
                       help=f"reference engine: objective argument {name} (default: the objective's own)")
    p.add_argument("--config", default=None, help="TOML / YAML / JSON config file; flags override it "
                                                  "(default: none, flags and defaults only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _config_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    import dataclasses

    from coopsgd.train.config import RunConfig, load_config

    data: dict[str, Any] = load_config(args.config) if args.config else {}
    file_keys = set(map(str, data))
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for k, v in vars(args).items():
        if k in names and k != "objective_args":
            data[k] = v
        elif k.startswith("obj_"):
            data.setdefault("objective_args", {})[k[4:]] = v
    data.update(overrides)
    if data.get("objective") == "sinc" and isinstance(data.get("objective_args"), dict):
        data["objective_args"] = {k: v for k, v in data["objective_args"].items() if k == "sigma"}
    try:
        return RunConfig.from_dict(data, source=f"config {args.config!r}" if args.config else "config")
    except ConfigError as exc:  # a bad value from the config file: name the file too
        if not args.config or str(args.config) in str(exc) or exc.field is None:
            raise
        from_file = {k.replace("-", "_") for k in file_keys}
        if exc.field.replace("-", "_") not in from_file or exc.field in vars(args):
            raise
        raise ConfigError(f"config {args.config!r}: {exc}", field=exc.field, value=exc.value) from None


def _progress(args: argparse.Namespace) -> bool:
    """Show progress on stderr unless the output is JSON (an explicit ``--progress``/``--no-progress`` wins):
    a bar on a terminal, a plain line every ~10 s or 10% elsewhere (:mod:`coopsgd.train.progress`)."""
    explicit = getattr(args, "progress", None)
    if isinstance(explicit, bool):
        return explicit
    return not getattr(args, "json", False)


def _print_summary(summary: dict[str, Any]) -> None:
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


def _cmd_run(args: argparse.Namespace) -> int:
    from coopsgd.train.trainer import run

    overwrite = bool(getattr(args, "overwrite", False))
    if args.resume:
        rdir = Path(args.resume)
        if overwrite:
            raise ConfigError.invalid("--overwrite", True, "cannot be combined with --resume (a resumed run "
                                                            "continues its own run directory)")
        if not (rdir / "config.json").is_file():
            raise ConfigError.invalid("--resume", args.resume, "must be a run directory with config.json and checkpoint.pt")
        from coopsgd.train.rundir import read_run_json

        cfg_file = rdir / "config.json"
        base = read_run_json(cfg_file, "config")  # empty, truncated, not UTF-8, not an object: one line
        for key in ("engine", "preset"):
            if key not in base:
                raise ConfigError(f"{cfg_file}: key {key!r} is missing (a damaged config.json); the run cannot be "
                                  "resumed from it", field=key)
        if args.config:
            raise ConfigError.invalid("--config", args.config, "cannot be combined with --resume (the run's config is used)")
        import dataclasses

        from coopsgd.train.config import RunConfig
        from coopsgd.train.rundir import RESUME_FIELDS

        names = {f.name for f in dataclasses.fields(RunConfig)}
        given = {k: v for k, v in vars(args).items() if k in names}
        allowed = set(RESUME_FIELDS)
        for k in given:
            if k not in allowed:
                raise ConfigError.invalid("--" + k.replace("_", "-"), given[k],
                                          f"cannot change when resuming; only {', '.join(sorted(allowed))}")
        base.update(given)
        base["out"] = str(rdir)
        try:
            config = RunConfig.from_dict(base, source=str(cfg_file))
        except ConfigError as exc:  # a wrong-typed or out-of-range value in the run's config.json
            if exc.field in given or str(cfg_file) in str(exc):
                raise
            raise ConfigError(f"{cfg_file}: {exc}", field=exc.field, value=exc.value) from None
        summary = run(config, progress=_progress(args), resume=rdir)
    else:
        import dataclasses

        config = _config_from_args(args)
        fresh = None
        if config.out is None:  # a new directory of its own: runs/<preset>-<time>[-N]
            from coopsgd.train.rundir import fresh_run_dir

            fresh = fresh_run_dir(config.preset)
            config = dataclasses.replace(config, out=str(fresh))
            if not args.json:
                print(f"coopsgd: writing the run to {fresh}", file=sys.stderr, flush=True)
        try:
            summary = run(config, progress=_progress(args), overwrite=overwrite)
        except BaseException:
            if fresh is not None and fresh.is_dir() and not any(fresh.iterdir()):
                fresh.rmdir()  # refused before anything was written: leave no empty directory behind
            raise
    if args.json:
        _print_json(summary)
    else:
        _print_summary(summary)
    return 0


#: Defaults of ``coopsgd compare`` where they differ from a single run's (RunConfig's).
COMPARE_DEFAULTS: dict[str, Any] = {"model": "lenet", "epochs": 15.0}
#: ``coopsgd compare``'s preset list without ``--presets`` or ``--set``.
COMPARE_PRESETS = "sync,local_sgd,easgd,dpsgd,lsgd"


class CompareSet:
    """A named comparison for ``coopsgd compare --set NAME``: its runs and the settings they share.

    ``runs``: ``(label, preset, settings)``; the label names the run's directory and its line in the table and
    figure, ``settings`` are RunConfig fields of that run alone (e.g. its tau). ``defaults``: RunConfig fields
    of every run, in place of :data:`COMPARE_DEFAULTS`. A flag or config-file key the user gives overrides
    both (a per-run setting only in the runs whose preset takes it). A default that conflicts with a given
    key is dropped (``FOLLOWS``): ``--epochs`` drops the set's ``max_steps``, ``--model`` its ``model_args``.
    """

    #: A set default that is dropped when the user gives one of these keys.
    FOLLOWS: dict[str, tuple[str, ...]] = {"max_steps": ("epochs",), "model_args": ("model",)}

    def __init__(self, name: str, summary: str, runs: tuple[tuple[str, str, dict[str, Any]], ...],
                 defaults: dict[str, Any]) -> None:
        self.name, self.summary, self.runs, self.defaults = name, summary, runs, defaults

    def epilog_line(self) -> str:
        runs = "; ".join(label + (f" ({', '.join(f'{k} {_default_text(v)}' for k, v in s.items())})" if s else "")
                         for label, _, s in self.runs)
        return f"  {self.name}: {self.summary}: {runs}"


#: The named comparisons of ``coopsgd compare --set`` (docs/optimizers.md shows ``modern``'s result).
COMPARE_SETS: dict[str, CompareSet] = {
    "modern": CompareSet(
        "modern",
        "AdamW inside every worker (lr 0.003, betas 0.9/0.999, weight decay 0.01) on a small WikiText-2 LSTM "
        "(1 layer, 32 units, 4 workers, batch 8, 200 steps) over a slow network (50 ms, 100 Mbit/s)",
        runs=(
            ("sync", "sync", {}),
            ("local_sgd", "local_sgd", {"tau": 20}),
            # the diloco preset's tau default is the paper's H = 500: set so that a short run has rounds
            ("diloco", "diloco", {"tau": 20, "outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.9}),
            ("slowmo", "slowmo", {"tau": 20, "base_algorithm": "local_sgd", "outer_lr": 1.0, "outer_momentum": 0.5}),
        ),
        defaults={
            "model": "lstm_lm", "dataset": "wikitext2",
            "model_args": {"emb_size": 32, "hidden_size": 32, "num_layers": 1},
            "workers": 4, "batch_size": 8, "max_steps": 200, "eval_every": 20, "eval_samples": 100,
            "optimizer": "adamw", "lr": 0.003, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01,
            "net_latency_ms": 50.0, "net_bandwidth_mbps": 100.0,
        },
    ),
}


def _compare_plan(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Any]]]:
    """The shared config and one ``(label, config)`` per run of ``coopsgd compare`` (no ``out`` yet); nothing
    is written. Shared flags apply to a run where its preset takes them."""
    import dataclasses

    from coopsgd.algorithms.presets import PRESETS
    from coopsgd.algorithms.registry import declaration
    from coopsgd.train.config import load_config

    set_name = getattr(args, "set", None)
    if set_name is not None:
        if set_name not in COMPARE_SETS:
            raise ConfigError.invalid("--set", set_name, f"choose from {', '.join(COMPARE_SETS)}")
        if args.presets is not None:
            raise ConfigError.invalid("--presets", args.presets, "cannot be combined with --set (the set names "
                                                                 "its presets)")
        chosen = COMPARE_SETS[set_name]
        runs = [(label, preset, dict(s)) for label, preset, s in chosen.runs]
        own_defaults = chosen.defaults
    else:
        text = COMPARE_PRESETS if args.presets is None else args.presets
        names = [p.strip() for p in text.split(",") if p.strip()]
        if not names:
            raise ConfigError.invalid("--presets", args.presets, "give at least one preset")
        for n in names:
            if n not in PRESETS:
                raise ConfigError.invalid("--presets", n, f"choose from {', '.join(PRESETS)}")
        runs = [(n, n, {}) for n in names]
        own_defaults = COMPARE_DEFAULTS
    # the command's (or the set's) defaults; flags and config-file keys override them
    file_keys = {str(k).replace("-", "_") for k in load_config(args.config)} if args.config else set()
    given = (set(vars(args)) | file_keys) - {"presets", "set"}
    defaults = {k: v for k, v in own_defaults.items()
                if k not in given and not given.intersection(CompareSet.FOLLOWS.get(k, ()))}
    base = _config_from_args(args, preset=runs[0][1], **defaults)
    plan: list[tuple[str, Any]] = []
    for label, preset, settings in runs:
        cfg = dataclasses.replace(base, preset=preset)
        # shared flags apply where the preset takes them: clear the settings it does not take
        decl = declaration(preset)
        cleared = {f.name: f.default for f in dataclasses.fields(cfg)
                   if f.metadata.get("preset") and not decl.takes(f.name) and getattr(cfg, f.name) != f.default}
        own = {k: v for k, v in settings.items() if k not in given}
        if cleared or own:
            cfg = dataclasses.replace(cfg, **{**cleared, **own})
        plan.append((label, cfg))
    return base, plan


def _cmd_compare(args: argparse.Namespace) -> int:
    import dataclasses

    from coopsgd.plots import plot_runs
    from coopsgd.train.trainer import run

    base, plan = _compare_plan(args)
    names = [label for label, _ in plan]
    from coopsgd.train.rundir import fresh_run_dir, prepare_compare_dir

    # a directory of its own (runs/compare-<time>[-N]), or --out: refused when it holds another comparison
    # unless --overwrite; the old comparison's files are removed before the first run
    out = Path(base.out) if base.out else fresh_run_dir("compare")
    prepare_compare_dir(out, base.to_dict(), names, overwrite=bool(getattr(args, "overwrite", False)))
    if not args.json and not base.out:
        print(f"coopsgd: writing the comparison to {out}", file=sys.stderr, flush=True)
    meta: dict[str, Any] = {"config": base.to_dict(), "presets": names}
    if getattr(args, "set", None) is not None:  # the set's runs differ in more than their preset: keep each config
        meta["set"] = args.set
        meta["runs"] = {label: cfg.to_dict() for label, cfg in plan}
    _write_json(out / "compare.json", {**meta, "results": {}})
    results: dict[str, dict[str, Any]] = {}
    dirs: list[Path] = []
    for n, cfg in plan:
        cfg = dataclasses.replace(cfg, out=str(out / n))
        if not args.json:
            print(f"[{len(dirs) + 1}/{len(names)}] {n} ...", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[n] = run(cfg, progress=_progress(args))
        dirs.append(out / n)
    title = (f"{base.engine}: {base.model if base.engine == 'simulate' else base.objective}, "
             f"m={base.workers}, network {base.net_latency_ms} ms / {base.net_bandwidth_mbps} Mbit/s")
    fig = plot_runs(dirs, out / "compare.png", labels=names, title=title)
    figs = [fig]
    if "set" in meta:  # a set's cost view: the centre model's test loss against the clock and the bytes sent
        figs.append(plot_runs(dirs, out / "compare_cost.png", labels=names, title=title, against=("time", "bytes")))
    _write_json(out / "compare.json", {**meta, "results": results})
    if args.json:
        _print_json({"results": results, "plot": str(fig), "out": str(out),
                     **({"cost_plot": str(figs[1])} if len(figs) > 1 else {})})
        return 0
    metric = "test_accuracy" if any("test_accuracy" in r["final"] for r in results.values()) else (
        "test_perplexity" if any("test_perplexity" in r["final"] for r in results.values()) else None)
    head = f"{'preset':24s} {'train loss':>10s} {'test loss':>10s}"
    head += f" {metric.replace('test_', 'test ')[:10]:>10s}" if metric else ""
    head += f" {'rounds':>7s} {'MB sent':>9s} {'time s':>10s} {'comm %':>7s} {'wall s':>7s}"
    print(head)
    for n, r in results.items():
        f = r["final"]
        sim = r["time_s"]
        comm = (r.get("simulated_split_s") or r.get("measured_split_s") or {}).get("communication_s") or 0.0
        line = f"{n:24s} {f['train_loss']:10.4g} {f['test_loss']:10.4g}"
        line += f" {f.get(metric, float('nan')):10.4g}" if metric else ""
        line += (f" {r['communication_rounds']:7d} {r['bytes_sent'] / 1e6:9.3g} {sim:10.4g} "
                 f"{100 * comm / sim if sim else 0:6.1f}% {r['wall_time_s']:7.1f}")
        print(line)
    print(f"figure{'s' if len(figs) > 1 else ''}: {', '.join(map(str, figs))}   table: {out / 'compare.json'}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from coopsgd.plots import plot_runs, runs_table

    out = plot_runs(args.run_dirs, args.out, title=args.title)
    rows = runs_table(args.run_dirs)
    if args.json:
        _print_json({"plot": str(out), "runs": rows})
    else:
        for r in rows:
            acc = f" acc {r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else ""
            print(f"{r['run']:28s} train loss {r['train_loss']:.4g}{acc} rounds {r['rounds']} "
                  f"{r['time_source'] or 'simulated'} time {r['time_s']:.4g} s  ({r['path']})")
        print(f"figure: {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``coopsgd`` parser. Cheap: it imports neither torch, matplotlib nor the experiments (a test checks),
    so ``coopsgd --help`` and ``--version`` answer at once."""
    from coopsgd.algorithms.registry import declarations
    from coopsgd.catalog import MATRIX_COMPLETION, REPRODUCTION_ALIASES, REPRODUCTIONS
    from coopsgd.topology import TOPOLOGIES, WEIGHT_RULES

    fmt = _HelpFormatter
    presets = ", ".join(declarations())
    parser = _Parser(
        prog="coopsgd", formatter_class=fmt,
        description="Cooperative SGD: local-update SGD algorithms as A(tau, W, v).",
        epilog=f"presets: {presets}\n`coopsgd command --help` lists a command's flags with their defaults.")
    parser.add_argument("--version", action="version", version=f"coopsgd {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="command",
                                title="commands")
    sub.required = True

    p = sub.add_parser("topology", help="show / validate / plot a mixing matrix", formatter_class=fmt,
                       description="Show, validate or plot the mixing matrix of a topology and weight rule.")
    p.add_argument("name", help=f"topology: {', '.join(TOPOLOGIES)}, or 'custom' with --matrix FILE")
    p.add_argument("--workers", type=int, default=8, help="number of nodes")
    p.add_argument("--weights", default="metropolis", help=f"weight rule; choices: {', '.join(WEIGHT_RULES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random graph")
    p.add_argument("--p", type=float, default=None, help="edge probability of the random graph (default: 0.5)")
    p.add_argument("--groups", type=int, default=None, help="number of groups, topology 'groups' (default: 2)")
    p.add_argument("--rows", type=int, default=None, help="torus rows (default: the most square shape)")
    p.add_argument("--matrix", default=None, help="custom matrix file (.npy, .csv, .txt, .json)")
    p.add_argument("--json", action="store_true", help="print JSON (zeta, eigenvalues, spectral_gap, ...)")
    p.add_argument("--plot", default=None, help="write a figure of the graph and matrix (png/svg/pdf)")
    p.set_defaults(func=_cmd_topology)

    p = sub.add_parser("theory", help="zeta, bounds, best alpha, thresholds; 'theory heatmap' draws Fig. 3a",
                       formatter_class=fmt, epilog=_presets_epilog(),
                       description="The theory of a preset: zeta, spectral gap, the error bounds (with --L, "
                                   "--sigma2, --lr, --steps, --f-gap), best alpha and thresholds; "
                                   "'theory heatmap' draws [CSGD] Fig. 3a.")
    p.add_argument("what", nargs="?", default="bounds", choices=["bounds", "heatmap"],
                   help="bounds (of --preset) or heatmap (default: bounds)")
    _add_preset_args(p, preset=None)
    p.add_argument("--L", type=float, default=None, help="smoothness constant L")
    p.add_argument("--sigma2", type=float, default=None, help="gradient variance sigma^2")
    p.add_argument("--lr", type=float, default=None, help="learning rate eta")
    p.add_argument("--steps", type=int, default=None, help="iterations K")
    p.add_argument("--f-gap", type=float, default=None, help="F(u_1) - F_inf")
    p.add_argument("--kappa2", type=float, default=None, help="non-IID dissimilarity kappa^2 (Theorem 2; default: 0)")
    p.add_argument("--params", type=int, default=1_000_000, help="model size for the per-round cost")
    p.add_argument("--out", default=None, help="heatmap output file")
    p.add_argument("--max-tau", type=int, default=20, help="heatmap: largest tau")
    p.add_argument("--circle", action="append", default=[], help="heatmap: circle TAU:ZETA (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_theory)

    width = max(len(n) for n in REPRODUCTIONS) + 2
    listing = "\n".join(f"  {r.name:{width}s}{r.description} [{', '.join(r.engines)}]" for r in REPRODUCTIONS.values())
    aliases = ", ".join(f"{a} = {n}" for a, n in REPRODUCTION_ALIASES.items())
    p = sub.add_parser("reproduce", help="rerun a paper experiment", formatter_class=fmt,
                       description="Rerun an experiment of [CSGD] or [LSGD]; writes its figures and result.json.",
                       epilog=(f"experiments [engines, the first is the default]:\n{listing}\n"
                               f"aliases: {aliases}").replace("%", "%%"))
    p.add_argument("name", choices=[*_experiment_names(), "all", "report"], metavar="NAME",
                   help="experiment (listed below); `all`: every experiment into --out DIR, then DIR/report.md; "
                        "`report DIR`: rewrite DIR/report.md from DIR/*/result.json")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR", help="`reproduce report DIR`: the directory")
    p.add_argument("--engine", default=None, help="simulate | distributed | reference (default: the experiment's "
                                                  "first engine, listed below)")
    p.add_argument("--quick", action="store_true", help="2-core CPU scale")
    p.add_argument("--dry-run", action="store_true",
                   help="smoke-test the full scale without its data or a GPU: 2 steps per setting of the full-scale "
                        "models, workers, batch, partitions, lr schedule, checkpoint (written and reloaded), "
                        "figures and result.json, on synthetic data of the real shapes (3x32x32 images of 10 "
                        "classes; random tokens of WikiText-2's 33,278 words); the first setting of each sweep; "
                        "one line per setting; csgd-fig3..6, lsgd-nets, lsgd-lstm or all (default --out: "
                        "runs/NAME-dry-run)")
    p.add_argument("--all-settings", action="store_true", help="--dry-run: every setting of each sweep")
    p.add_argument("--device", default="cpu",
                   help="where the neural-network experiments train: cpu | cuda | cuda:N | mps (default: cpu; the "
                        "full scale needs a GPU in practice; lsgd-toy and matrix-completion run on the CPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier runs of other settings in the output directory (e.g. --quick, then full)")
    mc_full, mc_quick = MATRIX_COMPLETION["full"], MATRIX_COMPLETION["quick"]

    def mc(key: str) -> str:
        return f"(default: {_default_text(mc_full[key])}; --quick: {_default_text(mc_quick[key])})"

    p.add_argument("--ranks", default=None, help=f"matrix completion: ranks, e.g. 1,10,50,100 {mc('ranks')}")
    p.add_argument("--trials", type=int, default=None, help=f"matrix completion: trials {mc('trials')}")
    p.add_argument("--steps", type=int, default=None, help=f"matrix completion: steps per run {mc('steps')}")
    p.add_argument("--d", type=int, default=None, help=f"matrix completion: dimension d {mc('d')}")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (seed, seed+1, ...): mean, std and min-max bands over them "
                        "(default: 3 with --quick, 1 at full scale)")
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_reproduce)

    compare_defaults = ", ".join(f"{k} {_default_text(v)}" for k, v in COMPARE_DEFAULTS.items())
    p = sub.add_parser(
        "run", help="train one algorithm (flags or --config FILE)", formatter_class=fmt, epilog=_presets_epilog(),
        description="Train one algorithm on the simulator (default), the exact reference engine or one process "
                    "per worker; flags override --config FILE.\n"
                    f"Defaults: preset local_sgd, 8 workers, model mlp, 5 epochs of mnist_bundled "
                    f"(`coopsgd compare` uses {compare_defaults} instead).")
    _add_config_flags(p)
    p.add_argument("--resume", default=None, help="continue the run in this directory from its checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run of another configuration in --out (its files are removed first)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "compare", help="run several algorithms on equal footing; one figure and a table", formatter_class=fmt,
        epilog=_presets_epilog() + "\nsets (--set NAME):\n"
        + "\n".join(s.epilog_line() for s in COMPARE_SETS.values()).replace("%", "%%"),
        description="Train several presets on equal footing (same data, model, seed and simulated network); write "
                    "one run directory each, compare.png, compare.json (with --set also compare_cost.png: test "
                    "loss against the simulated clock and the bytes sent), and print a table.\n"
                    f"Defaults: the main job, {compare_defaults} (a small CNN; `coopsgd run` defaults to model "
                    "mlp, 5 epochs), 8 workers, mnist_bundled; every flag and config key overrides them.")
    p.add_argument("--presets", default=None,
                   help=f"comma-separated presets (listed below) (default: {COMPARE_PRESETS})")
    p.add_argument("--set", default=None,
                   help=f"a named comparison instead of --presets: {', '.join(COMPARE_SETS)} (listed below: its runs, "
                        "their own settings and the defaults it brings; flags override them) (default: none)")
    _add_config_flags(p, skip=("preset",), defaults=COMPARE_DEFAULTS, other="coopsgd run",
                      default_text={"out": "a new runs/compare-YYYYmmdd-HHMMSS, one run directory per preset inside"})
    p.add_argument("--overwrite", action="store_true", help="replace the comparison of another configuration in --out (its files are removed first)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("plot", help="overlay runs from their directories", formatter_class=fmt,
                       description="Overlay the metrics of run directories in one figure and print a table.")
    p.add_argument("run_dirs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default="runs/plot.png", help="figure file (png/svg/pdf)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coopsgd`` console script; returns the exit status."""
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:  # fast path: no parser at all
        print(f"coopsgd {__version__}")
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        saved = warnings.formatwarning
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.formatwarning = lambda msg, cat, *a, **k: f"coopsgd: warning: {msg}\n"
                return int(args.func(args) or 0)
        finally:
            warnings.formatwarning = saved
    except ConfigError as exc:
        msg = _one_line(exc)
        print(f"coopsgd: error: {msg}" if not msg.startswith("coopsgd") else f"{msg}", file=sys.stderr)
        return 2
    except CoopSGDError as exc:
        print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # SIGTERM / SIGINT during a distributed run: its ranks were stopped
        print(f"coopsgd: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("coopsgd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file or directory the command needs: missing, unreadable, unwritable, a full disk
        print(f"coopsgd: error: {_one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2


def _one_line(exc: object) -> str:
    """An error message on one line (a message with line breaks would read as several errors)."""
    return " ".join(str(exc).split("\n")).strip()


if __name__ == "__main__":
    sys.exit(main())
