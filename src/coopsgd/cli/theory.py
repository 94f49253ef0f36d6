"""``coopsgd theory``: a preset's zeta, bounds, best alpha and thresholds; ``theory heatmap`` draws [CSGD] Fig. 3a.

With ``--compress`` (SPEC §11) it also reports the compressor's quality (δ, or ω and the δ = 1/(1 + ω) CHOCO
uses), the bytes of a compressed round against the uncompressed one, and for gossip rounds CHOCO-SGD's theory
(:mod:`coopsgd.theory.compression`): Theorem 2's consensus step beside the run's, CHOCO-Gossip's linear rate
and, with ``--strong-convexity --L --sigma2 --G2 --steps``, the terms of Theorem 4's rate.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from typing import Any

from coopsgd.algorithms.communication import ERROR_FEEDBACK
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
    p.add_argument("--compress", default=None,
                   help="compressor of every round (none, fp16, bf16, int8[:C], int4[:C], qsgd:S, sign, topk:F, "
                        "randk:F[:unbiased], powersgd:R): its delta or omega, bytes per round and, for gossip "
                        "rounds, CHOCO-SGD's consensus step and rate (default: none)")
    p.add_argument("--error-feedback", default=None, choices=list(ERROR_FEEDBACK),
                   help="averaging rounds' error feedback (default: auto = on for biased compressors)")
    p.add_argument("--consensus-step", type=float, default=None,
                   help="CHOCO's consensus step gamma of the run, in (0, 1] (default: the compressor's delta; 1 "
                        "for none, fp16, bf16; 2/pi for sign)")
    p.add_argument("--strong-convexity", dest="strong_convexity", type=float, default=None,
                   help="strong convexity mu (CHOCO-SGD's rate, with --L, --sigma2, --G2, --steps)")
    p.add_argument("--G2", type=float, default=None, help="bound G^2 on E||stochastic gradient||^2 (CHOCO-SGD's rate)")
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
    "communication_per_round", "bounds", "notes", "warnings", "compression",
})


def _problem_constants(args: argparse.Namespace, spec: Any) -> Any:
    """The bounds' :class:`~coopsgd.theory.bounds.ProblemConstants` from the flags (``None``: none given), after
    checking that CHOCO-SGD's rate flags and the bounds' flags come complete."""
    from coopsgd.theory.bounds import ProblemConstants

    const_flags = {"L": args.L, "sigma2": args.sigma2, "lr": args.lr, "steps": args.steps, "f_gap": args.f_gap}
    choco_flags = {"strong_convexity": args.strong_convexity, "G2": args.G2}
    constants = None
    if any(v is not None for v in choco_flags.values()):
        missing = [k for k, v in {**choco_flags, "L": args.L, "sigma2": args.sigma2, "steps": args.steps}.items()
                   if v is None]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ConfigError.invalid(flags, None, "CHOCO-SGD's rate needs all of --strong-convexity, --L, --sigma2, "
                                      "--G2, --steps")
        if spec.compressed is None:
            raise ConfigError.invalid("--strong-convexity", args.strong_convexity, "CHOCO-SGD's rate is for compressed "
                                      "gossip: give --compress (e.g. --preset choco --compress topk:0.01)")
    if any(v is not None for v in const_flags.values()) and (
            all(v is None for v in choco_flags.values()) or args.lr is not None or args.f_gap is not None):
        missing = [k for k, v in const_flags.items() if v is None]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ConfigError.invalid(flags, None, "the bounds need all of --L, --sigma2, --lr, --steps, --f-gap")
        constants = ProblemConstants(
            L=args.L, sigma2=args.sigma2, f_gap=args.f_gap, lr=args.lr, steps=args.steps, kappa2=args.kappa2 or 0.0
        )
    return constants


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

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = spec_from_args(args)
    spec = _with_compression(spec, args)
    constants = _problem_constants(args, spec)
    out = analyze(spec, constants, params=args.params)
    if spec.compressed is not None:
        out["compression"] = compression_facts(spec, args.params, mu=args.strong_convexity, L=args.L, sigma2=args.sigma2,
                                               G2=args.G2, steps=args.steps)
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
    if "compression" in out:
        print("\n".join(_compression_lines(out["compression"])))
    for note in out["notes"] + out["warnings"]:
        print(f"  note: {note}")
    return 0


def _with_compression(spec: Any, args: argparse.Namespace) -> Any:
    """``spec`` with the compression of ``--compress``, ``--error-feedback``, ``--consensus-step`` (unchanged
    when none is given); a compressor its rounds cannot take is the preset's ConfigError naming compress."""
    given = {"compress": args.compress, "error_feedback": args.error_feedback, "consensus_step": args.consensus_step}
    if all(v is None for v in given.values()):
        return spec
    import dataclasses

    from coopsgd.algorithms.communication import Compression
    from coopsgd.algorithms.presets import with_compression

    if args.compress is not None and not str(args.compress).strip():
        raise ConfigError.invalid("compress", args.compress, "must be a compressor spec string such as none, int8 "
                                  "or topk:0.01")
    comp = Compression(args.compress or "none", args.error_feedback or "auto", args.consensus_step)
    spec = with_compression(spec, comp)
    if "gamma" in spec.params:  # choco names its consensus step among its parameters
        spec = dataclasses.replace(spec, params={**spec.params, "gamma": comp.consensus_step or "auto"})
    return spec


def compression_facts(spec: Any, params: int, *, mu: float | None = None, L: float | None = None,
                      sigma2: float | None = None, G2: float | None = None, steps: int | None = None
                      ) -> dict[str, Any]:
    """What the theory says about a compressed spec (``spec.compressed`` is not None) on rows of d = ``params``
    coordinates: the compressor's δ or ω, bytes per round against the uncompressed round, and for gossip rounds
    CHOCO-SGD's theory (:mod:`coopsgd.theory.compression`); for averaging rounds, which bound applies."""
    import dataclasses

    from coopsgd.analysis import spec_round_cost
    from coopsgd.theory import compression as ct
    from coopsgd.theory.codec import codec_speed
    from coopsgd.theory.spectral import zeta

    comp = spec.compressed
    q = comp.compressor()
    d = int(params)
    delta, omega = q.delta(d), q.omega(d)
    out: dict[str, Any] = {"compress": comp.compress, "d": d, "biased": bool(q.biased), "delta": delta,
                           "omega": omega}
    if q.name == "sign":
        out["delta_note"] = ("sign: delta = ||x||_1^2/(d ||x||^2): 1/d in the worst case (reported), 2/pi on "
                             "Gaussian-like vectors")
    if q.name == "powersgd":
        out["delta_note"] = "powersgd: no worst-case delta (a warm-started factor may capture little)"
    plain = dataclasses.replace(spec, compression=None)
    rc, rc0 = spec_round_cost(spec, d), spec_round_cost(plain, d)
    out["bytes_per_round"] = rc.bytes_sent
    out["uncompressed_bytes_per_round"] = rc0.bytes_sent
    out["pattern"] = rc.pattern
    out["uncompressed_pattern"] = rc0.pattern
    out["bytes_ratio"] = ct.bytes_ratio(rc0.bytes_sent, rc.bytes_sent)
    speed = codec_speed(q.name)
    out["codec_s_per_round"] = rc.codec_s  # encode / decode on the round's critical path (coopsgd.theory.codec)
    out["codec_GBps"] = None if speed is None else {"encode": speed.encode_Bps / 1e9, "decode": speed.decode_Bps / 1e9}
    kinds = _round_kinds(spec)
    out["round"] = ", ".join(_KIND_TEXT[k] for k in kinds)
    if kinds == ["leader"]:
        out["bound"] = ("no bound applies: LSGD's pull toward a compressed copy of the leader (its matrix depends on "
                        "the losses) is outside [CSGD]'s theorems and CHOCO-SGD's")
        return out
    if kinds != ["gossip"]:
        ef = comp.feedback(q)
        out["error_feedback"] = ef
        out["bound"] = (ct.averaging_bound_note(tau=spec.tau, error_feedback=ef, biased=bool(q.biased))
                        if kinds == ["average"] else
                        "no bound applies: compressed rounds with an auxiliary node (elastic) or of several kinds "
                        "are outside [CSGD]'s theorems (exact rounds) and CHOCO-SGD's (gossip only)")
        if "gossip" not in kinds:
            return out
    dc = ct.contraction_delta(delta, omega) if delta is not None or omega is not None else 0.0
    out["choco_delta"] = dc
    out["gamma_run"] = comp.gamma(q, d)
    out["gamma_run_source"] = "given (--consensus-step)" if comp.consensus_step is not None else "default"
    notes: list[str] = []
    W = spec.theory_matrix
    if W is None or dc <= 0:
        notes.append("CHOCO's theorems need one fixed symmetric doubly stochastic W and delta > 0; not computed "
                     "for this spec" if W is None else "delta = 0: CHOCO's theorems give no rate")
        out["notes"] = notes
        return out
    rho = 1.0 - zeta(W)
    if rho <= 0:
        out["notes"] = ["spectral gap 0 (a disconnected graph): no consensus, no rate"]
        return out
    beta = ct.mixing_beta(W)
    gamma_star = ct.choco_gossip_gamma(dc, rho, beta)
    out.update({"spectral_gap": rho, "beta": beta, "gamma_theorem2": gamma_star,
                "gossip_rate": ct.choco_gossip_rate(dc, rho),
                "gossip_rounds_1e-6": ct.choco_gossip_rounds(dc, rho, 1e-6)})
    if q.name == "sign":  # its worst case 1/d is far from what it does on typical (Gaussian-like) vectors
        typical = 2.0 / math.pi
        out["sign_typical"] = {"delta": typical, "gamma_theorem2": ct.choco_gossip_gamma(typical, rho, beta),
                               "gossip_rate": ct.choco_gossip_rate(typical, rho),
                               "gossip_rounds_1e-6": ct.choco_gossip_rounds(typical, rho, 1e-6)}
    if spec.tau > 1:
        notes.append(f"a gossip round every tau = {spec.tau} steps: CHOCO-SGD's Theorem 4 assumes one after every "
                     "step (its terms below are for tau = 1)")
    if mu is not None and L is not None and sigma2 is not None and G2 is not None and steps is not None:
        out["choco_sgd"] = ct.choco_sgd_terms(mu=mu, L=L, sigma2=sigma2, G2=G2, workers=spec.workers, steps=steps,
                                              delta=dc, rho=rho)
    out["notes"] = notes
    return out


#: How :func:`compression_facts` names a round kind.
_KIND_TEXT = {"gossip": "gossip (CHOCO-SGD)", "average": "average (x_ref + mean of Q(x_i - x_ref + e_i))",
              "other": "elastic (an auxiliary node)",
              "leader": "leader refresh (the leader sends Q(x_L - s) to the copy s every worker holds)"}


def _round_kinds(spec: Any) -> list[str]:
    """The kinds of the spec's rounds, sorted: ``gossip``, ``average`` (from the round matrices,
    :func:`~coopsgd.algorithms.communication.exchange_of`) or ``other``; a random schedule (MATCHA, FedAvg's
    samples) is classified by its pattern."""
    from coopsgd.algorithms.communication import exchange_of

    if spec.schedule.needs_losses:  # LSGD: its rounds are built from the losses
        return ["leader"]
    mats = spec.schedule.matrices(4096)
    if mats is None:
        return ["gossip"] if spec.pattern == "neighbor" else ["average"]
    kinds = {exchange_of(M, spec.workers) for M in mats} - {"identity"}
    return sorted("other" if k is None else k for k in kinds) or ["average"]


def _compression_lines(c: dict[str, Any]) -> list[str]:
    """The printed block of :func:`compression_facts`."""
    if c["delta"] is not None:
        quality = f"biased, delta = {c['delta']:.6g}"
    else:
        quality = f"unbiased, omega = {c['omega']:.6g}"
    lines = [f"  compression {c['compress']} on rows of d = {c['d']:,} (--params): {quality}; rounds: {c['round']}"]
    if c.get("delta_note"):
        lines.append(f"    {c['delta_note']}")
    lines.append(f"    bytes per round: {c['bytes_per_round'] / 1e6:.4g} MB ({c['pattern']}) vs "
                 f"{c['uncompressed_bytes_per_round'] / 1e6:.4g} MB uncompressed ({c['uncompressed_pattern']}): "
                 f"{c['bytes_ratio']:.4g}x fewer")
    if c.get("codec_GBps"):
        g = c["codec_GBps"]
        lines.append(f"    codec time per round: {c['codec_s_per_round'] * 1e3:.4g} ms (stated throughputs: encode "
                     f"{g['encode']:.3g} GB/s, decode {g['decode']:.3g} GB/s of the dense row; coopsgd.theory.codec)")
    if "bound" in c:
        ef = "" if "error_feedback" not in c else f"error feedback {'on' if c['error_feedback'] else 'off'}; "
        lines.append(f"    {ef}{c['bound']}")
    if "choco_delta" in c:
        if c["omega"] is not None:
            lines.append(f"    CHOCO uses Q/(1 + omega): delta = 1/(1 + omega) = {c['choco_delta']:.6g}")
        lines.append(f"    consensus step gamma: this run {c['gamma_run']:.6g} ({c['gamma_run_source']})"
                     + (f"; Theorem 2's gamma = rho^2 delta/(16 rho + rho^2 + 4 beta^2 + 2 rho beta^2 - 8 rho delta)"
                        f" = {c['gamma_theorem2']:.4g} (rho = {c['spectral_gap']:.4g}, beta = {c['beta']:.4g})"
                        if "gamma_theorem2" in c else ""))
    if "gossip_rate" in c:
        lines.append(f"    CHOCO-Gossip (Koloskova et al. 2019, Theorem 2; W symmetric doubly stochastic, Q a "
                     f"delta-contraction): e_t <= (1 - rho^2 delta/82)^t e_0, c = {c['gossip_rate']:.4g} per round, "
                     f"{c['gossip_rounds_1e-6']:.4g} rounds to reduce e_t by 1e-6 (at Theorem 2's gamma)")
    if "sign_typical" in c:
        t = c["sign_typical"]
        lines.append(f"    with sign's delta on Gaussian-like vectors, 2/pi: Theorem 2's gamma = {t['gamma_theorem2']:.4g}, "
                     f"c = {t['gossip_rate']:.4g} per round, {t['gossip_rounds_1e-6']:.4g} rounds to 1e-6")
    if "choco_sgd" in c:
        r = c["choco_sgd"]
        terms = ", ".join(f"{k}={v:.4g}" for k, v in r["terms"].items())
        lines.append(f"    {r['name']}: f(x_avg) - f* = O({terms}); {r['constants']}; step sizes 4/(mu (a + t)), "
                     f"a = max(410/(rho^2 delta), 16 kappa) = {r['step_offset']:.4g} (lr {r['lr_first']:.3g} -> "
                     f"{r['lr_last']:.3g}); inputs mu, L, sigma2 (mean variance), G2, n = workers, T = steps"
                     + (f"; the SGD term dominates after T > {r['noise_dominates_after']:.4g}"
                        if r["noise_dominates_after"] is not None else ""))
    elif "gossip_rate" in c:
        lines.append("    CHOCO-SGD's rate (Theorem 4, strongly convex): give --mu --L --sigma2 --G2 --steps")
    for note in c.get("notes", []):
        lines.append(f"    note: {note}")
    return lines
