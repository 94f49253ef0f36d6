"""``coopsgd compare --set compressed`` and ``--set compressed-lm`` (issue 23 item 5): the runs and settings they
expand to, and a reduced run of each whose bytes follow the payload sizes and whose cost figure is written."""

from __future__ import annotations

import json

import pytest

from coopsgd.cli import _compare_plan, build_parser, main


def plan(*argv: str):
    return _compare_plan(build_parser().parse_args(["compare", *argv]))


def test_compressed_set_expands_to_its_runs() -> None:
    _, runs = plan("--set", "compressed")
    cfg = dict(runs)
    got = {label: (c.algorithm.preset, c.communication.compress, c.communication.consensus_step, c.algorithm.tau)
           for label, c in runs}
    assert got == {
        "dpsgd": ("dpsgd", "none", None, None),
        "choco_topk": ("choco", "topk:0.01", 0.05, None),
        "choco_sign": ("choco", "sign", 0.1, None),
        "choco_int8": ("choco", "int8", None, None),
        "local_sgd": ("local_sgd", "none", None, 4),
        "local_sgd_int8": ("local_sgd", "int8", None, 4),
        "local_sgd_topk": ("local_sgd", "topk:0.01", None, 4),
    }
    for label in ("dpsgd", "choco_topk", "choco_sign", "choco_int8"):
        assert cfg[label].build_spec().params["topology"] == "ring"
    for c in cfg.values():
        assert (c.problem.model, c.problem.dataset, c.problem.model_args) == ("mlp", "mnist_bundled", {"hidden": [100]})
        assert (c.algorithm.workers, c.schedule.max_steps, c.communication.error_feedback) == (8, 400, "auto")
    spec = cfg["local_sgd_topk"].build_spec()
    assert spec.compressed is not None and spec.compressed.feedback(spec.compressed.compressor())  # EF: auto = on
    _, lm = plan("--set", "compressed-lm")
    assert [(label, c.algorithm.preset, c.communication.compress, c.problem.model) for label, c in lm] == [
        ("diloco", "diloco", "none", "lstm_lm"), ("diloco_topk", "diloco", "topk:0.01", "lstm_lm")]
    # flags override the set: --compress applies to every run that does not set its own
    _, runs = plan("--set", "compressed", "--compress", "fp16")
    assert {label: c.communication.compress for label, c in runs}["dpsgd"] == "fp16"


@pytest.mark.slow
def test_reduced_compressed_run(capsys, tmp_path) -> None:
    """Six steps of every run (the set's 8 workers and MLP of 79,510 parameters): the bytes of each run are its
    rounds times the payloads of the cost model."""
    out = tmp_path / "c"
    code = main(["compare", "--set", "compressed", "--max-steps", "6", "--eval-every", "3", "--eval-samples", "50",
                 "--out", str(out), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    res = data["results"]
    d = 784 * 100 + 100 + 100 * 10 + 10
    # a ring: each node sends 2 payloads and receives 2 per round; the clock charges the busiest node
    per_round = {"dpsgd": 2 * 2 * 4 * d, "choco_topk": 2 * 2 * 796 * (4 + 4), "choco_int8": 2 * 2 * (d + 78 * 4),
                 "choco_sign": 2 * 2 * ((d + 7) // 8 + 4)}
    for label, b in per_round.items():
        assert res[label]["communication_rounds"] == 6
        assert res[label]["bytes_sent"] == pytest.approx(6 * b), label
    assert res["local_sgd"]["communication_rounds"] == 1
    assert res["local_sgd_topk"]["bytes_sent"] == pytest.approx(7 * 796 * 8)  # an all-gather of 7 payloads
    assert res["local_sgd_topk"]["bytes_sent"] < res["local_sgd_int8"]["bytes_sent"] < res["local_sgd"]["bytes_sent"]
    assert data["cost_plot"] == str(out / "compare_cost.png") and (out / "compare_cost.png").stat().st_size > 1000


@pytest.mark.slow
def test_reduced_compressed_lm_run(capsys, tmp_path) -> None:
    out = tmp_path / "lm"
    code = main(["compare", "--set", "compressed-lm", "--workers", "2", "--max-steps", "4", "--tau", "2",
                 "--eval-every", "2", "--eval-samples", "4", "--batch-size", "2", "--out", str(out), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [res[n]["communication_rounds"] for n in ("diloco", "diloco_topk")] == [2, 2]
    assert 0 < res["diloco_topk"]["bytes_sent"] < res["diloco"]["bytes_sent"] / 20
