"""The reference loop of ``benchmarks/bench_peers.py`` (issue 26 item 8), checked without Flower.

The benchmark compares coopsgd's federated presets with Flower's strategies and with a hand-written PyTorch loop
(``run_hand``). Here the hand loop of every strategy is checked against coopsgd's preset on a small problem
(synthetic 784-feature data, an MLP 784-4-10, 6 clients under a Dirichlet split, half of them per round,
float64): equal to 1e-10, and the strategy's own term matters (it does not end where FedAvg does). Flower's
FedAdam step size and the keyword arguments the benchmark gives Flower's strategies are checked as well.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_peers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


bp = _load()


def _problem(name: str = "fedavg") -> tuple[Any, tuple[torch.Tensor, ...], list[np.ndarray], torch.nn.Module, Any]:
    """Workload, data, shards, initial model and round -> clients map of a small run of strategy ``name``."""
    w = bp.Workload(clients=6, fraction=0.5, rounds=3, local_steps=2, batch=4, lr=0.05, hidden=4, beta=0.5,
                    seed=3, dtype="float64", threads=1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(150, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (150,), generator=g)
    data = (x, y, x[:20], y[:20])
    shards = bp.client_shards(y, w)
    assert min(len(s) for s in shards) >= 1
    init = bp.initial_model(w)
    sched = bp.strategy_spec(w, shards, bp.STRATEGIES[name]).schedule

    def clients_of_round(r: int) -> np.ndarray:
        return np.asarray(sched.clients(r), dtype=np.int64)

    return w, data, shards, init, clients_of_round


def _fedavg_params() -> torch.Tensor:
    w, data, shards, init, clients = _problem()
    return bp.run_hand(w, data, shards, init, clients, bp.STRATEGIES["fedavg"]).params


@pytest.mark.parametrize("name", list(bp.STRATEGIES))
def test_hand_loop_equals_the_preset(name: str) -> None:
    if not hasattr(presets, name):
        pytest.skip(f"coopsgd has no {name} preset in this version")
    st = bp.STRATEGIES[name]
    w, data, shards, init, clients = _problem(name)
    assert len(clients(0)) == 3 and not np.array_equal(clients(0), clients(1))  # sampled, and it changes
    coop = bp.run_coopsgd(w, data, shards, init, "loop", st)
    hand = bp.run_hand(w, data, shards, init, clients, st)
    assert coop.params is not None and hand.params is not None
    assert coop.params.dtype == torch.float64
    assert float((coop.params - hand.params).abs().max()) <= 1e-10
    if name != "fedavg":  # the strategy's own term changes the run
        assert float((hand.params - _fedavg_params()).abs().max()) > 1e-6


def test_flower_adam_step_size_is_the_only_difference() -> None:
    st = bp.STRATEGIES["fedadam"]
    eta, b1, b2 = st.settings["outer_lr"], st.settings["outer_beta1"], st.settings["outer_beta2"]
    # Flower's round t (1-based) uses eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))
    assert bp.flower_adam_eta(eta, b1, b2, 1) == pytest.approx(eta * np.sqrt(1 - b2**2) / (1 - b1**2), rel=1e-15)
    assert bp.flower_adam_eta(eta, b1, b2, 1) == pytest.approx(0.0742, abs=1e-4)
    assert bp.flower_adam_eta(eta, 0.0, 0.0, 5) == eta  # with beta1 = beta2 = 0 the definitions coincide
    w, data, shards, init, clients = _problem("fedadam")
    paper = bp.run_hand(w, data, shards, init, clients, st).params
    flower = bp.run_hand(w, data, shards, init, clients, st, flower_adam=True).params
    assert float((paper - flower).abs().max()) > 1e-4


def test_flower_gets_the_presets_settings() -> None:
    w = _problem()[0]
    s = bp.STRATEGIES
    common = {"fraction_train": 0.5, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 6}
    assert bp.flower_strategy_kwargs(w, s["fedavg"]) == common
    assert bp.flower_strategy_kwargs(w, s["fedprox"]) == {**common, "proximal_mu": s["fedprox"].settings["mu"]}
    assert bp.flower_strategy_kwargs(w, s["fedavgm"]) == {**common, "server_learning_rate": 1.0,
                                                          "server_momentum": 0.9}
    for name in ("fedadam", "fedyogi"):
        cfg = s[name].settings
        assert bp.flower_strategy_kwargs(w, s[name]) == {
            **common, "eta": cfg["outer_lr"], "eta_l": w.lr, "beta_1": cfg["outer_beta1"],
            "beta_2": cfg["outer_beta2"], "tau": cfg["outer_eps"]}
    assert bp.flower_strategy_kwargs(w, s["fedadagrad"]) == {**common, "eta": 0.1, "eta_l": w.lr, "tau": 1e-9}
    # and coopsgd's preset gets the same settings
    for name, st in s.items():
        if not hasattr(presets, name):
            continue
        spec = bp.strategy_spec(w, [np.arange(3)] * 6, st)
        assert spec.name == name
        for key, value in st.settings.items():
            assert spec.params[key] == value, (name, key)


def test_flower_without_scaffold_is_refused_clearly() -> None:
    w, _, _, init, clients = _problem("scaffold")
    with pytest.raises(bp.PeerUnavailable, match="SCAFFOLD"):
        bp.run_flower(w, init, clients, 1, False, bp.STRATEGIES["scaffold"])


def test_unknown_strategy_is_named() -> None:
    with pytest.raises(ValueError, match="fedfoo"):
        bp.parse_strategies("fedprox,fedfoo")
    assert [st.name for st in bp.parse_strategies("fedadam, fedprox,fedadam")] == ["fedadam", "fedprox"]


def test_dirichlet_split_with_a_floor_where_coopsgds_partition_refuses() -> None:
    from coopsgd.data.partition import partition

    y = torch.randint(0, 10, (150,), generator=torch.Generator().manual_seed(1))
    w = bp.Workload(clients=60, fraction=0.1, rounds=1, local_steps=1, batch=1, lr=0.1, hidden=2, beta=0.1, seed=0,
                    dtype="float64", threads=1)
    draw = bp.first_dirichlet_draw(y, w)
    empty = [i for i, q in enumerate(draw) if q.size == 0]
    assert empty and bp.floored_clients(y, w) == len(empty)
    shards = bp.client_shards(y, w)
    assert min(q.size for q in shards) == 1
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(150))  # every sample exactly once
    assert all(shards[i].size == 1 for i in empty)
    kept = [i for i, q in enumerate(draw) if q.size > 0]
    assert sum(np.array_equal(shards[i], np.sort(draw[i])) for i in kept) >= len(kept) - len(empty)
    # where coopsgd's partition accepts, it is used as it is
    w2 = bp.Workload(clients=5, fraction=1.0, rounds=1, local_steps=1, batch=1, lr=0.1, hidden=2, beta=0.5, seed=0,
                     dtype="float64", threads=1)
    assert bp.floored_clients(y, w2) == 0
    got, want = bp.client_shards(y, w2), partition(y, 5, "dirichlet", beta=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
