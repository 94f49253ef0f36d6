"""Error bounds and closed forms of Cooperative SGD ([CSGD] = Wang & Joshi, JMLR 22, 2021, §4-6).

Every bound function takes the problem constants (:class:`ProblemConstants`: L, sigma^2,
F(u_1) - F_inf, eta, K and, for the non-IID case, kappa^2) plus the algorithm's knobs (m, v, tau, zeta)
and returns a :class:`BoundReport`: the named terms of the bound, their sum, the learning-rate
condition under which the theorem holds and whether it holds here. A violated condition is *reported*
(``condition_holds=False`` plus a note), never raised: the library must be able to say "the theorem
does not apply" for any setting.

Conventions
-----------
* ``condition_lhs`` is the left-hand side of the theorem's condition rewritten as ``lhs <= 1``; so
  ``condition_holds == (condition_lhs <= 1)`` for every report.
* ``lr_eff`` is eta_eff = m*eta/(m+v) ([CSGD] eq. (13)); for the corollaries with v = 0 it equals eta.
* Term names are shared by all reports: ``"optimization"`` (2[F(u_1)-F_inf]/(eta_eff K)),
  ``"sync_noise"`` (eta_eff L sigma^2/m, the fully synchronous SGD error), ``"network_error"``
  (the additional error of local updates / sparse mixing) and, for Theorem 2, ``"non_iid"`` (C kappa^2).
* ``zeta >= 1`` makes every bound infinite (the averaging does not contract): total = inf and a note.

All functions are pure numpy and import no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from coopsgd.errors import (
    ConfigError,
    DivergenceWarning,
    MixingMatrixError,
    TheoryWarning,
    check_float,
    check_int,
)

__all__ = [
    "ProblemConstants",
    "BoundReport",
    "effective_lr",
    "network_error_term",
    "theorem1",
    "corollary1_lr",
    "corollary1_min_steps",
    "corollary1",
    "corollary2",
    "corollary3",
    "theorem2_constant",
    "theorem2",
    "easgd_zeta",
    "easgd_best_alpha",
    "easgd_alpha_limit",
    "easgd_mixing",
    "check_easgd_alpha",
    "theorem3",
    "zeta_tau",
    "generalized_elastic_zeta",
    "generalized_elastic_best_alpha",
    "generalized_elastic_mixing",
    "SLOWMO_RATE_STATEMENT",
    "slowmo_effective_lr_factor",
    "slowmo_rate",
]

_NO_CONTRACTION = (
    "zeta={zeta:g} >= 1: the mixing does not contract, so {name} does not apply (bound is infinite)"
)


# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemConstants:
    """Problem constants of [CSGD] Assumptions 1-4 (and 5 of the non-IID case, Appendix F).

    Attributes:
        L: smoothness constant of every local objective (Assumption 1), > 0.
        sigma2: variance bound sigma^2 of a worker's stochastic gradient (Assumption 4, beta = 0), >= 0.
        f_gap: initial sub-optimality F(u_1) - F_inf (Assumption 2), >= 0.
        lr: learning rate eta of every worker, > 0.
        steps: total number of local iterations K, >= 1.
        kappa2: dissimilarity bound kappa^2 of the local objectives (non-IID, Theorem 2), >= 0.
    """

    L: float
    sigma2: float
    f_gap: float
    lr: float
    steps: int
    kappa2: float = 0.0

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__ (validated floats/ints, never numpy scalars)
        object.__setattr__(self, "L", check_float("L", self.L, low=0.0, low_open=True))
        object.__setattr__(self, "sigma2", check_float("sigma2", self.sigma2, low=0.0))
        object.__setattr__(self, "f_gap", check_float("f_gap", self.f_gap, low=0.0))
        object.__setattr__(self, "lr", check_float("lr", self.lr, low=0.0, low_open=True))
        object.__setattr__(self, "steps", check_int("steps", self.steps, minimum=1))
        object.__setattr__(self, "kappa2", check_float("kappa2", self.kappa2, low=0.0))


@dataclass(frozen=True)
class BoundReport:
    """One evaluated bound.

    Attributes:
        name: which result, e.g. ``"Theorem 1 (IID)"``.
        terms: the named additive terms of the bound (see the module docstring).
        total: their sum (``inf`` when the theorem does not apply because zeta >= 1).
        condition: the theorem's condition on the learning rate / horizon, as text.
        condition_lhs: its left-hand side written as ``lhs <= 1``.
        condition_holds: ``condition_lhs <= 1`` (and zeta < 1).
        lr_eff: the effective learning rate eta_eff = m*eta/(m+v) used in the bound.
        notes: human-readable caveats (violated condition, ignored inputs, ...).
    """

    name: str
    terms: dict[str, float]
    total: float
    condition: str
    condition_lhs: float
    condition_holds: bool
    lr_eff: float
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (terms copied, notes as a list) for JSON / logging."""
        d = asdict(self)
        d["terms"] = dict(self.terms)
        d["notes"] = list(self.notes)
        return d

    def warn_if_invalid(self) -> BoundReport:
        """Emit a :class:`TheoryWarning` per note when the condition fails; return ``self`` for chaining."""
        if not self.condition_holds:
            for note in self.notes or (f"{self.name}: condition {self.condition} fails",):
                warnings.warn(f"{self.name}: {note}", TheoryWarning, stacklevel=2)
        return self


# ---------------------------------------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------------------------------------


def _m(m: Any) -> int:
    return check_int("m", m, minimum=1)


def _v(v: Any) -> int:
    return check_int("v", v, minimum=0)


def _tau(tau: Any) -> int:
    return check_int("tau", tau, minimum=1)


def _zeta(zeta: Any) -> float:
    return check_float("zeta", zeta, low=0.0)


def _report(
    name: str,
    terms: dict[str, float],
    condition: str,
    lhs: float,
    lr_eff: float,
    notes: list[str],
) -> BoundReport:
    holds = bool(math.isfinite(lhs) and lhs <= 1.0)
    total = float(sum(terms.values()))
    if not holds and math.isfinite(lhs):
        notes = [f"condition {condition} fails (lhs={lhs:.4g} > 1): the bound is not guaranteed", *notes]
    return BoundReport(
        name=name,
        terms={k: float(x) for k, x in terms.items()},
        total=total,
        condition=condition,
        condition_lhs=float(lhs),
        condition_holds=holds,
        lr_eff=float(lr_eff),
        notes=tuple(notes),
    )


def _divisibility_note(steps: int, tau: int) -> list[str]:
    if steps % tau:
        return [f"steps={steps} is not a multiple of tau={tau}; the theorem assumes K divisible by tau"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Theorem 1 and Corollary 1 (IID)
# ---------------------------------------------------------------------------------------------------------


def effective_lr(lr: float, m: int, v: int) -> float:
    """eta_eff = m*eta/(m+v), the learning rate of the averaged model u_k ([CSGD] eq. (13))."""
    lr = check_float("lr", lr, low=0.0, low_open=True)
    m, v = _m(m), _v(v)
    return m * lr / (m + v)


def network_error_term(tau: Any, zeta: Any, *, m: int = 1, v: int = 0) -> Any:
    """Factor ((1+zeta^2)/(1-zeta^2)*tau - 1)(1+v/m)^2 of the additional network error in [CSGD] (17).

    Multiply by eta_eff^2 L^2 sigma^2 to get Theorem 1's network term. This is the quantity of
    [CSGD] Fig. 3a. Vectorised: ``tau`` and ``zeta`` broadcast as numpy arrays (then an array is
    returned; scalars give a float). Entries with zeta >= 1 are ``inf``. ``tau`` may be any real >= 1.
    """
    m, v = _m(m), _v(v)
    t = np.asarray(tau, dtype=np.float64)
    z = np.asarray(zeta, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.any(t < 1):
        raise ConfigError.invalid("tau", tau, "must be finite and >= 1")
    if np.any(np.isnan(z)) or np.any(z < 0):
        raise ConfigError.invalid("zeta", zeta, "must be >= 0 (not NaN)")
    t, z = np.broadcast_arrays(t, z)
    out = np.full(t.shape, np.inf)
    ok = z < 1.0
    zz = z[ok] ** 2
    out[ok] = ((1.0 + zz) / (1.0 - zz) * t[ok] - 1.0) * (1.0 + v / m) ** 2
    if out.ndim == 0:
        return float(out)
    return out


def _theorem1_lhs(lr_eff: float, L: float, m: int, v: int, tau: int, zeta: float) -> float:
    """Left-hand side of [CSGD] condition (16): eta_eff L + 5 eta_eff^2 L^2 [(1+v/m) tau/(1-zeta)]^2."""
    if zeta >= 1.0:
        return math.inf
    a = lr_eff * L
    return a + 5.0 * a * a * ((1.0 + v / m) * tau / (1.0 - zeta)) ** 2


_T1_CONDITION = "eta_eff*L + 5*eta_eff^2*L^2*[(1+v/m)*tau/(1-zeta)]^2 <= 1"


def _iid_terms(c: ProblemConstants, lr_eff: float, m: int, network_factor: float) -> dict[str, float]:
    return {
        "optimization": 2.0 * c.f_gap / (lr_eff * c.steps),
        "sync_noise": lr_eff * c.L * c.sigma2 / m,
        # 0 * inf would be NaN: a zero-noise problem has no network error even when zeta >= 1
        "network_error": 0.0 if c.sigma2 == 0.0 else lr_eff**2 * c.L**2 * c.sigma2 * network_factor,
    }


def theorem1(c: ProblemConstants, *, m: int, v: int, tau: int, zeta: float) -> BoundReport:
    """[CSGD] Theorem 1, eq. (17): IID error bound of A(tau, W, v) after K iterations.

    E[1/K sum ||grad F(u_k)||^2] <= 2[F(u_1)-F_inf]/(eta_eff K) + eta_eff L sigma^2/m
    + eta_eff^2 L^2 sigma^2 ((1+zeta^2)/(1-zeta^2) tau - 1)(1+v/m)^2,
    valid when eta_eff L + 5 eta_eff^2 L^2 [(1+v/m) tau/(1-zeta)]^2 <= 1 (condition (16)).
    """
    m, v, tau, zeta = _m(m), _v(v), _tau(tau), _zeta(zeta)
    lr_eff = m * c.lr / (m + v)
    notes = _divisibility_note(c.steps, tau)
    if zeta >= 1.0:
        notes.insert(0, _NO_CONTRACTION.format(zeta=zeta, name="Theorem 1"))
    terms = _iid_terms(c, lr_eff, m, network_error_term(tau, zeta, m=m, v=v))
    if zeta >= 1.0:
        terms["network_error"] = math.inf
    lhs = _theorem1_lhs(lr_eff, c.L, m, v, tau, zeta)
    return _report("Theorem 1 (IID)", terms, _T1_CONDITION, lhs, lr_eff, notes)


def corollary1_lr(*, m: int, v: int, L: float, steps: int) -> float:
    """[CSGD] Corollary 1 learning rate eta = ((m+v)/(L m)) sqrt(m/K), i.e. eta_eff = sqrt(m/K)/L."""
    m, v = _m(m), _v(v)
    L = check_float("L", L, low=0.0, low_open=True)
    steps = check_int("steps", steps, minimum=1)
    return (m + v) / (L * m) * math.sqrt(m / steps)


def corollary1_min_steps(*, m: int, v: int, tau: int, zeta: float) -> float:
    """Smallest horizon of [CSGD] Corollary 1: K >= 10 m [(1+v/m) tau/(1-zeta)]^2 (inf when zeta >= 1)."""
    m, v, tau, zeta = _m(m), _v(v), _tau(tau), _zeta(zeta)
    if zeta >= 1.0:
        return math.inf
    return 10.0 * m * ((1.0 + v / m) * tau / (1.0 - zeta)) ** 2


def corollary1(c: ProblemConstants, *, m: int, v: int, tau: int, zeta: float) -> BoundReport:
    """[CSGD] Corollary 1, eq. (18): Theorem 1 at the learning rate of :func:`corollary1_lr`.

    Bound: (2 L [F(u_1)-F_inf] + sigma^2)/sqrt(mK) + (m/K)(1+v/m)^2 ((1+zeta^2)/(1-zeta^2) tau - 1) sigma^2,
    valid when K >= 10 m [(1+v/m) tau/(1-zeta)]^2. Terms: ``optimization`` = 2 L f_gap/sqrt(mK),
    ``sync_noise`` = sigma^2/sqrt(mK), ``network_error`` = the second summand. ``c.lr`` is ignored.
    """
    m, v, tau, zeta = _m(m), _v(v), _tau(tau), _zeta(zeta)
    K = c.steps
    lr = corollary1_lr(m=m, v=v, L=c.L, steps=K)
    lr_eff = m * lr / (m + v)
    notes = [
        f"uses its own learning rate eta={lr:.6g} (eta_eff=sqrt(m/K)/L); the given lr={c.lr:g} is ignored"
    ]
    notes += _divisibility_note(K, tau)
    root = math.sqrt(m * K)
    factor = network_error_term(tau, zeta, m=m, v=v)
    terms = {
        "optimization": 2.0 * c.L * c.f_gap / root,
        "sync_noise": c.sigma2 / root,
        "network_error": 0.0 if c.sigma2 == 0.0 else (m / K) * factor * c.sigma2,
    }
    if zeta >= 1.0:
        notes.insert(0, _NO_CONTRACTION.format(zeta=zeta, name="Corollary 1"))
        terms["network_error"] = math.inf
    lhs = corollary1_min_steps(m=m, v=v, tau=tau, zeta=zeta) / K
    return _report(
        "Corollary 1 (IID, tuned lr)", terms, "10*m*[(1+v/m)*tau/(1-zeta)]^2 <= K", lhs, lr_eff, notes
    )


# ---------------------------------------------------------------------------------------------------------
# Corollaries 2 (PSASGD) and 3 (D-PSGD)
# ---------------------------------------------------------------------------------------------------------


def corollary2(c: ProblemConstants, *, m: int, tau: int) -> BoundReport:
    """[CSGD] Corollary 2, eq. (24): periodic simple averaging (local SGD) A(tau, J, 0).

    Bound 2[F(x_1)-F_inf]/(eta K) + eta L sigma^2/m + eta^2 L^2 sigma^2 (tau-1), valid when
    eta L + eta^2 L^2 tau (tau-1) <= 1. (Theorem 1 at zeta = 0, v = 0 gives the same terms under the
    stricter condition (16).)
    """
    m, tau = _m(m), _tau(tau)
    lr = c.lr
    terms = _iid_terms(c, lr, m, float(tau - 1))
    a = lr * c.L
    lhs = a + a * a * tau * (tau - 1)
    return _report(
        "Corollary 2 (PSASGD)",
        terms,
        "eta*L + eta^2*L^2*tau*(tau-1) <= 1",
        lhs,
        lr,
        _divisibility_note(c.steps, tau),
    )


def corollary3(c: ProblemConstants, *, m: int, zeta: float) -> BoundReport:
    """[CSGD] Corollary 3, eq. (27): decentralized parallel SGD A(1, W, 0).

    Bound 2[F(x_1)-F_inf]/(eta K) + eta L sigma^2/m + eta^2 L^2 sigma^2 * 2 zeta^2/(1-zeta^2), valid when
    eta L + eta^2 L^2 (2 zeta/(1-zeta)) (zeta/(1+zeta) + 1/(1-zeta)) <= 1.
    """
    m, zeta = _m(m), _zeta(zeta)
    lr = c.lr
    notes: list[str] = []
    cond = "eta*L + eta^2*L^2*(2*zeta/(1-zeta))*(zeta/(1+zeta) + 1/(1-zeta)) <= 1"
    if zeta >= 1.0:
        notes.append(_NO_CONTRACTION.format(zeta=zeta, name="Corollary 3"))
        terms = _iid_terms(c, lr, m, 0.0)
        terms["network_error"] = math.inf
        return _report("Corollary 3 (D-PSGD)", terms, cond, math.inf, lr, notes)
    terms = _iid_terms(c, lr, m, 2.0 * zeta**2 / (1.0 - zeta**2))
    a = lr * c.L
    lhs = a + a * a * (2.0 * zeta / (1.0 - zeta)) * (zeta / (1.0 + zeta) + 1.0 / (1.0 - zeta))
    return _report("Corollary 3 (D-PSGD)", terms, cond, lhs, lr, notes)


# ---------------------------------------------------------------------------------------------------------
# Theorem 2 (non-IID)
# ---------------------------------------------------------------------------------------------------------


def theorem2_constant(*, lr: float, L: float, tau: int, zeta: float) -> float:
    """Constant C of [CSGD] Theorem 2, eq. (21):
    C = 6 eta^2 L^2 tau^2/(1-zeta) * (2 zeta^2/(1+zeta) + 2 zeta/(1-zeta) + (tau-1)/tau).

    Uses the workers' learning rate eta as printed in the paper (not eta_eff). ``inf`` when zeta >= 1.
    """
    lr = check_float("lr", lr, low=0.0, low_open=True)
    L = check_float("L", L, low=0.0, low_open=True)
    tau, zeta = _tau(tau), _zeta(zeta)
    if zeta >= 1.0:
        return math.inf
    inner = 2.0 * zeta**2 / (1.0 + zeta) + 2.0 * zeta / (1.0 - zeta) + (tau - 1.0) / tau
    return 6.0 * lr**2 * L**2 * tau**2 / (1.0 - zeta) * inner


def theorem2(c: ProblemConstants, *, m: int, v: int, tau: int, zeta: float) -> BoundReport:
    """[CSGD] Theorem 2, eq. (20): non-IID bound = 2 x (Theorem 1's three terms) + C kappa^2.

    Valid when eta_eff L <= 1 and C <= 1/2; ``condition_lhs`` = max(eta_eff L, 2C) so that it holds iff
    ``condition_lhs <= 1``. Terms: Theorem 1's terms each doubled, plus ``non_iid`` = C kappa^2.
    """
    m, v, tau, zeta = _m(m), _v(v), _tau(tau), _zeta(zeta)
    base = theorem1(c, m=m, v=v, tau=tau, zeta=zeta)
    C = theorem2_constant(lr=c.lr, L=c.L, tau=tau, zeta=zeta)
    terms = {k: 2.0 * x for k, x in base.terms.items()}
    terms["non_iid"] = C * c.kappa2 if math.isfinite(C) else math.inf
    notes = _divisibility_note(c.steps, tau)
    if zeta >= 1.0:
        notes.insert(0, _NO_CONTRACTION.format(zeta=zeta, name="Theorem 2"))
    lhs = max(base.lr_eff * c.L, 2.0 * C)
    notes.append(f"C={C:.6g} (uses eta, not eta_eff)")
    return _report("Theorem 2 (non-IID)", terms, "eta_eff*L <= 1 and C <= 1/2", lhs, base.lr_eff, notes)


# ---------------------------------------------------------------------------------------------------------
# EASGD (Lemma 1, Theorem 3)
# ---------------------------------------------------------------------------------------------------------


def _alpha(alpha: Any) -> float:
    return check_float("alpha", alpha)


def easgd_zeta(alpha: float, m: int) -> float:
    """zeta of EASGD's W_alpha: max(|1-alpha|, |1-(m+1) alpha|) ([CSGD] eq. (22)). Any finite alpha.

    The eigenvalue 1-alpha belongs to worker directions orthogonal to 1, which exist only for m >= 2;
    with a single worker W_alpha is 2x2 and zeta = |1 - 2 alpha| exactly.
    """
    alpha, m = _alpha(alpha), _m(m)
    if m == 1:
        return abs(1.0 - 2.0 * alpha)
    return max(abs(1.0 - alpha), abs(1.0 - (m + 1) * alpha))


def easgd_best_alpha(m: int) -> float:
    """alpha* = 2/(m+2), minimising zeta(alpha) with value m/(m+2) ([CSGD] Lemma 1).

    For the degenerate m = 1 (see :func:`easgd_zeta`) the minimiser is 1/2 (zeta = 0) instead.
    """
    m = _m(m)
    return 0.5 if m == 1 else 2.0 / (m + 2)


def easgd_alpha_limit(m: int) -> float:
    """2/(m+1): zeta(alpha) < 1 iff 0 < alpha < 2/(m+1) ([CSGD] Lemma 1); beyond it EASGD diverges."""
    return 2.0 / (_m(m) + 1)


def easgd_mixing(alpha: float, m: int) -> np.ndarray:
    """EASGD's (m+1)x(m+1) mixing matrix W_alpha = [[(1-alpha) I, alpha 1], [alpha 1^T, 1-m alpha]] ([CSGD] §5.1).

    Node m (the last row/column) is the auxiliary variable z.
    """
    alpha, m = _alpha(alpha), _m(m)
    W = np.zeros((m + 1, m + 1))
    W[:m, :m] = (1.0 - alpha) * np.eye(m)
    W[:m, m] = alpha
    W[m, :m] = alpha
    W[m, m] = 1.0 - m * alpha
    return W


def check_easgd_alpha(alpha: Any, m: int, *, strict: bool = False) -> float:
    """Validate EASGD's elasticity alpha for m workers and return it as a float.

    alpha must be a finite number > 0 (else :class:`ConfigError`). alpha >= 2/(m+1) is legal but makes
    zeta(alpha) >= 1, so EASGD diverges ([CSGD] Lemma 1, Fig. 4): a :class:`DivergenceWarning` is emitted,
    or a ConfigError raised when ``strict``. (For 1/m < alpha < 2/(m+1) the auxiliary's self-weight
    1 - m alpha is negative yet the iteration still converges, so that range is accepted silently.)
    """
    m = _m(m)
    if isinstance(alpha, bool):
        raise ConfigError.invalid("alpha", alpha, "must be a number > 0")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError.invalid("alpha", alpha, "must be a number > 0") from None
    if not math.isfinite(a) or a <= 0.0:
        raise ConfigError.invalid("alpha", alpha, "must be a finite number > 0")
    limit = easgd_alpha_limit(m)
    if a >= limit:
        msg = (
            f"alpha={a:g} >= 2/(m+1)={limit:.6g} for m={m}: zeta(alpha)={easgd_zeta(a, m):.4g} >= 1, so EASGD "
            f"diverges; use 0 < alpha < {limit:.6g} (best alpha = 2/(m+2) = {easgd_best_alpha(m):.6g})"
        )
        if a >= 1.0:
            msg += f"; moreover alpha >= 1 makes the workers' self-weights 1-alpha={1 - a:g} non-positive"
        if strict:
            raise ConfigError(f"alpha={alpha!r} is invalid: {msg}", field="alpha", value=alpha)
        warnings.warn(msg, DivergenceWarning, stacklevel=2)
    return a


def theorem3(c: ProblemConstants, *, m: int, tau: int) -> BoundReport:
    """[CSGD] Theorem 3, eq. (23): EASGD A(tau, W_alpha, 1) with the best alpha = 2/(m+2).

    Bound 2[F(u_1)-F_inf]/(eta_eff K) + eta_eff L sigma^2/m + 1/2 eta_eff^2 L^2 sigma^2 (m+1)[1 + C(tau-1)]
    with C = 1 + 2(1+1/m)^2 and eta_eff = m eta/(m+1). The paper states no separate condition; we report
    Theorem 1's condition (16) at v = 1, zeta = m/(m+2), from which Theorem 3 is derived (Appendix G).
    At tau = 1 the network term equals Theorem 1's at those values.
    """
    m, tau = _m(m), _tau(tau)
    v = 1
    zeta = m / (m + 2.0)
    lr_eff = m * c.lr / (m + v)
    C = 1.0 + 2.0 * (1.0 + 1.0 / m) ** 2
    terms = _iid_terms(c, lr_eff, m, 0.5 * (m + 1) * (1.0 + C * (tau - 1)))
    notes = [f"alpha = 2/(m+2) = {2.0 / (m + 2):.6g}, zeta = m/(m+2) = {zeta:.6g}; condition from Theorem 1"]
    notes += _divisibility_note(c.steps, tau)
    lhs = _theorem1_lhs(lr_eff, c.L, m, v, tau, zeta)
    return _report("Theorem 3 (EASGD, best alpha)", terms, _T1_CONDITION, lhs, lr_eff, notes)


# ---------------------------------------------------------------------------------------------------------
# D-PSGD vs PSASGD threshold, Theorem 4 (generalized elastic averaging)
# ---------------------------------------------------------------------------------------------------------


def zeta_tau(tau: Any) -> float:
    """zeta_tau = sqrt(1 - 2/(tau+1)) ([CSGD] §5.4).

    D-PSGD (tau=1, v=0) with zeta <= zeta_tau has a network factor 2 zeta^2/(1-zeta^2) <= tau - 1,
    the factor of PSASGD with period tau, hence a lower error floor at the same learning rate.
    """
    t = check_float("tau", tau, low=1.0)
    return math.sqrt(1.0 - 2.0 / (t + 1.0))


def generalized_elastic_zeta(zeta: float, alpha: float, m: int) -> float:
    """zeta' of W' = [[(1-alpha) W, alpha 1], [alpha 1^T, 1-m alpha]] ([CSGD] Theorem 4, eq. (33)).

    zeta' = max(|1-alpha| zeta, |1-(m+1) alpha|). The paper writes (1-alpha) zeta, which is the same for
    alpha <= 1; the absolute value keeps the formula exact for alpha > 1 too (eigenvalues (1-alpha) lambda_i).
    """
    zeta, alpha, m = _zeta(zeta), _alpha(alpha), _m(m)
    return max(abs(1.0 - alpha) * zeta, abs(1.0 - (m + 1) * alpha))


def generalized_elastic_best_alpha(zeta: float, m: int) -> float:
    """alpha* = (1+zeta)/(m+1+zeta), giving the minimum zeta' = m zeta/(m+1+zeta) ([CSGD] Theorem 4)."""
    zeta, m = _zeta(zeta), _m(m)
    return (1.0 + zeta) / (m + 1.0 + zeta)


def generalized_elastic_mixing(W: Any, alpha: float) -> np.ndarray:
    """W' = [[(1-alpha) W, alpha 1], [alpha 1^T, 1-m alpha]] for an m x m matrix W ([CSGD] eq. (31)).

    ``W`` may be an array or any object with a ``.matrix`` attribute. The auxiliary node is the last.
    """
    alpha = _alpha(alpha)
    arr = np.asarray(getattr(W, "matrix", W), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise MixingMatrixError.invalid("W", f"array of shape {arr.shape}", "must be a square m x m matrix")
    m = arr.shape[0]
    out = np.empty((m + 1, m + 1))
    out[:m, :m] = (1.0 - alpha) * arr
    out[:m, m] = alpha
    out[m, :m] = alpha
    out[m, m] = 1.0 - m * alpha
    return out


# ---------------------------------------------------------------------------------------------------------
# SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020): slow momentum on top of a base algorithm
# ---------------------------------------------------------------------------------------------------------


#: What SlowMo's convergence analysis states (reported by ``coopsgd theory --preset slowmo``).
SLOWMO_RATE_STATEMENT = (
    "SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020): for L-smooth non-convex objectives, IID data and "
    "bounded gradient variance, with SGD-type base steps (local SGD, gossip or all-reduce SGD) and heavy-ball "
    "slow momentum, alpha/(1-beta) = O(1) and the inner learning rate proportional to sqrt(m/K), the average "
    "expected squared gradient norm over K steps is O(1/sqrt(m K)) once K is large enough: linear speed-up "
    "in m, as for the base algorithm"
)


def slowmo_effective_lr_factor(alpha: float, beta: float) -> float:
    """alpha / (1 - beta): the factor a steady pseudo-gradient's step gains from slow momentum beta and slow
    learning rate alpha (the geometric sum 1 + beta + beta^2 + ... of heavy-ball momentum)."""
    a = check_float("outer_lr", alpha, low=0.0, low_open=True)
    b = check_float("outer_momentum", beta, low=0.0, high=1.0, high_open=True)
    return a / (1.0 - b)


def slowmo_rate(c: ProblemConstants, *, m: int, tau: int, alpha: float, beta: float) -> dict[str, Any]:
    """What SlowMo's convergence analysis gives for ``m`` workers, outer period ``tau`` and K = ``c.steps``.

    The analysis (smooth non-convex objectives, IID data, bounded stochastic-gradient variance, SGD-type
    base algorithms: local SGD, gossip or all-reduce SGD, with heavy-ball slow momentum) shows that with
    alpha / (1 - beta) held constant and the inner learning rate shrinking like ``sqrt(m / K)``, the
    average expected squared gradient norm over the K steps falls as ``O(1 / sqrt(m K))`` once K is large
    enough: a linear speed-up in m, as for the base algorithm. This reports that order and its scaling,
    not a bound with constants (the paper's constants are not evaluated here).
    """
    m, tau = _m(m), _tau(tau)
    factor = slowmo_effective_lr_factor(alpha, beta)
    K = c.steps
    rounds = K // tau
    notes = [
        "an order of magnitude, not a bound with constants: O(1/sqrt(m K)) for K large enough",
        "assumes SGD-type inner steps (plain, momentum) on IID data; no statement for adaptive inner "
        "optimizers (Adam, AdamW)",
    ]
    if K % tau:
        notes.append(f"steps={K} is not a multiple of tau={tau}; the analysis counts whole outer rounds")
    return {
        "name": "SlowMo (Wang et al., ICLR 2020): convergence rate",
        "statement": "min/average E||grad F||^2 over K steps = O(1/sqrt(m K)) with alpha/(1-beta) = O(1) and "
                     "the inner learning rate proportional to sqrt(m/K)",
        "order_1_over_sqrt_mK": 1.0 / math.sqrt(m * K),
        "inner_lr_scaling_sqrt_m_over_K": math.sqrt(m / K),
        "effective_lr_factor": factor,
        "outer_rounds": rounds,
        "notes": notes,
    }
