"""What the theory says about an algorithm spec: zeta, best alpha, bounds, communication cost.

Glue between :mod:`coopsgd.algorithms` (specs) and :mod:`coopsgd.theory` (pure formulas); the CLI's
``coopsgd theory`` prints this.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from coopsgd.algorithms.communication import REDUCIBLE, compressed_round_cost, elastic_spec_cost
from coopsgd.algorithms.registry import TheoryHook, declarations
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.theory import bounds, cost
from coopsgd.theory.codec import codec_time
from coopsgd.theory.spectral import eigenvalues, zeta
from coopsgd.topology import MixingMatrix

__all__ = ["analyze", "spec_round_cost"]


def spec_round_cost(spec: AlgorithmSpec, params: int, bytes_per_param: int = 4) -> cost.RoundCost:
    """Per-round communication cost of ``spec`` for a model with ``params`` parameters ([CSGD] Table 3); with
    a compressor (``spec.compressed``), the payloads' bytes (:func:`compressed_round_cost`, SPEC §11)."""
    rc = _uncompressed_round_cost(spec, params, bytes_per_param)
    if spec.control:  # SCAFFOLD: every round also moves the control variates, a second model's worth
        rc = cost.RoundCost(rc.pattern, rc.handshakes, 2.0 * rc.floats_sent, 2.0 * rc.bytes_sent)
    comp = spec.compressed
    if comp is None or not comp.compresses:
        return rc
    import torch  # the compressor library (only for a compressed spec)

    q = comp.compressor()
    dtype = torch.float64 if bytes_per_param == 8 else torch.float16 if bytes_per_param == 2 else torch.float32
    # the stated encode / decode throughputs (coopsgd.theory.codec), as the simulator's clock charges them
    codec = codec_time(q.name, params * bytes_per_param)
    # elastic rounds and DOWNPOUR's pushes send point to point (the busiest node's payloads), as the engines charge
    elastic = elastic_spec_cost(spec.schedule, spec.workers, bytes_per_param=bytes_per_param,
                                payload_bytes=q.payload_bytes(params, dtype), codec=codec)
    if elastic is not None:
        return elastic
    return compressed_round_cost(rc, workers=spec.nodes if rc.pattern == "neighbor" else _senders(spec), params=params,
                                 bytes_per_param=bytes_per_param, payload_bytes=q.payload_bytes(params, dtype),
                                 reducible=q.name in REDUCIBLE, codec=codec)


def _uncompressed_round_cost(spec: AlgorithmSpec, params: int, bytes_per_param: int) -> cost.RoundCost:
    pattern = spec.pattern
    max_degree = None
    if pattern == "neighbor":
        W = spec.theory_matrix
        if W is None:
            mats = spec.schedule.matrices()
            W = mats[0] if mats else np.eye(spec.nodes)
        degrees = MixingMatrix(W, check="none", allow_negative=True).degrees
        # the workers' exchanges set the round time; an auxiliary's (elastic) exchange overlaps local steps
        max_degree = max(1, int(degrees[: spec.workers].max()))
        return cost.round_cost(
            pattern, workers=spec.nodes, params=params, max_degree=max_degree, bytes_per_param=bytes_per_param
        )
    return cost.round_cost(pattern, workers=_senders(spec), params=params, bytes_per_param=bytes_per_param)


def _senders(spec: AlgorithmSpec) -> int:
    """The workers that send and receive in a round: a sampled FedAvg round's k clients (the others are not
    synchronised), else all m."""
    if spec.pattern == "parameter_server" and "clients_per_round" in spec.params:
        return int(spec.params["clients_per_round"])
    return spec.workers


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def analyze(
    spec: AlgorithmSpec,
    constants: bounds.ProblemConstants | None = None,
    *,
    params: int = 1_000_000,
) -> dict[str, Any]:
    """JSON-ready theory summary of ``spec``.

    Always: ``zeta``, ``spectral_gap``, ``eigenvalues`` of the theory matrix (``None`` when the theorems do
    not apply, with ``notes`` saying why), the per-round communication cost for a model of ``params``
    parameters and whatever the preset's theory hooks add (its declaration in
    :mod:`coopsgd.algorithms.presets`): ``best_alpha`` / ``alpha_limit`` (elastic presets), ``zeta_tau``
    (periodic presets), MATCHA's ``expected_zeta``, ... With ``constants``: the Theorem 1 bound (and the
    bounds the hooks add: the preset's own corollary or theorem) with its terms and whether the
    step-size condition holds.
    """
    m, tau, name = spec.workers, spec.tau, spec.name
    out: dict[str, Any] = {"preset": name, "workers": m, "auxiliaries": spec.auxiliaries, "tau": tau}
    out["params"] = {k: v for k, v in spec.params.items()}
    notes = list(spec.notes)
    W = spec.theory_matrix
    if W is not None:
        z = zeta(W)
        ev = np.asarray(eigenvalues(W))
        out["zeta"] = z
        out["spectral_gap"] = 1.0 - z
        out["eigenvalues"] = ev.real.tolist() if not np.iscomplexobj(ev) else [[e.real, e.imag] for e in ev]
        mm = MixingMatrix(W, check="none", allow_negative=True)
        out["theory_applies"] = bool(mm.theory_applies)
        notes.extend(f"theorems do not apply: {s}" for s in mm.theory_issues())
    else:
        out["zeta"] = None
        out["spectral_gap"] = None
        out["eigenvalues"] = None
        out["theory_applies"] = False
    hooks = _hooks(spec)
    for hook in hooks:
        if hook.facts is not None:
            hook.facts(spec, out, notes)
    rc = spec_round_cost(spec, params)
    out["communication_per_round"] = {
        "pattern": rc.pattern, "handshakes": rc.handshakes, "floats": rc.floats_sent, "bytes": rc.bytes_sent,
        "model_params": params,
    }
    if constants is not None:
        out["bounds"] = _bounds(spec, constants, out.get("zeta"), hooks)
    out["notes"] = notes
    return out


def _hooks(spec: AlgorithmSpec) -> tuple[TheoryHook, ...]:
    """The theory hooks declared by the spec's preset (none for a hand-made spec)."""
    decl = declarations().get(spec.name)
    return () if decl is None else decl.theory


def _bounds(
    spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, hooks: tuple[TheoryHook, ...] = ()
) -> dict[str, Any]:
    m, tau, v = spec.workers, spec.tau, spec.theory_v
    res: dict[str, Any] = {}
    if z is None:
        res["note"] = "the theorems need a fixed symmetric doubly-stochastic W; not computed for this preset"
        for hook in hooks:
            if hook.bounds is not None:
                hook.bounds(spec, c, None, res)
        return res
    res["theorem1"] = bounds.theorem1(c, m=m, v=v, tau=tau, zeta=z).to_dict()
    res["corollary1"] = bounds.corollary1(c, m=m, v=v, tau=tau, zeta=z).to_dict()
    res["corollary1"]["lr"] = bounds.corollary1_lr(m=m, v=v, L=c.L, steps=c.steps)
    res["corollary1"]["min_steps"] = _finite(bounds.corollary1_min_steps(m=m, v=v, tau=tau, zeta=z))
    for hook in hooks:
        if hook.bounds is not None:
            hook.bounds(spec, c, z, res)
    if c.kappa2 > 0:
        res["theorem2"] = bounds.theorem2(c, m=m, v=v, tau=tau, zeta=z).to_dict()
    return res
