"""Presets: structure (m, v, tau, matrices), closed forms, and clear errors for invalid arguments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from coopsgd.algorithms import AlgorithmSpec, MixContext, PeriodicSchedule, Policies, make_preset, presets
from coopsgd.errors import ConfigError, DivergenceWarning
from coopsgd.theory.spectral import zeta


def test_every_preset_builds_with_defaults() -> None:
    for name in presets.PRESETS:
        spec = make_preset(name, 8)
        assert isinstance(spec, AlgorithmSpec)
        assert spec.workers == 8
        assert spec.schedule.n == spec.nodes
        assert spec.describe()["name"] == name


def test_easgd_matrix_and_default_alpha() -> None:
    m = 8
    spec = presets.easgd(m, 2)
    assert spec.auxiliaries == 1 and spec.rule == "pre_mix" and spec.center == "auxiliary"
    assert spec.params["alpha"] == pytest.approx(2 / (m + 2))
    assert zeta(spec.theory_matrix) == pytest.approx(m / (m + 2))
    # beta = m * alpha (Zhang et al.'s parametrisation)
    assert presets.easgd(m, beta=0.9).params["alpha"] == pytest.approx(0.9 / m)


def test_easgd_alpha_beyond_limit_warns_or_raises_when_strict() -> None:
    with pytest.warns(DivergenceWarning):
        presets.easgd(8, alpha=0.25)
    with pytest.raises(ConfigError, match="alpha"):
        presets.easgd(8, alpha=0.25, strict=True)


def test_local_sgd_schedule_communicates_every_tau_steps() -> None:
    spec = presets.local_sgd(4, 3)
    fired = [k for k in range(12) if spec.schedule.mix(k, MixContext(step=k)) is not None]
    assert fired == [2, 5, 8, 11]
    np.testing.assert_allclose(spec.schedule.mix(2, MixContext(step=2)).matrix, np.full((4, 4), 0.25))


def test_time_varying_schedule_cycles_matrices() -> None:
    from coopsgd.topology import mixing_schedule

    mats = mixing_schedule("one_peer_exponential", 8)
    spec = presets.dpsgd(8, mixing=mats)
    got = [spec.schedule.mix(k, MixContext(step=k)).matrix for k in range(6)]
    for k in range(6):
        np.testing.assert_array_equal(got[k], mats[k % 3].matrix)
    assert spec.theory_matrix is None and spec.notes


def test_generalized_elastic_best_alpha_reduces_zeta() -> None:
    spec = presets.generalized_elastic(8, topology="ring")
    zw = spec.params["zeta_W"]
    assert zeta(spec.theory_matrix) == pytest.approx(8 * zw / (9 + zw))
    assert zeta(spec.theory_matrix) < zw


def test_hierarchical_layout() -> None:
    spec = presets.hierarchical(8, 2, groups=4, q=3)
    assert spec.auxiliaries == 4 and spec.nodes == 12
    ctx = MixContext(step=0)
    assert spec.schedule.mix(0, ctx) is None
    intra = spec.schedule.mix(1, ctx).matrix
    both = spec.schedule.mix(5, ctx).matrix
    # the intra-group round never couples different groups; the q*tau round does (aux 0 hears group 1)
    assert intra[2:4, 8].max() == 0.0 and intra[0:2, 8].min() > 0
    assert both[2:4, 8].min() > 0
    np.testing.assert_allclose(intra.sum(axis=0), 1.0)


def test_fedavg_samples_fraction_of_clients() -> None:
    spec = presets.fedavg(10, 2, fraction=0.3, seed=1)
    mask = spec.schedule.active(0)
    assert mask.sum() == 3
    assert np.array_equal(mask, spec.schedule.active(1))  # the same clients for the whole round


def test_lsgd_pull_matrix_is_column_stochastic() -> None:
    spec = presets.lsgd(4, 2, lam=0.5)
    mix = spec.schedule.mix(0, MixContext(step=0, lr=0.1, losses=np.array([3.0, 1.0, 2.0, 4.0])))
    assert mix.info["leader"] == 1
    np.testing.assert_allclose(mix.matrix.sum(axis=0), 1.0)
    assert not np.allclose(mix.matrix.sum(axis=1), 1.0)
    assert mix.communicates
    nxt = spec.schedule.mix(1, MixContext(step=1, lr=0.1, losses=np.array([0.0, 9, 9, 9])))
    assert not nxt.communicates and nxt.info["leader"] == 1  # the leader is only re-elected every tau steps


def test_spec_rejects_schedule_of_wrong_size() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        AlgorithmSpec(name="x", workers=3, auxiliaries=1, tau=1, schedule=PeriodicSchedule(1, [np.eye(3)]))


BAD = [
    (lambda: make_preset("gossip", 4), "preset"),
    (lambda: make_preset("sync", 0), "workers"),
    (lambda: make_preset("local_sgd", 4, tau=0), "tau"),
    (lambda: make_preset("local_sgd", 4, tau=2.5), "tau"),
    (lambda: make_preset("sync", 4, tau=2), "tau"),
    (lambda: presets.easgd(4, alpha=0.0), "alpha"),
    (lambda: presets.easgd(4, alpha=float("nan")), "alpha"),
    (lambda: presets.easgd(4, alpha=0.1, beta=0.4), "beta"),
    (lambda: presets.easgd(4, beta=-1.0), "beta"),
    (lambda: presets.dpsgd(6, topology="hypercube"), "workers"),
    (lambda: presets.dpsgd(4, topology="moebius"), "topology"),
    (lambda: presets.dpsgd(4, weights="magic"), "weights"),
    (lambda: presets.dpsgd(4, mixing=np.eye(3)), "mixing"),
    (lambda: presets.hierarchical(6, groups=4), "groups"),
    (lambda: presets.hierarchical(4, q=0), "q"),
    (lambda: presets.fedavg(4, fraction=0.0), "fraction"),
    (lambda: presets.fedavg(4, fraction=1.5), "fraction"),
    (lambda: presets.fedavg(3, sample_counts=[1, 2]), "sample_counts"),
    (lambda: presets.fedavg(3, sample_counts=[1, -2, 3]), "sample_counts"),
    (lambda: presets.lsgd(4, lam=-0.1), "lam"),
    (lambda: presets.lsgd(6, groups=4), "groups"),
    (lambda: presets.generalized_elastic(4, alpha="worst"), "alpha"),
    (lambda: presets.local_sgd(4, 2, warmup_steps=-1), "warmup_steps"),
    (lambda: Policies(buffers="average"), "buffers"),
    (lambda: Policies(optimizer_state="keep"), "optimizer_state"),
    (lambda: presets.sync(4).initial_state(np.zeros((3, 2))), "x0"),
]


@pytest.mark.parametrize("make,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_preset_arguments_name_the_field(make, field) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            make()
    assert field in str(info.value)
