"""coopsgd.theory.compression (CHOCO-SGD's theory, Koloskova et al. 2019) and ``coopsgd theory --compress``:
closed forms of delta, gamma, the rates and bytes per round."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coopsgd.cli import main
from coopsgd.errors import ConfigError
from coopsgd.theory import compression as ct
from coopsgd.topology import mixing_matrix


def _ring_uniform(n: int) -> np.ndarray:
    W = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            W[i, j % n] = 1 / 3
    return W


def test_gamma_closed_forms() -> None:
    # W = J (complete graph): rho = 1, beta = ||I - J|| = 1; delta = 1: 1 / (16 + 1 + 4 + 2 - 8)
    assert ct.choco_gossip_gamma(1.0, 1.0, 1.0) == pytest.approx(1 / 15)
    J = np.full((5, 5), 1 / 5)
    assert ct.mixing_beta(J) == pytest.approx(1.0)
    # ring of 8 with weights 1/3: lambda_k = 1/3 + 2/3 cos(2 pi k / 8)
    W = _ring_uniform(8)
    rho = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))
    beta = 1 - (1 / 3 - 2 / 3)  # the eigenvalue -1/3 at k = 4
    assert ct.mixing_beta(W) == pytest.approx(beta)
    d = 0.01
    want = rho**2 * d / (16 * rho + rho**2 + 4 * beta**2 + 2 * rho * beta**2 - 8 * rho * d)
    assert ct.choco_gossip_gamma(d, rho, beta) == pytest.approx(want, rel=1e-12)
    # gamma grows with delta and with the gap, and stays below 1
    assert ct.choco_gossip_gamma(0.1, rho, beta) > ct.choco_gossip_gamma(0.01, rho, beta)
    assert 0 < ct.choco_gossip_gamma(1.0, 1.0, 0.0) < 1


def test_rate_rounds_and_step_offset() -> None:
    c = ct.choco_gossip_rate(0.25, 0.5)
    assert c == pytest.approx(0.5**2 * 0.25 / 82)
    t = ct.choco_gossip_rounds(0.25, 0.5, 1e-3)
    assert (1 - c) ** t <= 1e-3 < (1 - c) ** (t - 1)
    assert ct.choco_sgd_step_offset(0.01, 0.2, 10) == pytest.approx(410 / (0.04 * 0.01))
    assert ct.choco_sgd_step_offset(1.0, 1.0, 100) == pytest.approx(1600)


def test_sgd_terms_closed_form() -> None:
    r = ct.choco_sgd_terms(mu=0.5, L=2.0, sigma2=3.0, G2=7.0, workers=4, steps=100, delta=0.1, rho=0.5)
    kappa = 4.0
    assert r["kappa"] == kappa
    assert r["terms"]["sgd_noise"] == pytest.approx(3.0 / (0.5 * 4 * 100))
    assert r["terms"]["consensus"] == pytest.approx(kappa * 7.0 / (0.5 * 0.1**2 * 0.5**4 * 100**2))
    assert r["terms"]["higher_order"] == pytest.approx(7.0 / (0.5 * 0.1**3 * 0.5**6 * 100**3))
    a = max(410 / (0.25 * 0.1), 16 * kappa)
    assert r["step_offset"] == pytest.approx(a)
    assert r["lr_first"] == pytest.approx(4 / (0.5 * a)) and r["lr_last"] == pytest.approx(4 / (0.5 * (a + 100)))
    T = r["noise_dominates_after"]  # where sigma2/(mu n T) = kappa G2 / (mu delta^2 rho^4 T^2)
    assert 3.0 / (0.5 * 4 * T) == pytest.approx(kappa * 7.0 / (0.5 * 0.1**2 * 0.5**4 * T**2))


def test_the_orders_the_papers_abstract_states() -> None:
    # arXiv 1902.00340v1's abstract (paper notation omega = our delta, delta = our rho): CHOCO-Gossip needs
    # O(1/(rho^2 delta) log(1/eps)) rounds; CHOCO-SGD's rate is O(1/(nT) + 1/(T rho^2 delta)^2)
    base = ct.choco_gossip_rounds(1e-3, 0.1, 1e-6)
    assert ct.choco_gossip_rounds(0.5e-3, 0.1, 1e-6) / base == pytest.approx(2, rel=1e-4)
    assert ct.choco_gossip_rounds(1e-3, 0.05, 1e-6) / base == pytest.approx(4, rel=1e-4)
    assert ct.choco_gossip_rounds(1e-3, 0.1, 1e-12) / base == pytest.approx(2, rel=1e-4)
    kw = {"mu": 1.0, "L": 2.0, "sigma2": 1.0, "G2": 1.0, "workers": 4}
    t = ct.choco_sgd_terms(steps=1000, delta=0.1, rho=0.5, **kw)["terms"]
    half_delta = ct.choco_sgd_terms(steps=1000, delta=0.05, rho=0.5, **kw)["terms"]
    half_rho = ct.choco_sgd_terms(steps=1000, delta=0.1, rho=0.25, **kw)["terms"]
    twice_T = ct.choco_sgd_terms(steps=2000, delta=0.1, rho=0.5, **kw)["terms"]
    assert half_delta["consensus"] / t["consensus"] == pytest.approx(4)  # (rho^2 delta)^-2
    assert half_rho["consensus"] / t["consensus"] == pytest.approx(16)
    assert t["consensus"] / twice_T["consensus"] == pytest.approx(4)  # 1/T^2
    assert t["sgd_noise"] / twice_T["sgd_noise"] == pytest.approx(2)  # 1/(nT), whatever the graph and Q
    assert half_delta["sgd_noise"] == half_rho["sgd_noise"] == t["sgd_noise"]


def test_delta_of_unbiased_and_refusals() -> None:
    assert ct.contraction_delta(None, 3.0) == pytest.approx(0.25)
    assert ct.contraction_delta(0.01, None) == 0.01
    with pytest.raises(ConfigError, match="delta"):
        ct.contraction_delta(None, None)
    with pytest.raises(ConfigError, match="spectral_gap"):
        ct.choco_gossip_rate(0.5, 0.0)
    with pytest.raises(ConfigError, match="delta"):
        ct.choco_gossip_gamma(1.5, 0.5, 1.0)
    with pytest.raises(ConfigError, match="W"):
        ct.mixing_beta(np.array([[0.5, 0.5], [0.0, 1.0]]))
    assert ct.bytes_ratio(100, 4) == 25 and ct.bytes_ratio(1, 0) == math.inf
    assert "no bound applies" in ct.averaging_bound_note(tau=4, error_feedback=True, biased=True)
    assert "Stich" in ct.averaging_bound_note(tau=1, error_feedback=True, biased=True)


def _theory(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["theory", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_choco_topk_ring(capsys) -> None:
    code, out, err = _theory(capsys, "--preset", "choco", "--compress", "topk:0.01", "--topology", "ring",
                             "--params", "1000", "--json")
    assert code == 0, err
    c = json.loads(out)["compression"]
    # topk:0.01 on d = 1000: k = 10, delta = k/d; payload 10 x (4 bytes + int16 index)
    assert c["delta"] == pytest.approx(10 / 1000) and c["omega"] is None and c["choco_delta"] == c["delta"]
    assert c["bytes_per_round"] == 2 * 2 * 10 * 6 and c["uncompressed_bytes_per_round"] == 2 * 2 * 1000 * 4
    assert c["bytes_ratio"] == pytest.approx(4000 / 60)
    W = mixing_matrix("ring", 8, "metropolis").matrix
    rho = 1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8))
    assert c["spectral_gap"] == pytest.approx(rho)
    assert c["gamma_theorem2"] == pytest.approx(ct.choco_gossip_gamma(0.01, rho, ct.mixing_beta(W)))
    assert c["gamma_run"] == pytest.approx(0.01)  # the default: delta
    assert c["gossip_rate"] == pytest.approx(rho**2 * 0.01 / 82)
    code, out, _ = _theory(capsys, "--preset", "choco", "--compress", "topk:0.01", "--topology", "ring")
    assert code == 0
    # d = 10^6 (the default --params): int32 indices, 8 bytes per kept coordinate against 4 per coordinate
    assert "Theorem 2" in out and "50x fewer" in out


def test_cli_unbiased_rate_terms_and_given_gamma(capsys) -> None:
    code, out, err = _theory(capsys, "--preset", "dpsgd", "--compress", "qsgd:4", "--consensus-step", "0.3",
                             "--params", "400", "--strong-convexity", "0.1", "--L", "1", "--sigma2", "2", "--G2", "5",
                             "--steps", "1000", "--json")
    assert code == 0, err
    c = json.loads(out)["compression"]
    omega = min(400 / 16, 20 / 4)  # min(d/S^2, sqrt(d)/S)
    assert c["omega"] == pytest.approx(omega) and c["choco_delta"] == pytest.approx(1 / (1 + omega))
    assert c["gamma_run"] == 0.3 and c["gamma_run_source"].startswith("given")
    r = c["choco_sgd"]
    assert r["terms"]["sgd_noise"] == pytest.approx(2 / (0.1 * 8 * 1000))


def test_cli_sign_reports_its_typical_delta_too(capsys) -> None:
    code, out, err = _theory(capsys, "--preset", "choco", "--compress", "sign", "--params", "100", "--json")
    assert code == 0, err
    c = json.loads(out)["compression"]
    assert c["delta"] == pytest.approx(1 / 100)  # the worst case
    t = c["sign_typical"]
    assert t["delta"] == pytest.approx(2 / math.pi)
    assert t["gamma_theorem2"] == pytest.approx(ct.choco_gossip_gamma(2 / math.pi, c["spectral_gap"], c["beta"]))
    assert c["gamma_run"] == pytest.approx(2 / math.pi)  # the default consensus step


def test_cli_averaging_bytes_and_bound(capsys) -> None:
    code, out, err = _theory(capsys, "--preset", "local_sgd", "--compress", "int8", "--params", "2048", "--json")
    assert code == 0, err
    c = json.loads(out)["compression"]
    # all-gather of 7 payloads (2048 int8 values + 2 float32 scales) against a float32 all-reduce (2 x 8192)
    assert c["bytes_per_round"] == 7 * (2048 + 2 * 4) and c["uncompressed_bytes_per_round"] == 2 * 2048 * 4
    assert c["error_feedback"] is True and "no bound applies" in c["bound"]
    assert "gamma_run" not in c


def test_cli_refusals(capsys) -> None:
    code, _, err = _theory(capsys, "--preset", "choco", "--compress", "powersgd:2")
    assert code == 2 and "compress" in err and len(err.strip().splitlines()) == 1
    code, _, err = _theory(capsys, "--preset", "choco", "--compress", "topk:2")
    assert code == 2 and "compress" in err
    code, _, err = _theory(capsys, "--preset", "choco", "--compress", "topk:0.1", "--strong-convexity", "1")
    assert code == 2 and "--G2" in err
    code, _, err = _theory(capsys, "--preset", "dpsgd", "--strong-convexity", "1", "--L", "1", "--sigma2", "1", "--G2", "1",
                           "--steps", "10")
    assert code == 2 and "--compress" in err
    code, _, err = _theory(capsys, "--preset", "choco", "--compress", "topk:0.1", "--strong-convexity", "2", "--L", "1", "--sigma2",
                           "1", "--G2", "1", "--steps", "10")
    assert code == 2 and "L=1.0 is invalid: must be >= mu = 2" in err
