"""``--device`` end to end on the CPU: explicit ``cpu`` equals the default exactly (simulator and reference
engine) and computes the algorithm (checked against the update written out by hand), the run directory
records it, and a device this machine lacks ends in one line naming the field.

The CUDA / MPS paths are not exercised here (no GPU on the test machines): see tests/unit/test_device.py
for their checks with CUDA faked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.cli import main
from coopsgd.engines.simulator import Simulator
from coopsgd.objectives import Quadratic
from coopsgd.train.config import RunConfig
from coopsgd.train.trainer import build, evaluate_model, train

SMALL = dict(workers=2, max_steps=6, batch_size=16, eval_samples=200, eval_every=3, seed=3)


def test_simulator_explicit_cpu_equals_default(tmp_path) -> None:
    a = train(RunConfig(**SMALL), out=tmp_path / "default")  # type: ignore[arg-type]
    b = train(RunConfig(**SMALL, device="cpu"), out=tmp_path / "cpu")  # type: ignore[arg-type]
    assert a["final"] == b["final"]
    assert a["communication_rounds"] == b["communication_rounds"]
    ma = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert json.loads((tmp_path / "cpu" / "config.json").read_text())["device"] == "cpu"


def test_simulator_state_lives_on_the_device() -> None:
    exp = build(RunConfig(**SMALL, device="cpu"))  # type: ignore[arg-type]
    assert exp.sim.device == torch.device("cpu")
    assert exp.sim.rows_params.device.type == "cpu"


def test_evaluate_model_moves_the_data_to_the_model() -> None:
    model = torch.nn.Linear(4, 3).to(torch.float64)
    x, y = torch.randn(10, 4, dtype=torch.float32), torch.randint(0, 3, (10,))
    res = evaluate_model(model, x, y, torch.nn.functional.cross_entropy, dtype=torch.float64, batch=4)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["loss"] > 0


def test_simulator_on_cpu_is_local_sgd_written_out_by_hand() -> None:
    """device="cpu" computes the algorithm: 5 steps of local SGD (3 workers, tau=2) on a linear softmax model
    equal the update written out here with autograd, worker by worker, averaging every second step."""
    m, tau, lr = 3, 2, 0.3
    torch.manual_seed(0)
    data = [[(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(m)] for _ in range(5)]

    def model() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Linear(4, 3)

    sim = Simulator(presets.local_sgd(m, tau), model, executor="loop", dtype=torch.float64, device="cpu")
    assert sim.params.device.type == "cpu" and sim.params.shape == (m, 15)
    net = model()
    X = torch.cat([net.weight.detach().flatten(), net.bias.detach()]).to(torch.float64).repeat(m, 1)
    assert torch.equal(sim.params, X)  # every worker starts from the model's initial weights
    for k, batches in enumerate(data):
        stats = sim.step(batches, lr)
        for i, (x, y) in enumerate(batches):
            theta = X[i].clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(x @ theta[:12].reshape(3, 4).T + theta[12:], y)
            X[i] = X[i] - lr * torch.autograd.grad(loss, theta)[0]
        if (k + 1) % tau == 0:
            X[:] = X.mean(dim=0)
        assert stats.communicated == ((k + 1) % tau == 0)
        torch.testing.assert_close(sim.params, X, rtol=0, atol=1e-14)
    assert not torch.equal(X[0], X[1])  # step 5 is local: the workers differ, so the check sees each row


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_device_cpu_simulate(capsys, tmp_path) -> None:
    common = ["run", "--workers", "2", "--max-steps", "12", "--eval-every", "4", "--batch-size", "16",
              "--eval-samples", "100", "--json"]
    assert main([*common, "--out", str(tmp_path / "s0")]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*common, "--device", "cpu", "--out", str(tmp_path / "s1")]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["status"] == "ok" and sim["engine"] == "simulate" and sim["communication_rounds"] == 3
    # explicit cpu is the default path, bit for bit, at every evaluation
    assert sim["final"] == default["final"]
    keys = ("step", "rounds", "train_loss", "test_loss", "test_accuracy", "worker_losses", "consensus_distance")
    recs = _records(tmp_path / "s1")
    assert [[r[k] for k in keys] for r in recs] == [[r[k] for k in keys] for r in _records(tmp_path / "s0")]
    # and it trained: 3 rounds of local SGD (tau=4), the losses go down at every evaluation
    assert [r["step"] for r in recs] == [0, 4, 8, 12] and [r["rounds"] for r in recs] == [0, 1, 2, 3]
    train_losses = [r["train_loss"] for r in recs]
    assert all(b < a for a, b in zip(train_losses[:-1], train_losses[1:], strict=True))
    assert recs[-1]["test_loss"] < recs[0]["test_loss"] and sim["final"]["train_loss"] == train_losses[-1]
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["device"] == "cpu"


def test_cli_device_cpu_reference_is_the_hand_written_update(capsys, tmp_path) -> None:
    """The reference engine on the quadratic F(x) = 1/m sum_i 1/2 (x - b_i)^T A (x - b_i) against local SGD
    written out here (x_i -= lr A (x_i - b_i); every tau steps every x_i becomes their mean), at every step."""
    m, tau, steps, lr, seed, dim = 4, 3, 30, 0.2, 5, 6
    ref = ["run", "--engine", "reference", "--objective", "quadratic", "--preset", "local_sgd", "--tau", str(tau),
           "--workers", str(m), "--steps", str(steps), "--lr", str(lr), "--seed", str(seed), "--dim", str(dim),
           "--heterogeneity", "1.0", "--json"]
    assert main([*ref, "--out", str(tmp_path / "r0")]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*ref, "--device", "cpu", "--out", str(tmp_path / "r1")]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert default["final"] == explicit["final"]
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["device"] == "cpu"
    q = Quadratic(dim, workers=m, heterogeneity=1.0, seed=seed)  # the problem: A and the workers' b_i

    def F(x: np.ndarray) -> float:
        return float(np.mean([0.5 * (x - b) @ q.A @ (x - b) for b in q.b]))

    X = np.tile(np.random.default_rng(seed).standard_normal(dim), (m, 1))  # the engine's start x0
    expected = []
    for k in range(steps + 1):
        if k:
            X = X - lr * (X - q.b) @ q.A
            if k % tau == 0:
                X[:] = X.mean(axis=0)
        consensus = float(np.sum((X - X.mean(axis=0)) ** 2) / m)
        expected.append((k, k // tau, F(X.mean(axis=0)), [F(x) for x in X], consensus))
    recs = _records(tmp_path / "r1")
    assert [r["step"] for r in recs] == list(range(steps + 1))
    for r, (k, rounds, train_loss, worker_losses, consensus) in zip(recs, expected, strict=True):
        assert r["rounds"] == rounds, k
        assert r["train_loss"] == pytest.approx(train_loss, rel=1e-12), k
        assert r["worker_losses"] == pytest.approx(worker_losses, rel=1e-12), k
        assert r["consensus_distance"] == pytest.approx(consensus, rel=1e-9, abs=1e-15), k
    assert explicit["final"]["train_loss"] == pytest.approx(expected[-1][2], rel=1e-12)
    assert recs[-2]["consensus_distance"] > 1e-3  # between rounds the workers differ: the b_i are not equal


BAD_DEVICES = [
    (["--device", "gpu"], "cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "cpu, cuda, cuda:N"),
    (["--engine", "reference", "--objective", "quadratic", "--device", "cuda"], "reference engine computes with numpy"),
    (["--engine", "distributed", "--device", "cuda:1"], "cuda:LOCAL_RANK"),
]
if not torch.cuda.is_available():
    BAD_DEVICES += [(["--device", "cuda"], "no CUDA device is visible"),
                    (["--engine", "distributed", "--workers", "2", "--device", "cuda"], "no CUDA device is visible")]
if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
    BAD_DEVICES += [(["--device", "mps"], "no MPS device")]


@pytest.mark.parametrize("flags,needle", BAD_DEVICES, ids=[" ".join(f) for f, _ in BAD_DEVICES])
def test_unavailable_device_is_one_line_naming_the_field(capsys, tmp_path, monkeypatch, flags, needle) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["run", *flags, "--max-steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "device=" in err and needle in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "runs").exists()
