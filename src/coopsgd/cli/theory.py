"""``coopsgd theory``: a preset's zeta, bounds, best alpha and thresholds; ``theory heatmap`` draws [CSGD] Fig. 3a."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

from coopsgd.algorithms.registry import declarations
from coopsgd.cli.common import add_preset_args, flag_int, presets_epilog, print_json, spec_from_args
from coopsgd.errors import ConfigError

__all__ = ["register"]

#: Largest tau of ``theory heatmap`` (one column per tau).
MAX_HEATMAP_TAU = 1000


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd theory`` to the sub-command parsers."""
    p = sub.add_parser("theory", help="zeta, bounds, best alpha, thresholds; 'theory heatmap' draws Fig. 3a",
                       formatter_class=fmt, epilog=presets_epilog(),
                       description="The theory of a preset: zeta, spectral gap, the error bounds (with --L, "
                                   "--sigma2, --lr, --steps, --f-gap), best alpha and thresholds; "
                                   "'theory heatmap' draws [CSGD] Fig. 3a.")
    p.add_argument("what", nargs="?", default="bounds", choices=["bounds", "heatmap"],
                   help="bounds (of --preset) or heatmap (default: bounds)")
    add_preset_args(p, preset=None)
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
    p.set_defaults(func=cmd_theory)


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


def cmd_theory(args: argparse.Namespace) -> int:
    if args.what == "heatmap":
        from coopsgd.theory.heatmap import plot_network_error_heatmap

        if not args.out:
            raise ConfigError.invalid("--out", None, "coopsgd theory heatmap needs --out FILE (.png, .svg or .pdf)")
        from coopsgd.fileio import check_output_path

        check_output_path(args.out, "--out")
        taus = range(1, flag_int("--max-tau", args.max_tau, 1, MAX_HEATMAP_TAU) + 1)
        path = plot_network_error_heatmap(args.out, taus=taus, circled=_parse_circles(args.circle))
        if args.json:
            print_json({"plot": str(path)})
        else:
            print(f"network-error heatmap written to {path}")
        return 0
    if args.preset is None:
        raise ConfigError("theory needs --preset NAME, e.g. `coopsgd theory --preset easgd --workers 8` "
                          f"(presets: {', '.join(declarations())}), or draw [CSGD] Fig. 3a with "
                          "`coopsgd theory heatmap --out FILE`", field="--preset")
    from coopsgd.analysis import analyze
    from coopsgd.theory.bounds import ProblemConstants

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = spec_from_args(args)
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
        print_json(out)
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
