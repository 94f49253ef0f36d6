"""Theory toolkit of Cooperative SGD ([CSGD] = Wang & Joshi, JMLR 22, 2021, §4-6).

* :mod:`~coopsgd.theory.spectral` — eigenvalues, zeta and spectral gap of mixing matrices.
* :mod:`~coopsgd.theory.bounds` — Theorems 1-4, Corollaries 1-3, EASGD's best alpha, zeta_tau.
* :mod:`~coopsgd.theory.cost` — per-round communication cost ([CSGD] Table 3) and an alpha-beta
  wall-clock model with straggler compute times.
* :mod:`~coopsgd.theory.heatmap` — the network-error heat map of [CSGD] Fig. 3a.
* :mod:`~coopsgd.theory.compression` — compressed communication: CHOCO-Gossip's consensus step and linear
  rate, the terms of CHOCO-SGD's rate (Koloskova, Stich, Jaggi, ICML 2019), bytes against the uncompressed round.

Pure numpy/scipy/matplotlib; importing this package never imports torch.
"""

from coopsgd.theory import compression, cost
from coopsgd.theory.bounds import (
    BoundReport,
    ProblemConstants,
    check_easgd_alpha,
    corollary1,
    corollary1_lr,
    corollary1_min_steps,
    corollary2,
    corollary3,
    easgd_alpha_limit,
    easgd_best_alpha,
    easgd_mixing,
    easgd_zeta,
    effective_lr,
    generalized_elastic_best_alpha,
    generalized_elastic_mixing,
    generalized_elastic_zeta,
    network_error_term,
    theorem1,
    theorem2,
    theorem2_constant,
    theorem3,
    zeta_tau,
)
from coopsgd.theory.compression import (  # noqa: F401 -- re-exported through compression.__all__ below
    GOSSIP_RATE_DENOMINATOR,
    STEP_OFFSET_NUMERATOR,
    averaging_bound_note,
    bytes_ratio,
    choco_gossip_gamma,
    choco_gossip_rate,
    choco_gossip_rounds,
    choco_sgd_step_offset,
    choco_sgd_terms,
    contraction_delta,
    mixing_beta,
)
from coopsgd.theory.cost import (  # noqa: F401 -- re-exported through cost.__all__ below
    DISTRIBUTIONS,
    PATTERNS,
    ComputeModel,
    NetworkModel,
    RoundCost,
    expected_runtime,
    round_cost,
)
from coopsgd.theory.heatmap import network_error_grid, plot_network_error_heatmap
from coopsgd.theory.spectral import eigenvalues, is_symmetric, spectral_gap, zeta

__all__ = [
    # spectral
    "eigenvalues",
    "zeta",
    "spectral_gap",
    "is_symmetric",
    # bounds
    "ProblemConstants",
    "BoundReport",
    "effective_lr",
    "network_error_term",
    "theorem1",
    "corollary1",
    "corollary1_lr",
    "corollary1_min_steps",
    "corollary2",
    "corollary3",
    "theorem2",
    "theorem2_constant",
    "theorem3",
    "easgd_zeta",
    "easgd_best_alpha",
    "easgd_alpha_limit",
    "easgd_mixing",
    "check_easgd_alpha",
    "zeta_tau",
    "generalized_elastic_zeta",
    "generalized_elastic_best_alpha",
    "generalized_elastic_mixing",
    # heatmap
    "network_error_grid",
    "plot_network_error_heatmap",
]
# the cost model: the public names of coopsgd.theory.cost
__all__ += cost.__all__
# compressed communication: the public names of coopsgd.theory.compression
__all__ += compression.__all__
