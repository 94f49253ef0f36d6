"""``coopsgd topology NAME``: show, validate or plot the mixing matrix of a topology and weight rule."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from coopsgd.cli.common import print_json
from coopsgd.errors import ConfigError
from coopsgd.topology import TOPOLOGIES, WEIGHT_RULES

__all__ = ["register"]


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd topology`` to the sub-command parsers."""
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
    p.set_defaults(func=cmd_topology)


def cmd_topology(args: argparse.Namespace) -> int:
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
        grid = None
        if args.name == "torus":  # drawn on its grid: a torus on a circle hides its rows and columns
            from coopsgd.topology.graphs import _torus_shape

            grid = _torus_shape(mats[0].n, args.rows)
        plot_mixing_matrix(mats[0], args.plot, grid=grid)
        info["plot"] = str(args.plot)
    if args.json:
        print_json(info)
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
    from coopsgd.errors import check_choice
    from coopsgd.topology.spectra import closed_form_summary
    from coopsgd.topology.weights import WEIGHT_RULES

    if args.plot:
        raise ConfigError.invalid("--plot", args.plot, f"draws the n x n matrix: at most "
                                  f"{_closed_form_above()} nodes (workers={args.workers})")
    weights = check_choice("weights", args.weights, list(WEIGHT_RULES))
    info = closed_form_summary(args.name, args.workers, weights, rows=kw.get("rows"), groups=kw.get("groups", 2))
    info["note"] = ("spectrum in closed form (coopsgd.topology.spectra); the matrix is not built above "
                    f"{_closed_form_above()} nodes")
    if args.json:
        print_json(info)
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
