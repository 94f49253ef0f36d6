"""The engine contract (issue 12): one loop, one step signature, one NaN policy, one metrics schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.cli import main
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
    for eng in (sim, ref):
        assert isinstance(eng, Engine)
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
