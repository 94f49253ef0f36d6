"""Names the command line shows without importing what they name (CLI layer).

``coopsgd --help`` / ``--version`` must not load torch, matplotlib or the experiments just to list what
exists, so the lists the parser needs live here as plain data: the paper reproductions (name, one-line
description, engines), the model and data set names. Each table is a copy of a real registry
(:data:`coopsgd.experiments.registry.EXPERIMENTS`, :data:`coopsgd.models.MODELS`,
:data:`coopsgd.data.DATASETS`); ``tests/unit/test_catalog.py`` fails when they drift apart, so adding an
experiment, model or data set means adding its line here too.

This module imports nothing.
"""

from __future__ import annotations

__all__ = ["Reproduction", "REPRODUCTIONS", "REPRODUCTION_ALIASES", "MATRIX_COMPLETION", "MODELS", "DATASETS",
           "reproduction_names"]


class Reproduction:
    """One ``coopsgd reproduce NAME``: its one-line description and the engines it runs on (first = default)."""

    __slots__ = ("name", "description", "engines")

    def __init__(self, name: str, description: str, engines: tuple[str, ...]) -> None:
        self.name = name
        self.description = description
        self.engines = engines

    def __repr__(self) -> str:
        return f"Reproduction({self.name!r}, {self.description!r}, {self.engines!r})"


_SIM_DIST = ("simulate", "distributed")

#: Every ``coopsgd reproduce`` target. All but ``matrix-completion`` are entries of
#: :data:`coopsgd.experiments.registry.EXPERIMENTS` (same description and engines); ``matrix-completion`` is
#: run by the CLI itself (:mod:`coopsgd.experiments.matrix_completion`).
REPRODUCTIONS: dict[str, Reproduction] = {
    r.name: r
    for r in (
        Reproduction("lsgd-toy", "[LSGD] Table 1 / Fig. 7: EASGD vs LSGD on sin(pi r)/(pi r)", ("reference",)),
        Reproduction("csgd-fig3", "[CSGD] Fig. 3: network error bound over (tau, zeta) and measured error "
                                  "floors at fixed lr", _SIM_DIST),
        Reproduction("csgd-fig4", "[CSGD] Fig. 4: EASGD alpha sweep (m=8) and blocking vs non-blocking time",
                     _SIM_DIST),
        Reproduction("csgd-fig5", "[CSGD] Fig. 5: local SGD tau in {1,4,8,16,24} at two learning rates", _SIM_DIST),
        Reproduction("csgd-fig6", "[CSGD] Fig. 6: decentralized periodic averaging (tau=10, zeta=0.75) vs D-PSGD "
                                  "vs sync", _SIM_DIST),
        Reproduction("lsgd-nets", "[LSGD] Fig. 4/5 + Table 6: SGD, DOWNPOUR, EASGD, LSGD on CNN-7 and ResNet-20",
                     _SIM_DIST),
        Reproduction("lsgd-lstm", "[LSGD] LSTM on WikiText-2: test perplexity vs wall-clock for SGD, DOWNPOUR, "
                                  "EASGD, LSGD", ("simulate",)),
        Reproduction("choco", "[CHOCO] CHOCO-Gossip's linear consensus vs naive compressed gossip; CHOCO-SGD top-1% vs "
                              "D-PSGD: loss and bytes", ("reference",)),
        Reproduction("fl-strategies", "federated strategies: SCAFFOLD vs FedAvg under label skew, FedProx's "
                                      "stability, FedAdam/FedYogi on the LSTM, median and Krum against sign-flip "
                                      "clients", ("simulate",)),
        Reproduction("matrix-completion", "[LSGD] matrix completion: EASGD's centre vs LSGD's leader over ranks "
                                          "(--ranks, --trials, --steps, --d)", ("reference",)),
    )
}

#: Other names accepted by ``coopsgd reproduce`` (alias -> name).
REPRODUCTION_ALIASES: dict[str, str] = {"lsgd-matrix-completion": "matrix-completion"}

#: The settings of ``reproduce matrix-completion`` that have flags: full scale and ``--quick``
#: (:data:`coopsgd.experiments.matrix_completion.MC_SETTINGS` and ``MC_QUICK``).
MATRIX_COMPLETION: dict[str, dict[str, object]] = {
    "full": {"d": 1000, "ranks": [1, 10, 50, 100], "trials": 10, "steps": 1000},
    "quick": {"d": 200, "ranks": [1, 10], "trials": 3, "steps": 300},
}

#: :data:`coopsgd.models.MODELS`.
MODELS: tuple[str, ...] = ("mlp", "lenet", "cnn7", "resnet20", "vgg16", "lstm_lm", "gpt")

#: :data:`coopsgd.data.DATASETS`.
DATASETS: tuple[str, ...] = (
    "mnist_bundled", "digits", "mnist", "cifar10", "synthetic_mnist", "synthetic_cifar", "wikitext2",
)


def reproduction_names() -> list[str]:
    """Every name ``coopsgd reproduce`` accepts, sorted (aliases included)."""
    return sorted({*REPRODUCTIONS, *REPRODUCTION_ALIASES})
