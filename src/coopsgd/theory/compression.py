"""Theory of compressed communication (SPEC §11): CHOCO-Gossip's consensus step and linear rate, the terms of
CHOCO-SGD's rate, and the bytes a compressed round sends against the uncompressed one.

Reference: A. Koloskova, S. U. Stich, M. Jaggi, *Decentralized Stochastic Optimization and Gossip Algorithms
with Compressed Communication*, ICML 2019 ([CHOCO]). Notation here is the project's (SPEC §11), not the
paper's: the paper writes the compressor's quality as ω and the eigengap as δ; we write

* **δ** ∈ (0, 1] — the compressor's contraction, E‖Q(x) − x‖² ≤ (1 − δ)‖x‖² (the paper's ω). An unbiased
  compressor with variance ω (E Q(x) = x, E‖Q(x) − x‖² ≤ ω‖x‖²) is used as Q/(1 + ω), a contraction with
  δ = 1/(1 + ω) ([CHOCO] §3, the rescaling of unbiased operators) — :func:`contraction_delta`;
* **ρ** = 1 − |λ₂(W)| ∈ (0, 1] — the spectral gap of the symmetric doubly stochastic gossip matrix W
  (|λ₂| the second largest eigenvalue modulus, the project's ζ; the paper's δ) — ``1 - zeta(W)``;
* **β** = ‖I − W‖₂ ∈ [0, 2] — :func:`mixing_beta`.

What [CHOCO] proves, and what this module evaluates:

* **CHOCO-Gossip** (their Theorem 2, average consensus with public copies x̂): with the consensus step
  γ* = ρ²δ / (16ρ + ρ² + 4β² + 2ρβ² − 8ρδ) (:func:`choco_gossip_gamma`) the error
  e_t = Σ_i ‖x_i − x̄‖² + ‖x_i − x̂_i‖² satisfies E e_t ≤ (1 − ρ²δ/82)^t e_0 (:func:`choco_gossip_rate`):
  linear convergence for every δ > 0, O(82/(ρ²δ) · log(1/ε)) rounds to reduce it by ε
  (:func:`choco_gossip_rounds`). Assumptions: W symmetric and doubly stochastic with ρ > 0; Q a
  δ-contraction (in expectation). No other input: e_0 is whatever the nodes start with.
* **CHOCO-SGD** (their Theorem 4, strongly convex case): each f_i μ-strongly convex and L-smooth
  (κ = L/μ), stochastic gradients with variance ≤ σ_i² (σ̄² = (1/n) Σ σ_i²) and second moment
  E‖∇F_i(x, ξ)‖² ≤ G², step sizes η_t = 4/(μ(a + t)) with a ≥ max(410/(ρ²δ), 16κ)
  (:func:`choco_sgd_step_offset`), γ as in Theorem 2, and a weighted average x_avg of the iterates' mean
  (weights (a + t)²). Then after T iterations E f(x_avg) − f* = O(σ̄²/(μnT) + κG²/(μ δ² ρ⁴ T²) +
  G²/(μ δ³ ρ⁶ T³)): the first term is mini-batch SGD's over all n·T samples, unaffected by the compression
  and the graph; the others, the price of compressed gossip, fall faster in T (:func:`choco_sgd_terms`
  evaluates each term with its absolute constant set to 1 — the order of magnitude, not the bound; the
  paper's constants are not restated here). Inputs: μ, L, σ̄², G², n, T (and δ, ρ from the compressor and W).

**What was checked against the paper, and what was not** (2026-12-06). The paper's text was searched for (the
arXiv preprint 1902.00340, the PMLR proceedings page, the authors' repository epfml/ChocoSGD). Found and
checked: the abstract of arXiv 1902.00340v1, in the paper's notation (ω ≤ 1 the compression quality, our δ;
δ the eigengap, our ρ): CHOCO-SGD converges at rate O(1/(nT) + 1/(T δ² ω)²) for strongly convex objectives,
and CHOCO-Gossip reaches accuracy ε in O(1/(δ² ω) · log(1/ε)) rounds. In our notation these are the orders
of :func:`choco_sgd_terms`' ``sgd_noise`` (σ̄²/(μnT)) and ``consensus`` (∝ 1/(δ²ρ⁴T²)) terms and of
:func:`choco_gossip_rounds` (∝ log(1/ε)/(ρ²δ)); ``tests/unit/test_theory_compression.py`` checks these scalings.
**Not found, hence not verified**: the statements of Theorem 2 and Theorem 4 themselves -- the consensus step
γ* = ρ²δ/(16ρ + ρ² + 4β² + 2ρβ² − 8ρδ), the rate's constant 82, the step-size offset a ≥ max(410/(ρ²δ), 16κ)
with η_t = 4/(μ(a + t)), the weights (a + t)², and the third term G²/(μδ³ρ⁶T³) -- nor the equation numbers:
the repository holds code only (its consensus step is tuned on a grid, ``tune_consensus_stepsize.py``) and the
searchable copies of the paper returned its abstract and introduction, not its theorems. These are the
values as recalled, unchanged; treat them as unverified until checked against the paper's Theorems 2 and 4.

Averaging rounds with error feedback (sync, local SGD, FedAvg, DiLoCo's outer step) have no theorem here:
[CSGD]'s Theorems 1–4 assume exact averaging, and the error-feedback analyses of compressed gradient
averaging (Stich, Cordonnier, Jaggi, NeurIPS 2018; Karimireddy et al., ICML 2019) cover τ = 1 only and are
not implemented — :func:`averaging_bound_note` says which case a spec is.

Pure Python and numpy; importing it imports no torch (the compressors' δ, ω and payload sizes are inputs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.theory.spectral import as_array, eigenvalues, is_symmetric

__all__ = [
    "GOSSIP_RATE_DENOMINATOR",
    "STEP_OFFSET_NUMERATOR",
    "contraction_delta",
    "mixing_beta",
    "choco_gossip_gamma",
    "choco_gossip_rate",
    "choco_gossip_rounds",
    "choco_sgd_step_offset",
    "choco_sgd_terms",
    "bytes_ratio",
    "averaging_bound_note",
]

#: [CHOCO] Theorem 2: E e_t ≤ (1 − ρ²δ/82)^t e_0 (as recalled: not verified against the paper's text, see the
#: module docstring; the order ρ²δ is the abstract's).
GOSSIP_RATE_DENOMINATOR = 82.0
#: [CHOCO] Theorem 4: a ≥ max(410/(ρ²δ), 16κ) (as recalled: not verified against the paper's text).
STEP_OFFSET_NUMERATOR = 410.0


def _delta(delta: float) -> float:
    return check_float("delta", delta, low=0.0, high=1.0, low_open=True)


def _gap(rho: float) -> float:
    return check_float("spectral_gap", rho, low=0.0, high=1.0, low_open=True)


def contraction_delta(delta: float | None, omega: float | None) -> float:
    """The δ CHOCO uses with a compressor: its own δ when it is biased, else 1/(1 + ω) (an unbiased Q with
    variance ω is used as Q/(1 + ω), a δ-contraction with δ = 1/(1 + ω): E‖Q(x)/(1+ω) − x‖² ≤
    (1 − 1/(1+ω))‖x‖²). Exactly one of ``delta``, ``omega`` is given (a compressor's ``delta(d)`` /
    ``omega(d)``)."""
    if (delta is None) == (omega is None):
        raise ConfigError.invalid("delta", delta, "give the compressor's delta or its omega, exactly one")
    if delta is not None:
        return check_float("delta", delta, low=0.0, high=1.0)
    w = check_float("omega", omega, low=0.0)
    return 1.0 / (1.0 + w)


def mixing_beta(W: Any) -> float:
    """β = ‖I − W‖₂ of a symmetric W: max over its eigenvalues λ of |1 − λ| (in [0, 2] for a doubly
    stochastic W)."""
    a = as_array(W)
    if not is_symmetric(a):
        raise ConfigError.invalid("W", a.shape, "must be symmetric (CHOCO's theorems assume a symmetric W)")
    ev = np.asarray(eigenvalues(a), dtype=np.float64)
    return float(np.max(np.abs(1.0 - ev)))


def choco_gossip_gamma(delta: float, rho: float, beta: float) -> float:
    """[CHOCO] Theorem 2's consensus step: γ* = ρ²δ / (16ρ + ρ² + 4β² + 2ρβ² − 8ρδ).

    The denominator is at least 16ρ + ρ² − 8ρ > 0 (δ ≤ 1), so γ* is positive; it is at most
    ρ²δ/(8ρ + ρ²) < 1. Example: a complete graph with W = J (ρ = 1, β = 1) and δ = 1 gives 1/15."""
    d, r = _delta(delta), _gap(rho)
    b = check_float("beta", beta, low=0.0, high=2.0)
    return r * r * d / (16.0 * r + r * r + 4.0 * b * b + 2.0 * r * b * b - 8.0 * r * d)


def choco_gossip_rate(delta: float, rho: float) -> float:
    """[CHOCO] Theorem 2's contraction per round, c = ρ²δ/82: E e_t ≤ (1 − c)^t e_0 with γ = γ*."""
    return _gap(rho) ** 2 * _delta(delta) / GOSSIP_RATE_DENOMINATOR


def choco_gossip_rounds(delta: float, rho: float, eps: float) -> float:
    """Rounds Theorem 2 needs to reduce e_t by the factor ``eps`` ∈ (0, 1): the least t with
    (1 − c)^t ≤ ε, t = ⌈ln ε / ln(1 − c)⌉ (≈ ln(1/ε)/c = 82/(ρ²δ) · ln(1/ε))."""
    e = check_float("eps", eps, low=0.0, high=1.0, low_open=True, high_open=True)
    c = choco_gossip_rate(delta, rho)
    if c >= 1.0:
        return 1.0
    return float(math.ceil(math.log(e) / math.log1p(-c)))


def choco_sgd_step_offset(delta: float, rho: float, kappa: float) -> float:
    """[CHOCO] Theorem 4's step-size offset a = max(410/(ρ²δ), 16κ) (η_t = 4/(μ(a + t)))."""
    k = check_float("kappa", kappa, low=1.0)
    return max(STEP_OFFSET_NUMERATOR / (_gap(rho) ** 2 * _delta(delta)), 16.0 * k)


def choco_sgd_terms(*, mu: float, L: float, sigma2: float, G2: float, workers: int, steps: int, delta: float,
                    rho: float) -> dict[str, Any]:
    """The terms of [CHOCO] Theorem 4's rate for E f(x_avg) − f* after T = ``steps`` iterations of CHOCO-SGD
    on n = ``workers`` nodes, each with its absolute constant set to 1 (an order of magnitude, not the bound):

    * ``sgd_noise`` = σ̄²/(μ n T): mini-batch SGD's term, the same as exact averaging's;
    * ``consensus`` = κ G²/(μ δ² ρ⁴ T²): the compressed gossip's lag (κ = L/μ);
    * ``higher_order`` = G²/(μ δ³ ρ⁶ T³).

    Also returned: ``kappa``, ``step_offset`` a = max(410/(ρ²δ), 16κ), the first and last step sizes
    η_0 = 4/(μa), η_T = 4/(μ(a + T)), and ``noise_dominates_after``: the T from which the SGD term exceeds
    the consensus term, T > κ G² n/(σ̄² δ² ρ⁴) (``None`` when σ̄² = 0)."""
    mu = check_float("mu", mu, low=0.0, low_open=True)
    L = check_float("L", L, low=0.0, low_open=True)
    if L < mu:
        raise ConfigError.invalid("L", L, f"must be >= mu = {mu:g} (a mu-strongly convex L-smooth f has L >= mu)")
    sigma2 = check_float("sigma2", sigma2, low=0.0)
    G2 = check_float("G2", G2, low=0.0)
    n = check_int("workers", workers, minimum=1)
    T = check_int("steps", steps, minimum=1)
    d, r = _delta(delta), _gap(rho)
    kappa = L / mu
    a = choco_sgd_step_offset(d, r, kappa)
    terms = {
        "sgd_noise": sigma2 / (mu * n * T),
        "consensus": kappa * G2 / (mu * d**2 * r**4 * T**2),
        "higher_order": G2 / (mu * d**3 * r**6 * T**3),
    }
    crossover = None if sigma2 == 0 else kappa * G2 * n / (sigma2 * d**2 * r**4)
    return {
        "name": "CHOCO-SGD (Koloskova et al. 2019, Theorem 4; strongly convex)",
        "terms": terms,
        "total_order": math.fsum(terms.values()),
        "kappa": kappa,
        "step_offset": a,
        "lr_first": 4.0 / (mu * a),
        "lr_last": 4.0 / (mu * (a + T)),
        "noise_dominates_after": crossover,
        "constants": "each term's absolute constant set to 1 (the theorem's O(.) form)",
    }


def bytes_ratio(uncompressed_bytes: float, compressed_bytes: float) -> float:
    """How many times fewer bytes the compressed round sends: uncompressed / compressed (``inf`` when the
    compressed round sends nothing)."""
    u = check_float("uncompressed_bytes", uncompressed_bytes, low=0.0)
    c = check_float("compressed_bytes", compressed_bytes, low=0.0)
    return math.inf if c == 0 else u / c


def averaging_bound_note(*, tau: int, error_feedback: bool, biased: bool) -> str:
    """Which bound applies to compressed averaging rounds (sync, local SGD, FedAvg, an outer step) with
    ``tau`` local steps per round: none of this project's theorems ([CSGD] Theorems 1-4 assume exact
    averaging). The sentence names the analysis that covers the case in the literature, if any."""
    tau = check_int("tau", tau, minimum=1)
    if tau == 1 and error_feedback and biased:
        return ("no bound computed: tau = 1 with error feedback is compressed gradient averaging with memory, "
                "analysed by Stich, Cordonnier & Jaggi (NeurIPS 2018) and Karimireddy et al. (ICML 2019; "
                "rate of SGD plus a term of order 1/delta^2 that decays faster); [CSGD]'s theorems assume exact "
                "averaging and do not apply")
    if tau == 1 and not biased:
        return ("no bound computed: tau = 1 with an unbiased compressor averages unbiased estimates (QSGD, "
                "Alistarh et al. 2017: the gradient variance grows by at most a factor 1 + omega); [CSGD]'s "
                "theorems assume exact averaging and do not apply")
    return (f"no bound applies: compressed averaging every tau = {tau} local steps "
            f"({'with' if error_feedback else 'without'} error feedback) is outside [CSGD]'s theorems (exact "
            "averaging) and outside CHOCO-SGD's (gossip after every step)")
