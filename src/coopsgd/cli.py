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
from coopsgd.errors import ConfigError, CoopSGDError

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as ConfigError (one line, exit 2) instead of printing usage noise."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


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


def _add_preset_args(p: argparse.ArgumentParser, *, preset: str | None = "", with_preset: bool = True) -> None:
    from coopsgd.algorithms.presets import PRESETS

    if with_preset:
        p.add_argument("--preset", default=preset, help=f"algorithm: {', '.join(PRESETS)} (default {preset})")
    p.add_argument("--workers", type=int, default=8, help="number of workers m (default 8)")
    p.add_argument("--tau", type=int, default=None, help="communication period (preset default if omitted)")
    p.add_argument("--alpha", type=float, default=None, help="elasticity alpha (easgd, generalized_elastic, hierarchical)")
    p.add_argument("--beta", type=float, default=None, help="EASGD's beta = m*alpha (alternative to --alpha)")
    p.add_argument("--topology", default=None, help="worker graph for dpsgd / decentralized_periodic / generalized_elastic")
    p.add_argument("--weights", default=None, help="weight rule: uniform, metropolis, max_degree, best_constant")
    p.add_argument("--groups", type=int, default=None, help="groups (hierarchical, multi-level lsgd)")
    p.add_argument("--q", type=int, default=None, help="hierarchical: auxiliaries mix every q*tau steps")
    p.add_argument("--lam", type=float, default=None, help="LSGD pull strength lambda")
    p.add_argument("--lam-global", type=float, default=None, help="LSGD global-leader pull (default lambda)")
    p.add_argument("--fraction", type=float, default=None, help="FedAvg client fraction c in (0, 1]")
    p.add_argument("--warmup-steps", type=int, default=None, help="local_sgd: fully synchronous steps first")
    p.add_argument("--nonblocking", action="store_true", help="easgd: non-blocking (overlapped) rounds")
    p.add_argument("--strict", action="store_true", help="error (not warning) for a diverging alpha")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


_PRESET_ARG_MAP = {
    "tau": "tau", "alpha": "alpha", "beta": "beta", "topology": "topology", "weights": "weights",
    "groups": "groups", "q": "q", "lam": "lam", "lam_global": "lam_global", "fraction": "fraction",
    "warmup_steps": "warmup_steps",
}


def _spec_from_args(args: argparse.Namespace, preset: str | None = None) -> Any:
    """Build the AlgorithmSpec from CLI flags; a flag the preset does not take is an error naming it."""
    from coopsgd.algorithms.presets import PRESETS, make_preset

    name = preset or args.preset
    kwargs: dict[str, Any] = {}
    for attr, key in _PRESET_ARG_MAP.items():
        val = getattr(args, attr, None)
        if val is not None:
            kwargs[key] = val
    if getattr(args, "nonblocking", False):
        kwargs["nonblocking"] = True
    if getattr(args, "strict", False):
        kwargs["strict"] = True
    import inspect

    if name in PRESETS:
        accepted = set(inspect.signature(PRESETS[name]).parameters)
        if "seed" in accepted:
            kwargs["seed"] = args.seed
        if preset is not None:  # compare: shared flags apply only where the preset takes them
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        else:
            for key in kwargs:
                if key not in accepted:
                    flag = "--" + key.replace("_", "-")
                    raise ConfigError.invalid(flag, kwargs[key], f"preset {name!r} does not take this flag")
    return make_preset(name, args.workers, **kwargs)


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
        mats = mixing_schedule(args.name, args.workers, args.weights, **kw)
    info = mats[0].to_dict()
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


def _cmd_theory(args: argparse.Namespace) -> int:
    if args.what == "heatmap":
        from coopsgd.theory.heatmap import plot_network_error_heatmap

        if not args.out:
            raise ConfigError.invalid("--out", None, "coopsgd theory heatmap needs --out FILE (.png, .svg or .pdf)")
        taus = range(1, args.max_tau + 1)
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
    for key in ("alpha", "best_alpha", "alpha_limit", "zeta_at_alpha", "zeta_at_best_alpha", "zeta_W", "zeta_tau",
                "dpsgd_beats_psasgd_with_tau"):
        if key in out and out[key] is not None:
            print(f"  {key} = {out[key]:.6g}" if isinstance(out[key], float) else f"  {key} = {out[key]}")
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
    from coopsgd.experiments import (
        MC_QUICK,
        MC_SETTINGS,
        parse_ranks,
        plot_lsgd_toy,
        plot_matrix_completion,
        public,
        run_lsgd_toy,
        run_matrix_completion,
    )

    out_dir = Path(args.out or Path("runs") / args.name)
    if args.name == "lsgd-toy":
        res = run_lsgd_toy()
        plots = plot_lsgd_toy(res, out_dir)
        data = public(res)
        data["plots"] = [str(p) for p in plots]
        _write_json(out_dir / "result.json", data)
        if args.json:
            _print_json(data)
        else:
            for key in ("easgd", "lsgd"):
                r = data[key]
                workers = ", ".join(f"{v:.4f}" for v in r["workers"])
                print(f"{key.upper():6s} centre objective {r['final_objective']:.4f} after {r['steps']} steps; "
                      f"workers: {workers}")
            print(f"plots: {', '.join(data['plots'])}")
        return 0
    if args.name == "matrix-completion":
        base = MC_QUICK if args.quick else MC_SETTINGS
        ranks = parse_ranks(args.ranks) if args.ranks else base["ranks"]
        res = run_matrix_completion(
            d=args.d or base["d"], ranks=ranks, trials=args.trials or base["trials"],
            steps=args.steps or base["steps"], seed=args.seed, progress=not args.json and sys.stderr.isatty(),
        )
        plot = plot_matrix_completion(res, out_dir / "matrix_completion.png")
        data = public(res)
        data["plots"] = [str(plot)]
        _write_json(out_dir / "result.json", data)
        if args.json:
            _print_json(data)
        else:
            print(f"matrix completion, d={data['settings']['d']}, {data['settings']['trials']} trials, "
                  f"{data['settings']['steps']} steps; final centre objective (mean +- std):")
            for r in data["settings"]["ranks"]:
                e, l = data["easgd"][str(r)], data["lsgd"][str(r)]
                print(f"  r={r:<4d} EASGD {e['mean']:.4g} +- {e['std']:.2g}   LSGD {l['mean']:.4g} +- {l['std']:.2g}")
            print(f"plot: {plot}")
        return 0
    raise ConfigError.invalid("NAME", args.name, "choose one of lsgd-toy, matrix-completion")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename) so a crash never leaves a half-written file."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(data), f, indent=2, default=_json_default, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------
# run / compare (reference engine on analytic objectives)
# ---------------------------------------------------------------------------------------------------------


def _objective_from_args(args: argparse.Namespace) -> Any:
    from coopsgd.objectives import make_objective

    name = args.objective
    kw: dict[str, Any] = {}
    if name == "quadratic":
        kw = {"dim": args.dim or 20, "workers": args.workers, "sigma": args.sigma, "heterogeneity": args.heterogeneity,
              "seed": args.seed}
    elif name == "sinc":
        kw = {"sigma": args.sigma}
    elif name == "matrix_completion":
        kw = {"d": args.dim or 100, "rank": args.rank, "sigma": args.sigma, "seed": args.seed}
    elif name == "logistic":
        kw = {"workers": args.workers, "batch_size": args.batch_size, "seed": args.seed, "iid": not args.non_iid}
    return make_objective(name, **kw)


def _run_one(spec: Any, obj: Any, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    import time

    from coopsgd.analysis import spec_round_cost
    from coopsgd.engines.reference import run_reference
    from coopsgd.theory.cost import ComputeModel, NetworkModel, expected_runtime

    t0 = time.perf_counter()
    res = run_reference(spec, obj, steps=args.steps, lr=args.lr, seed=args.seed,
                        record_every=max(1, args.steps // 200), progress=progress)
    wall = time.perf_counter() - t0
    rc = spec_round_cost(spec, obj.dim, bytes_per_param=8)
    net = NetworkModel.from_mbps(args.net_latency_ms, args.net_bandwidth_mbps)
    clock = expected_runtime(steps=args.steps, tau=spec.tau, workers=spec.workers, cost=rc, network=net,
                             compute=ComputeModel(mean_s=args.compute_ms / 1e3), overlap=spec.overlap, trials=1)
    summary = res.to_dict()
    summary["simulated_time_s"] = clock["total_s"]
    summary["simulated_split_s"] = {k: clock[k] for k in ("compute_s", "communication_s", "idle_s")}
    summary["wall_time_s"] = wall
    summary["bytes_sent"] = rc.bytes_sent * int(res.rounds[-1])
    if hasattr(obj, "accuracy"):
        summary["test_accuracy"] = obj.accuracy(res.final_state[spec.workers] if spec.center == "auxiliary"
                                                else _center_of(res))
    summary["_result"] = res
    summary["_time_per_step"] = clock["per_step_s"]
    return summary


def _center_of(res: Any) -> np.ndarray:
    spec = res.spec
    X = res.final_state
    if spec.center == "leader" and res.leaders[-1] is not None:
        return X[res.leaders[-1]]
    return X[: spec.workers].mean(axis=0)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.engine != "reference":
        raise ConfigError.invalid("--engine", args.engine, "this version runs 'reference' (analytic objectives)")
    spec = _spec_from_args(args)
    obj = _objective_from_args(args)
    summary = _run_one(spec, obj, args, progress=not args.json and sys.stderr.isatty())
    res = summary.pop("_result")
    summary.pop("_time_per_step")
    if args.out:
        out = Path(args.out)
        _write_json(out / "summary.json", {"config": _config_dict(args), "spec": spec.describe(), **summary})
        _write_metrics(out / "metrics.jsonl", res)
        summary["out"] = str(out)
    if args.json:
        _print_json(summary)
    else:
        acc = f", test accuracy {summary['test_accuracy']:.3f}" if "test_accuracy" in summary else ""
        print(f"{spec.name} on {args.objective}: centre objective {summary['final_objective']:.6g}{acc} after "
              f"{summary['steps']} steps, {summary['communication_rounds']} rounds, simulated "
              f"{summary['simulated_time_s']:.3g} s (wall {summary['wall_time_s']:.2f} s)")
    return 0


def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func",)}


def _write_metrics(path: Path, res: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = res.spec.workers
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for j, step in enumerate(res.steps):
            rec = {
                "step": int(step), "average_objective": float(res.average_objective[j]),
                "center_objective": float(res.center_objective[j]),
                "worker_objectives": [float(v) for v in res.node_objectives[j, :m]],
                "consensus_distance": float(res.consensus[j]), "rounds": int(res.rounds[j]),
            }
            f.write(json.dumps(_clean(rec)) + "\n")
    tmp.replace(path)


def _cmd_compare(args: argparse.Namespace) -> int:
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    from coopsgd.algorithms.presets import PRESETS

    for n in names:
        if n not in PRESETS:
            raise ConfigError.invalid("--presets", n, f"choose from {', '.join(PRESETS)}")
    obj = _objective_from_args(args)
    rows = {}
    for n in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = _spec_from_args(args, preset=n)
        rows[n] = _run_one(spec, obj, args, progress=not args.json and sys.stderr.isatty())
    out = Path(args.out or "runs/compare")
    fig = _plot_compare(rows, out / "compare.png", args)
    table = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in rows.items()}
    _write_json(out / "compare.json", {"config": _config_dict(args), "results": table})
    if args.json:
        _print_json({"results": table, "plot": str(fig)})
        return 0
    acc_col = any("test_accuracy" in r for r in table.values())
    head = f"{'preset':24s} {'centre obj':>12s} {'avg obj':>12s} {'rounds':>7s} {'MB sent':>9s} {'sim time s':>11s}"
    print(head + ("  test acc" if acc_col else ""))
    for n, r in table.items():
        line = (f"{n:24s} {r['final_objective']:12.5g} {r['final_average_objective']:12.5g} "
                f"{r['communication_rounds']:7d} {r['bytes_sent'] / 1e6:9.3g} {r['simulated_time_s']:11.4g}")
        if acc_col:
            line += f"  {r.get('test_accuracy', float('nan')):8.3f}"
        print(line)
    print(f"figure: {fig}")
    return 0


def _plot_compare(rows: dict[str, dict[str, Any]], path: Path, args: argparse.Namespace) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for n, r in rows.items():
        res = r["_result"]
        axes[0].plot(res.steps, res.center_objective, label=n)
        axes[1].plot(res.steps * r["_time_per_step"], res.center_objective, label=n)
        axes[2].plot(res.steps, np.maximum(res.consensus, 1e-30), label=n)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("simulated wall-clock (s)")
    for ax in axes[:2]:
        ax.set_ylabel("centre-model objective")
        ax.set_yscale("log" if all(np.all(r["_result"].center_objective > 0) for r in rows.values()) else "linear")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("consensus distance ||X(I-J)||^2/m")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.objective}, m={args.workers}, lr={args.lr}, network {args.net_latency_ms} ms / "
                 f"{args.net_bandwidth_mbps} Mbit/s")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from coopsgd.objectives import OBJECTIVES

    p.add_argument("--engine", default="reference", help="execution engine (default reference)")
    p.add_argument("--objective", default="logistic", choices=list(OBJECTIVES),
                   help="analytic objective (default logistic: regression on scikit-learn's digits)")
    p.add_argument("--steps", type=int, default=300, help="number of steps K (default 300)")
    p.add_argument("--lr", type=float, default=0.2, help="learning rate (default 0.2)")
    p.add_argument("--sigma", type=float, default=0.0, help="gradient noise std (quadratic, sinc, matrix completion)")
    p.add_argument("--heterogeneity", type=float, default=0.0, help="quadratic: spread of the workers' minimisers")
    p.add_argument("--dim", type=int, default=None, help="quadratic dimension / matrix-completion d")
    p.add_argument("--rank", type=int, default=5, help="matrix completion rank r")
    p.add_argument("--batch-size", type=int, default=16, help="logistic: mini-batch per worker (default 16)")
    p.add_argument("--non-iid", action="store_true", help="logistic: label-sorted shards")
    p.add_argument("--compute-ms", type=float, default=5.0, help="simulated compute time per local step (ms)")
    p.add_argument("--net-latency-ms", type=float, default=1.0, help="simulated network latency per handshake (ms)")
    p.add_argument("--net-bandwidth-mbps", type=float, default=100.0, help="simulated bandwidth (Mbit/s)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--json", action="store_true", help="print JSON")


# ---------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from coopsgd.topology import TOPOLOGIES, WEIGHT_RULES

    parser = _Parser(prog="coopsgd", description="Cooperative SGD: local-update SGD algorithms as A(tau, W, v).")
    parser.add_argument("--version", action="version", version=f"coopsgd {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("topology", help="show / validate / plot a mixing matrix")
    p.add_argument("name", help=f"one of {', '.join(TOPOLOGIES)}, or 'custom' with --matrix FILE")
    p.add_argument("--workers", type=int, default=8, help="number of nodes (default 8)")
    p.add_argument("--weights", default="metropolis", help=f"weight rule: {', '.join(WEIGHT_RULES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random graph")
    p.add_argument("--p", type=float, default=None, help="edge probability of the random graph")
    p.add_argument("--groups", type=int, default=None, help="number of groups (topology 'groups')")
    p.add_argument("--rows", type=int, default=None, help="torus rows")
    p.add_argument("--matrix", default=None, help="custom matrix file (.npy, .csv, .txt, .json)")
    p.add_argument("--json", action="store_true", help="print JSON (zeta, eigenvalues, spectral_gap, ...)")
    p.add_argument("--plot", default=None, help="write a figure of the graph and matrix (png/svg/pdf)")
    p.set_defaults(func=_cmd_topology)

    p = sub.add_parser("theory", help="zeta, bounds, best alpha, thresholds; 'theory heatmap' draws Fig. 3a")
    p.add_argument("what", nargs="?", default="bounds", choices=["bounds", "heatmap"])
    _add_preset_args(p, preset=None)
    p.add_argument("--L", type=float, default=None, help="smoothness constant L")
    p.add_argument("--sigma2", type=float, default=None, help="gradient variance sigma^2")
    p.add_argument("--lr", type=float, default=None, help="learning rate eta")
    p.add_argument("--steps", type=int, default=None, help="iterations K")
    p.add_argument("--f-gap", type=float, default=None, help="F(u_1) - F_inf")
    p.add_argument("--kappa2", type=float, default=None, help="non-IID dissimilarity kappa^2 (Theorem 2)")
    p.add_argument("--params", type=int, default=1_000_000, help="model size for the per-round cost (default 1e6)")
    p.add_argument("--out", default=None, help="heatmap output file")
    p.add_argument("--max-tau", type=int, default=20, help="heatmap: largest tau (default 20)")
    p.add_argument("--circle", action="append", default=[], help="heatmap: circle TAU:ZETA (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_theory)

    p = sub.add_parser("reproduce", help="rerun a paper experiment")
    p.add_argument("name", choices=["lsgd-toy", "matrix-completion"], help="experiment")
    p.add_argument("--quick", action="store_true", help="2-core CPU scale")
    p.add_argument("--ranks", default=None, help="matrix completion: ranks, e.g. 1,10,50,100")
    p.add_argument("--trials", type=int, default=None, help="matrix completion: trials")
    p.add_argument("--steps", type=int, default=None, help="matrix completion: steps per run")
    p.add_argument("--d", type=int, default=None, help="matrix completion: dimension d")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--out", default=None, help="output directory (default runs/NAME)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("run", help="run one algorithm")
    _add_preset_args(p, preset="local_sgd")
    _add_run_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("compare", help="run several algorithms on equal footing; one figure and a table")
    p.add_argument("--presets", default="sync,local_sgd,easgd,dpsgd,lsgd", help="comma-separated presets")
    _add_preset_args(p, with_preset=False)
    _add_run_args(p)
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coopsgd`` console script; returns the exit status."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"coopsgd: warning: {msg}\n"  # type: ignore[assignment]
            return int(args.func(args) or 0)
    except ConfigError as exc:
        msg = str(exc)
        print(f"coopsgd: error: {msg}" if not msg.startswith("coopsgd") else f"{msg}", file=sys.stderr)
        return 2
    except CoopSGDError as exc:
        print(f"coopsgd: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"coopsgd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coopsgd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
