"""``--device`` end to end on the CPU: explicit ``cpu`` equals the default exactly (simulator and reference
engine), the run directory records it, and a device this machine lacks ends in one line naming the field.

The CUDA / MPS paths are not exercised here (no GPU on the test machines): see tests/unit/test_device.py
for their checks with CUDA faked.
"""

from __future__ import annotations

import json

import pytest
import torch

from coopsgd.cli import main
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


def test_cli_device_cpu_simulate_and_reference(capsys, tmp_path) -> None:
    common = ["--workers", "2", "--max-steps", "4", "--batch-size", "16", "--eval-samples", "100", "--json"]
    assert main(["run", *common, "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["status"] == "ok" and sim["engine"] == "simulate"
    ref = ["run", "--engine", "reference", "--objective", "quadratic", "--workers", "4", "--steps", "30", "--json"]
    assert main([*ref, "--out", str(tmp_path / "r0")]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main([*ref, "--device", "cpu", "--out", str(tmp_path / "r1")]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert default["final"] == explicit["final"]
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["device"] == "cpu"


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
