"""The engine contract (issue 12): one loop, one step signature, one NaN policy, one metrics schema."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import types
import typing
from typing import Any, Protocol

import numpy as np
import pytest
import torch

import coopsgd.engines
from coopsgd.algorithms import presets
from coopsgd.cli import main
from coopsgd.engines import base
from coopsgd.engines.base import Engine, StepStats
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.objectives import make_objective
from coopsgd.train import RunConfig
from coopsgd.train.trainer import TIME_KEYS, build, iterate


@pytest.mark.slow
def test_fedavg_partial_participation_survives_skipped_rounds(capsys) -> None:
    """The command of issue 12: FedAvg with half the clients and a diverging lr under nan_policy=skip."""
    cfg = RunConfig(preset="fedavg", fraction=0.5, workers=8, tau=2, model="mlp", dataset="mnist_bundled", lr=10.0,
                    nan_policy="skip", max_skips=50, max_steps=60, executor="loop")
    exp = build(cfg)
    fed: list[tuple[int, list[bool]]] = []
    orig = exp.sim.step

    def spy(batches, lr):
        fed.append((exp.sim.step_count, [b is not None for b in batches]))
        return orig(batches, lr)

    exp.sim.step = spy
    records = list(iterate(exp))
    # the loop and the engine count the same steps, and every step feeds exactly the sampled clients
    assert [k for k, _ in fed] == list(range(60)) and exp.sim.step_count == 60
    for k, given in fed:
        assert given == exp.spec.schedule.active(k).tolist(), k
        assert sum(given) == 4
    assert records[-1]["step"] == 60 and records[-1]["rounds"] == 30
    dropped = records[-1]["dropped_rounds"]
    assert dropped, "lr=10 diverges: some rounds must have been dropped"
    for d in dropped:  # a dropped round names only clients that were sampled in it
        assert (d["step"] + 1) % 2 == 0
        assert set(d["workers"]) <= set(np.flatnonzero(exp.spec.schedule.active(d["step"])).tolist())
    # and the CLI command itself ends normally
    code = main(["run", "--preset", "fedavg", "--fraction", "0.5", "--workers", "8", "--tau", "2", "--model", "mlp",
                 "--dataset", "mnist_bundled", "--lr", "10", "--nan-policy", "skip", "--max-skips", "50",
                 "--max-steps", "60", "--executor", "loop", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["status"] == "ok" and out["communication_rounds"] == 30


def test_the_same_spec_twice_gives_identical_runs() -> None:
    """Schedules keep no run state: a spec object run twice from a fresh start repeats itself exactly."""
    spec = presets.lsgd(4, 2, lam=0.3)
    torch.manual_seed(0)
    data = [[(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(4)] for _ in range(6)]

    def model():
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    runs = []
    for _ in range(2):
        sim = Simulator(spec, model, executor="loop", dtype=torch.float64, loss_estimate="batch")
        for batches in data:
            sim.step(batches, 0.1)
        runs.append((sim.params.clone(), sim.leader, sim.schedule_state))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert spec.schedule.init_state() == {"leaders": None, "global_leader": None}
    obj = make_objective("quadratic", dim=5, workers=4, seed=1)
    ref = []
    for _ in range(2):
        eng = ReferenceEngine(spec, obj, seed=2)
        for _ in range(7):
            eng.step(None, 0.05)
        ref.append(eng.state.copy())
    assert np.array_equal(ref[0], ref[1])


def test_every_engine_implements_the_contract() -> None:
    spec = presets.local_sgd(2, 2)
    sim = Simulator(spec, lambda: torch.nn.Linear(3, 2), executor="loop")
    ref = ReferenceEngine(spec, make_objective("quadratic", dim=3, workers=2))
    for eng in (sim, ref):  # every member, with its signature: not just the names isinstance() looks at
        assert protocol_mismatches(eng, Engine) == [], type(eng).__name__
    assert protocol_mismatches(sim, base.ModelEngine) == []
    st = sim.step([(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 2, 0.1)
    rt = ref.step(None, 0.1)
    assert type(st) is type(rt) is StepStats and st.losses.shape == rt.losses.shape == (2,)
    # one state envelope: it says which engine wrote it and loads only there
    assert sim.state_dict()["engine"] == "simulate" and ref.state_dict()["engine"] == "reference"
    with pytest.raises(Exception, match="written by the 'reference' engine"):
        sim.load_state_dict(ref.state_dict())
    again = ReferenceEngine(spec, make_objective("quadratic", dim=3, workers=2))
    again.load_state_dict(ref.state_dict())
    assert np.array_equal(again.step(None, 0.1).losses, ref.step(None, 0.1).losses)


# ---------------------------------------------------------------------------------------------------------
# protocol conformance by signature: a runtime-checkable Protocol's isinstance() sees member names only
# ---------------------------------------------------------------------------------------------------------


def protocol_members(proto: type) -> dict[str, tuple[str, Any]]:
    """``name -> (kind, member)`` of a Protocol and the protocols it extends: ``"method"`` (the function),
    ``"property"`` or ``"data"`` (an annotated attribute; the member is its annotation)."""
    members: dict[str, tuple[str, Any]] = {}
    for klass in reversed(proto.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass in (Protocol, typing.Generic):
            continue
        for name in vars(klass).get("__annotations__", {}):
            members[name] = ("data", typing.get_type_hints(klass)[name])
        for name, value in vars(klass).items():
            if isinstance(value, property):
                members[name] = ("property", value)
            elif inspect.isfunction(value) and not name.startswith("_"):
                members[name] = ("method", value)
    return members


def _hints(fn: Any) -> dict[str, Any]:
    """The resolved annotations of ``fn``; the source strings where one cannot be resolved."""
    try:
        return typing.get_type_hints(fn)
    except NameError:
        return {k: str(v) for k, v in getattr(fn, "__annotations__", {}).items()}


def signature_mismatches(spec: Any, impl: Any) -> list[str]:
    """How ``impl``'s signature differs from the protocol method ``spec``'s: every parameter of the protocol
    with the same name, kind (positional, keyword-only, ...), position, annotation and default (any default
    for ``...``); extra parameters only with a default; the same return annotation (unless the protocol's
    is ``Any``, or ``impl`` returns a subclass)."""
    sp, ip = inspect.signature(spec).parameters, inspect.signature(impl).parameters
    found: list[str] = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    s_pos = [p for p in sp.values() if p.kind in positional]
    i_pos = [p for p in ip.values() if p.kind in positional]
    if [(p.name, p.kind) for p in s_pos] != [(p.name, p.kind) for p in i_pos[: len(s_pos)]]:
        found.append(f"positional parameters {[p.name for p in i_pos]}, protocol {[p.name for p in s_pos]}")
    sh, ih = _hints(spec), _hints(impl)
    for name, p in sp.items():
        q = ip.get(name)
        if q is None:
            found.append(f"no parameter {name!r}")
            continue
        if q.kind != p.kind:
            found.append(f"{name!r} is {q.kind.description}, protocol: {p.kind.description}")
        if p.default is not inspect.Parameter.empty:
            if q.default is inspect.Parameter.empty:
                found.append(f"{name!r} has no default, protocol: {p.default!r}")
            elif p.default is not Ellipsis and q.default != p.default:
                found.append(f"{name!r} defaults to {q.default!r}, protocol: {p.default!r}")
        if name in sh and sh[name] is not Any and ih.get(name) != sh[name]:
            found.append(f"{name!r} annotated {ih.get(name)!r}, protocol: {sh[name]!r}")
    for name, q in ip.items():
        if name not in sp and q.default is inspect.Parameter.empty and q.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            found.append(f"extra parameter {name!r} without a default")
    want, got = sh.get("return", Any), ih.get("return")
    if want is not Any and got != want and not (isinstance(got, type) and isinstance(want, type)
                                                 and issubclass(got, want)):
        found.append(f"returns {got!r}, protocol: {want!r}")
    return found


def _is_instance(value: Any, hint: Any) -> bool | None:
    """``isinstance(value, hint)`` for a class or a union of classes; ``None`` where that cannot be decided."""
    if isinstance(hint, type):
        return isinstance(value, hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_is_instance(value, h) for h in typing.get_args(hint)]
        return None if None in parts else any(parts)
    return None


def protocol_mismatches(obj: Any, proto: type) -> list[str]:
    """Every way ``obj`` (an instance, or a class: then data members are not checked) fails ``proto``."""
    cls = obj if isinstance(obj, type) else type(obj)
    found: list[str] = []
    for name, (kind, member) in protocol_members(proto).items():
        where = f"{cls.__name__}.{name}"
        attr = inspect.getattr_static(cls, name, None)
        if kind == "method":
            if not callable(attr):
                found.append(f"{where}: not a method")
            else:
                found += [f"{where}: {m}" for m in signature_mismatches(member, getattr(cls, name))]
        elif kind == "property":
            if attr is None and not isinstance(obj, type):
                attr = getattr(obj, name, None)  # an attribute set per instance
            if attr is None or (callable(attr) and not isinstance(attr, property)):
                found.append(f"{where}: not an attribute or property")
        elif not isinstance(obj, type):
            if not hasattr(obj, name):
                found.append(f"{where}: missing")
            elif _is_instance(getattr(obj, name), member) is False:
                found.append(f"{where}: {getattr(obj, name)!r} is not a {member}")
    return found


def engine_package_classes() -> list[type]:
    """Every class defined in a module of :mod:`coopsgd.engines` (however the package is laid out)."""
    classes: dict[str, type] = {}
    for info in pkgutil.walk_packages(coopsgd.engines.__path__, "coopsgd.engines."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and not getattr(cls, "_is_protocol", False):
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


def implementations(proto: type) -> list[type]:
    """The classes of the engines package that name every method and property of ``proto`` (what
    ``isinstance`` would accept), or declare it as a base."""
    names = {n for n, (kind, _) in protocol_members(proto).items() if kind != "data"}
    return [c for c in engine_package_classes()
            if proto in c.__mro__ or names <= {n for n in dir(c) if not n.startswith("__")}]


def test_every_protocol_implementation_has_the_protocols_signatures() -> None:
    """The engines (Engine, ModelEngine) and every communicator the package holds (Communicator: the
    in-process one and the torch.distributed one) implement each protocol member with its signature."""
    found = {p.__name__: {c.__name__ for c in implementations(p)} for p in (Engine, base.ModelEngine,
                                                                          base.Communicator)}
    assert {"Simulator", "ReferenceEngine", "DistributedEngine"} <= found["Engine"], found
    assert {"Simulator", "DistributedEngine"} <= found["ModelEngine"], found
    assert len(found["Communicator"]) >= 2, found  # in-process and torch.distributed
    for proto in (Engine, base.ModelEngine, base.Communicator):
        for cls in implementations(proto):
            assert protocol_mismatches(cls, proto) == [], f"{cls.__module__}.{cls.__qualname__}"


def test_the_signature_check_sees_what_isinstance_does_not() -> None:
    """A class with every name of the Engine protocol passes isinstance(); each wrong signature is reported."""

    class Fake:
        name, spec, step_count, rounds, leader, schedule_state = "fake", None, 0, 0, None, {}
        local_workers, is_writer = (0,), True

        def step(self, batch: list, lr: float) -> dict:  # renamed and mistyped parameter, other return
            return {}

        def check_health(self, strict: bool) -> None: ...  # an extra parameter without a default

        def finish(self, *, now: bool = True) -> None: ...  # an extra keyword with a default: fine

        def center_node(self) -> int | None: ...

        def reduce_losses(self, sums: np.ndarray, *, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

        def state_dict(self) -> dict[str, Any]: ...

        load_state_dict = "load"  # not a method

    assert isinstance(Fake(), Engine)
    problems = protocol_mismatches(Fake(), Engine)
    expected = ["Fake.step: positional parameters", "Fake.step: no parameter 'batches'",
                "Fake.step: returns", "Fake.check_health: extra parameter 'strict'", "Fake.reduce_losses: "
                "positional parameters", "Fake.reduce_losses: 'counts' is keyword-only",
                "Fake.load_state_dict: not a method", "Fake.spec: None is not a"]
    for needle in expected:
        assert any(p.startswith(needle) for p in problems), (needle, problems)
    assert not any(p.startswith(("Fake.finish", "Fake.center_node", "Fake.state_dict")) for p in problems)


def test_simulator_and_reference_records_share_the_time_keys(tmp_path) -> None:
    from coopsgd.train.trainer import train, train_reference

    train(RunConfig(preset="local_sgd", workers=2, tau=2, max_steps=4, model="mlp", executor="loop",
                    out=str(tmp_path / "sim")))
    train_reference(RunConfig(engine="reference", preset="local_sgd", workers=2, tau=2, max_steps=4,
                              objective="quadratic", out=str(tmp_path / "ref")))
    for name, source in (("sim", "simulated"), ("ref", "simulated")):
        rec = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert set(TIME_KEYS) <= set(rec) and rec["time_source"] == source and rec["time_s"] == rec["simulated_time_s"]


@pytest.mark.slow
def test_distributed_metrics_have_the_simulators_keys(tmp_path) -> None:
    from coopsgd.train.distributed import run_distributed
    from coopsgd.train.trainer import train

    common = {"preset": "easgd", "workers": 2, "tau": 2, "max_steps": 4, "model": "mlp", "eval_every": 2,
              "eval_samples": 100}
    train(RunConfig(**common, executor="loop", out=str(tmp_path / "sim")))
    summary = run_distributed(RunConfig(**common), out=tmp_path / "dist", timeout_s=30)
    sim = [json.loads(x) for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    dst = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sim] == [r["step"] for r in dst] == [0, 2, 4]
    for a, b in zip(sim, dst, strict=True):
        assert set(a) == set(b)
    last = dst[-1]
    # measured time is never filed as simulated time
    assert last["simulated_time_s"] is None and last["time_source"] == "measured"
    assert last["time_s"] == last["measured_train_s"] > 0
    assert summary["simulated_time_s"] is None and summary["time_source"] == "measured"
    simsum = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert set(simsum) <= set(summary) | {"executor"}


@pytest.mark.slow
def test_distributed_max_skips_stops_the_run(capsys, tmp_path) -> None:
    """The command of issue 12: a diverging lr under skip must stop after max_skips rounds, not exit 0."""
    code = main(["run", "--engine", "distributed", "--workers", "4", "--lr", "1e6", "--nan-policy", "skip",
                 "--max-skips", "5", "--max-steps", "40", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code != 0
    assert "max_skips=5" in err and "5 rounds in a row dropped already" in err
    assert "worker" in err and "at step" in err
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["status"] == "diverged"


@pytest.mark.parametrize("flags,field", [
    (["--model", "vgg16"], "input_shape"),
    (["--batch-size", "5000"], "batch_size"),
    (["--timeout-s", "1e300"], "timeout_s"),
])
def test_distributed_bad_input_is_refused_before_any_process_starts(capsys, monkeypatch, flags, field) -> None:
    """The parent builds and checks the whole problem: one line, exit 2, no rank started."""
    import coopsgd.train.distributed as runner

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started for a bad input")

    monkeypatch.setattr(runner, "launch", no_launch)
    code = main(["run", "--engine", "distributed", "--workers", "2", "--max-steps", "2", *flags, "--out", "d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("coopsgd: error:") and field in err[0]
