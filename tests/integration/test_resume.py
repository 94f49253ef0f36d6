"""Exact resume: stop at a step, resume from the checkpoint, end with bit-identical parameters."""

from __future__ import annotations

import json

import pytest
import torch

from coopsgd.cli import main
from coopsgd.errors import ConfigError, CoopSGDError
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.trainer import train

CASES = [
    ("local_sgd", {"tau": 3, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, "loop"),
    ("easgd", {"tau": 2}, "vmap"),
    ("lsgd", {"tau": 2, "lam": 0.2}, "loop"),
    ("fedavg", {"tau": 3, "fraction": 0.5}, "vmap"),
    ("dpsgd", {"topology": "ring", "momentum": 0.5, "optimizer_state": "mix"}, "loop"),
    # stopped after step 5: fragment 1's round (after step 5) is in flight, applied after step 6
    ("streaming_diloco", {"tau": 4, "fragments": 2, "fragment_delay": 1, "merge_alpha": 0.5, "compress": "int4"},
     "loop"),
]


@pytest.mark.parametrize("preset,kw,executor", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bit_identical(tmp_path, preset, kw, executor) -> None:
    common = {"preset": preset, "workers": 4, "model": "mlp", "batch_size": 16, "lr": 0.05, "seed": 3,
              "executor": executor, "eval_every": 5, **kw}
    full = train(RunConfig(**common, max_steps=14, out=str(tmp_path / "full")))
    # stop after 6 steps (the checkpoint written at the end), then continue to 14
    train(RunConfig(**common, max_steps=6, out=str(tmp_path / "part")))
    resumed = train(RunConfig(**common, max_steps=14, out=str(tmp_path / "part")), resume=tmp_path / "part")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["engine"] == b["engine"] == a["engine_state"]["engine"] == "simulate"
    sa, sb = a["engine_state"]["payload"], b["engine_state"]["payload"]
    assert torch.equal(sa["state"], sb["state"])  # tolerance 0
    assert sa["rounds"] == sb["rounds"]
    assert a["loader"]["epoch"] == b["loader"]["epoch"] and a["loader"]["batch"] == b["loader"]["batch"]
    assert resumed["communication_rounds"] == full["communication_rounds"]
    assert resumed["bytes_sent"] == full["bytes_sent"]
    assert resumed["peak_bytes_per_step"] == full["peak_bytes_per_step"] > 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 14


def test_cli_resume_from_periodic_checkpoint(capsys, tmp_path) -> None:
    base = ["run", "--preset", "local_sgd", "--workers", "2", "--tau", "2", "--executor", "loop", "--json"]
    assert main([*base, "--max-steps", "8", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--max-steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path / "b")]) == 0
    assert main(["run", "--resume", str(tmp_path / "b"), "--max-steps", "8", "--json"]) == 0
    capsys.readouterr()
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["engine_state"]["payload"]["state"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["engine_state"]["payload"]["state"]
    assert torch.equal(a, b)
    code = main(["run", "--resume", str(tmp_path / "b"), "--lr", "0.5"])
    assert code == 2 and "--lr" in capsys.readouterr().err


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path) -> None:
    cfg = RunConfig(preset="sync", workers=2, max_steps=2, out=str(tmp_path / "r"))
    train(cfg)
    ck = tmp_path / "r" / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    with pytest.raises(CoopSGDError, match="unreadable"):
        train(RunConfig(preset="sync", workers=2, max_steps=4), resume=ck)
    torch.save({"weights": torch.zeros(3)}, ck)
    with pytest.raises(CoopSGDError, match="not a coopsgd checkpoint"):
        train(RunConfig(preset="sync", workers=2, max_steps=4), resume=ck)
    with pytest.raises(ConfigError, match="checkpoint"):
        train(RunConfig(preset="sync", workers=2, max_steps=4), resume=tmp_path / "missing.pt")
