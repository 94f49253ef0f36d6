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
    state = spec.schedule.init_state()
    mix, state = spec.schedule.advance(0, MixContext(step=0, lr=0.1, losses=np.array([3.0, 1.0, 2.0, 4.0])), state)
    assert mix.info["leader"] == 1
    np.testing.assert_allclose(mix.matrix.sum(axis=0), 1.0)
    assert not np.allclose(mix.matrix.sum(axis=1), 1.0)
    assert mix.communicates
    nxt, state = spec.schedule.advance(1, MixContext(step=1, lr=0.1, losses=np.array([0.0, 9, 9, 9])), state)
    assert not nxt.communicates and nxt.info["leader"] == 1  # the leader is only re-elected every tau steps
    assert not spec.schedule.wants_losses(1, state) and spec.schedule.wants_losses(2, state)


def test_schedules_are_pure() -> None:
    """Running a schedule never changes it: its run state lives outside the frozen spec."""
    spec = presets.lsgd(4, 2, lam=0.5)
    before = spec.schedule.init_state()
    spec.schedule.advance(0, MixContext(step=0, lr=0.1, losses=np.array([3.0, 1.0, 2.0, 4.0])), before)
    assert before == {"leaders": None, "global_leader": None} == spec.schedule.init_state()
    assert spec.schedule.wants_losses(1, before)


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


# -------------------------------------------------------------------------------------------------
# declarations: settings, data inputs and theory hooks declared once (issue 12, item 5)
# -------------------------------------------------------------------------------------------------


def test_every_preset_has_one_declaration_matching_its_function() -> None:
    import inspect

    from coopsgd.algorithms.registry import declarations

    decls = declarations()
    assert list(decls) == list(presets.PRESETS)
    for name, decl in decls.items():
        assert presets.PRESETS[name] is decl.build
        sig = inspect.signature(decl.build).parameters
        for arg in decl.args:
            if arg.kind == "derived":
                assert arg.name not in sig
                continue
            # the declared default is the function's default (help text and docs cannot drift)
            assert sig[arg.name].default == arg.default, (name, arg.name)


def test_run_config_fields_match_the_declared_settings() -> None:
    """Every declared preset setting has a field of the algorithm section (declared ``preset=True``) and vice
    versa."""
    from coopsgd.algorithms.registry import settings_table
    from coopsgd.train.config import config_settings

    declared = settings_table()
    marked = {s.key: s for _, s in config_settings() if s.info.preset}
    assert set(marked) == set(declared), (
        f"declared but no RunConfig field: {sorted(set(declared) - set(marked))}; "
        f"RunConfig field but not declared: {sorted(set(marked) - set(declared))}"
    )
    unmarked = {s.key for _, s in config_settings() if not s.info.preset}
    assert not unmarked & set(declared)
    for name, arg in declared.items():  # the field's type is the declared one (optional unless a switch)
        assert marked[name].kind is arg.type and marked[name].optional is (arg.type is not bool), name
        assert marked[name].default == (False if arg.type is bool else None), name


def test_settings_shared_by_presets_agree_in_type_and_kind() -> None:
    from coopsgd.algorithms.registry import declarations

    seen: dict[str, tuple[type, str]] = {}
    for decl in declarations().values():
        for arg in decl.args:
            assert seen.setdefault(arg.name, (arg.type, arg.kind)) == (arg.type, arg.kind), arg.name


def test_spec_kwargs_come_from_the_declarations() -> None:
    from coopsgd.train import RunConfig

    kw = RunConfig(preset="easgd", tau=2, alpha=0.1, nonblocking=True, strict=True).spec_kwargs()
    assert {k: kw[k] for k in ("tau", "alpha", "nonblocking", "strict")} == {
        "tau": 2, "alpha": 0.1, "nonblocking": True, "strict": True}
    assert "seed" not in kw and isinstance(kw["policies"], Policies)
    kw = RunConfig(preset="hierarchical", aux_topology="ring", aux_weights="uniform", groups=4, seed=3).spec_kwargs()
    assert kw["aux_topology"] == "ring" and kw["aux_weights"] == "uniform" and "seed" not in kw
    assert make_preset("hierarchical", 8, **kw).params["aux_topology"] == "ring"
    assert RunConfig(preset="dpsgd", seed=7).spec_kwargs()["seed"] == 7
    with pytest.raises(ConfigError, match="alpha.*'dpsgd' does not take"):
        RunConfig(preset="dpsgd", alpha=0.1).spec_kwargs()
    assert "alpha" not in RunConfig(preset="dpsgd", alpha=0.1).spec_kwargs(lenient=True)
    with pytest.raises(ConfigError, match="nonblocking"):
        RunConfig(preset="local_sgd", nonblocking=True).spec_kwargs()
    # local_epochs: only fedavg, never together with tau
    with pytest.raises(ConfigError, match="local_epochs"):
        RunConfig(preset="local_sgd", local_epochs=1.0)
    with pytest.raises(ConfigError, match="local_epochs"):
        RunConfig(preset="fedavg", local_epochs=1.0, tau=3)
    with pytest.raises(ConfigError, match="local_epochs"):
        RunConfig(preset="fedavg", local_epochs=0.0)
    assert "local_epochs" not in RunConfig(preset="fedavg", local_epochs=2.0).spec_kwargs()


def test_spec_from_settings_applies_data_inputs() -> None:
    from coopsgd.algorithms import spec_from_settings

    sizes = [10, 20, 30, 40]
    spec = spec_from_settings("fedavg", 4, {"fraction": 0.5, "local_epochs": 1.5, "lam": None}, shard_sizes=sizes,
                              steps_per_epoch=3, seed=2)
    assert spec.tau == max(1, round(1.5 * 3)) == 4  # tau = max(1, round(local_epochs * steps_per_epoch))
    np.testing.assert_array_equal(spec.schedule.sample_counts, sizes)
    assert spec.params["seed"] == 2 and spec.params["fraction"] == 0.5
    assert spec_from_settings("fedavg", 4, {"local_epochs": 0.01}, steps_per_epoch=3).tau == 1
    # without data facts: equal client weights, and tau from the settings
    plain = spec_from_settings("fedavg", 4, {"tau": 3})
    assert plain.tau == 3 and np.all(plain.schedule.sample_counts == 1)
    with pytest.raises(ConfigError, match="local_epochs"):
        spec_from_settings("fedavg", 4, {"local_epochs": 1.0})  # needs steps_per_epoch
    # presets without data inputs ignore the facts
    assert spec_from_settings("local_sgd", 4, {"tau": 2}, shard_sizes=sizes, steps_per_epoch=3).tau == 2
    # a setting the preset does not take: an error naming it and the preset, or dropped when lenient
    with pytest.raises(ConfigError) as info:
        spec_from_settings("sync", 4, {"tau": 2})
    assert "tau" in str(info.value) and "'sync'" in str(info.value)
    assert spec_from_settings("sync", 4, {"tau": 2, "local_epochs": 1.0}, lenient=True).tau == 1
    with pytest.raises(ConfigError, match="preset"):
        spec_from_settings("gossip", 4, {})
    with pytest.raises(ConfigError, match="fraction"):
        spec_from_settings("fedavg", 4, {"fraction": 2.0})
    pol = Policies(buffers="local")
    assert spec_from_settings("sync", 2, {}, policies=pol).policies is pol


def test_cli_flags_and_help_come_from_the_declarations() -> None:
    from coopsgd.algorithms.registry import declarations, settings_table
    from coopsgd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("theory", "run", "compare"):
        p = sub.choices[command]
        flags = {s: a for a in p._actions for s in a.option_strings}
        for name, arg in settings_table().items():
            if command == "theory" and arg.kind == "derived":
                assert arg.flag not in flags  # needs the data: run / compare only
                continue
            assert arg.flag in flags, (command, arg.flag)
            help_ = flags[arg.flag].help
            assert arg.help.replace("%", "%%") in help_
            for preset_name, a in [(n, d.arg(name)) for n, d in declarations().items() if d.takes(name)]:
                assert f"{preset_name} ({a.default_str()})" in help_
            if arg.choices:
                assert ", ".join(arg.choices) in help_
        if command != "compare":
            assert all(n in flags["--preset"].help for n in declarations())
    assert "in (0, 1]" in sub.choices["theory"]._option_string_actions["--budget"].help


def test_analysis_has_no_preset_names() -> None:
    """The preset-specific parts of `coopsgd theory` come from the declarations' theory hooks."""
    import inspect

    import coopsgd.analysis

    source = inspect.getsource(coopsgd.analysis)
    for name in presets.PRESETS:
        assert f'"{name}"' not in source and f"'{name}'" not in source, name


def test_a_new_declaration_gets_a_flag_a_spec_and_theory(monkeypatch, capsys) -> None:
    """One declaration is all a preset needs: a CLI flag, spec_from_settings and its theory entries."""
    import json

    from coopsgd.algorithms import registry
    from coopsgd.cli import main

    def toy(workers: int, tau: int = 3, *, knob: float = 0.5, policies: Policies | None = None) -> AlgorithmSpec:
        spec = presets.local_sgd(workers, tau, policies=policies)
        import dataclasses

        return dataclasses.replace(spec, name="toy", params={"knob": knob})

    def facts(spec, out, notes):
        out["twice_knob"] = 2 * spec.params["knob"]

    decl = registry.PresetDecl("toy", toy, "a test preset", args=(
        registry.PresetArg("tau", int, 3, help="communication period tau: local steps between rounds", low=1),
        registry.PresetArg("knob", float, 0.5, help="a knob", low=0.0, high=1.0)),
        theory=(registry.TheoryHook("toy", facts=facts),))
    monkeypatch.setitem(registry._REGISTRY, "toy", decl)
    monkeypatch.setitem(presets.PRESETS, "toy", toy)
    assert registry.spec_from_settings("toy", 4, {"knob": 0.25}).params == {"knob": 0.25}
    with pytest.raises(ConfigError, match="knob"):
        registry.spec_from_settings("toy", 4, {"knob": 2.0})
    assert main(["theory", "--preset", "toy", "--workers", "4", "--knob", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["twice_knob"] == 0.5 and out["zeta"] < 1e-12 and "zeta_tau" not in out
    assert main(["theory", "--preset", "local_sgd", "--knob", "0.25"]) == 2
    assert "--knob" in capsys.readouterr().err
