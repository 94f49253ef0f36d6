"""`coopsgd reproduce NAME --dry-run`: two steps of every full-scale experiment on synthetic data of the real
shapes, through the full-scale models, partitions, lr schedule, checkpoint, figures, result.json and report.

The slow test runs `reproduce all --dry-run` in process with the private hooks
:data:`coopsgd.experiments.dry_run.DRY_RUN_BATCH` = 2 and ``DRY_RUN_WORKERS`` = 2 (VGG-16 at 8 workers x batch 128
costs about 3 s per worker-step on a 2-core CPU, plus a 0.5 GB checkpoint per setting). Everything else -- models,
vocabulary, lr, schedule, presets, topologies -- is the full scale's; the CLI itself never shrinks anything, and
the fast test below checks the real 8 x 128 configuration.
"""

from __future__ import annotations

import json

import pytest

from coopsgd.cli import main
from coopsgd.errors import ConfigError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BAD = [
    (["reproduce", "csgd-fig5", "--dry-run", "--quick"], "--quick=True is invalid: cannot be combined with --dry-run"),
    (["reproduce", "lsgd-toy", "--dry-run"], "--dry-run=True is invalid: lsgd-toy has no full scale"),
    (["reproduce", "matrix-completion", "--dry-run"], "--dry-run=True is invalid: matrix-completion has no full"),
    (["reproduce", "report", "somewhere", "--dry-run"], "--dry-run=True is invalid: `reproduce report DIR`"),
    (["reproduce", "csgd-fig3", "--all-settings"], "--all-settings=True is invalid: only a --dry-run"),
    (["reproduce", "csgd-fig3", "--dry-run", "--seeds", "2"], "--seeds=2 is invalid: a --dry-run runs one seed"),
    (["reproduce", "all", "--dry-run", "--quick"], "--quick=True is invalid"),
    (["reproduce", "lsgd-toy", "--device", "cuda"], "--device='cuda' is invalid: lsgd-toy computes with numpy"),
    (["reproduce", "csgd-fig3", "--device", "tpu"], "--device='tpu' is invalid: choose cpu, cuda"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_dry_run_bad_combinations_give_one_line(capsys, tmp_path, argv, needle) -> None:
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path / "o")) if argv[1] != "report" else run_cli(
        capsys, *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_reproduce_device_reaches_every_full_scale_config() -> None:
    from coopsgd.experiments.csgd import base_config
    from coopsgd.experiments.harness import DEVICE

    assert base_config(False, 0).execution.device == "cpu"
    token = DEVICE.set("cuda")  # as `reproduce --device cuda` sets it (RunConfig checks the device when built)
    try:
        import torch

        if torch.cuda.is_available():
            assert base_config(False, 0, dry_run=True).execution.device == "cuda"
        else:
            with pytest.raises(ConfigError, match="no CUDA device"):
                base_config(False, 0, dry_run=True)
    finally:
        DEVICE.reset(token)


def test_dry_run_fields_keep_the_full_scale_and_compress_the_lr_schedule() -> None:
    from coopsgd.experiments.csgd import FULL, base_config
    from coopsgd.experiments.dry_run import DRY_RUN_BATCH, DRY_RUN_STEPS
    from coopsgd.train.trainer import lr_at

    cfg = base_config(False, 0, dry_run=True, preset="local_sgd", tau=4)
    assert (cfg.problem.model, cfg.algorithm.workers, cfg.problem.batch_size, cfg.schedule.lr) == ("vgg16", 8, 128, 0.4)
    assert cfg.problem.dataset == "synthetic_cifar" and cfg.schedule.max_steps == DRY_RUN_STEPS == 2
    # 2,048 synthetic samples / 8 workers / batch 128 = 2 steps per epoch: the run is 1 epoch long, and the
    # paper's decays at epochs 100 and 150 of 200 fall at 1/2 and 3/4 of it
    assert cfg.schedule.lr_decay_epochs == pytest.approx([e / FULL["epochs"] for e in FULL["lr_decay_epochs"]])
    assert [lr_at(cfg, k, 2, 0.0) for k in range(2)] == pytest.approx([0.4, 0.04])
    assert cfg.output.checkpoint_every == 1 and cfg.evaluation.eval_every == 1 and cfg.evaluation.eval_samples == 4 * 128
    token = DRY_RUN_BATCH.set(4)  # the test hook: 2048 / 8 / 4 = 64 steps per epoch, same fractions
    try:
        small = base_config(False, 0, dry_run=True, preset="local_sgd")
    finally:
        DRY_RUN_BATCH.reset(token)
    assert small.problem.batch_size == 4
    assert [lr_at(small, k, 64, 0.0) for k in range(2)] == pytest.approx([0.4, 0.04])


#: Settings a default dry run runs: fig3 one point, fig4 the first alpha + non-blocking, fig5 one (tau, lr),
#: fig6 its three methods, lsgd-nets 4 methods x 2 nets, lsgd-lstm 4 methods, fl-strategies 8 MLP + 3 LSTM runs.
SETTINGS = {"csgd-fig3": 1, "csgd-fig4": 2, "csgd-fig5": 1, "csgd-fig6": 3, "lsgd-nets": 8, "lsgd-lstm": 4,
            "fl-strategies": 11}


@pytest.mark.slow
def test_reproduce_all_dry_run_smoke_tests_every_full_scale_experiment(capsys, tmp_path) -> None:
    from coopsgd.experiments.dry_run import DRY_RUN_BATCH, DRY_RUN_WORKERS

    token, workers = DRY_RUN_BATCH.set(2), DRY_RUN_WORKERS.set(2)
    try:
        code, out, err = run_cli(capsys, "reproduce", "all", "--dry-run", "--out", str(tmp_path))
        _check_dry_run_all(tmp_path, code, out, err)
    finally:
        DRY_RUN_BATCH.reset(token)
        DRY_RUN_WORKERS.reset(workers)
        for ckpt in tmp_path.rglob("checkpoint.pt"):  # ~0.5 GB per VGG-16 setting: not kept in pytest's tmp
            ckpt.unlink()


def _check_dry_run_all(tmp_path, code: int, out: str, err: str) -> None:
    from coopsgd.experiments.dry_run import WIKITEXT2_VOCAB
    from coopsgd.train.rundir import read_run_json

    assert code == 0, err
    lines = out.splitlines()
    assert "lsgd-toy, matrix-completion, choco have no full scale" in lines[0]
    assert sum("checkpoint.pt at step 2 reloaded" in line for line in lines) == sum(SETTINGS.values())
    for name, n in SETTINGS.items():
        data = json.loads((tmp_path / name / "result.json").read_text())
        assert data["dry_run"] and not data["quick"] and data["seeds"] == [0]
        assert data["claims"] == [] and data["paper_table"] == []  # two steps decide nothing
        runs = data["per_seed"][0]["runs"]
        assert len(runs) == n
        assert all(r["dry_run_checkpoint_step"] == 2 and r["diverged"] is None for r in runs)
        assert data["plots"] and all((tmp_path / name / p.split("/")[-1]).stat().st_size > 1000 for p in data["plots"])
        assert any(line.startswith(f"{name} dry run: 2 steps per setting") for line in lines)
    fig5 = json.loads((tmp_path / "csgd-fig5" / "result.json").read_text())["per_seed"][0]["runs"][0]
    cfg = read_run_json(f"{fig5['dir']}/config.json", "config")
    # the first setting of the sweep: tau = 1 at the paper's lr 0.04, with its first decay inside the two steps
    assert (cfg["model"], cfg["workers"], cfg["batch_size"], cfg["dataset"], cfg["lr"], cfg["tau"]) == (
        "vgg16", 2, 2, "synthetic_cifar", 0.04, 1)  # workers and batch: the test's hooks
    records = [json.loads(x) for x in open(f"{fig5['dir']}/metrics.jsonl")]
    assert [r["lr"] for r in records][-2:] == pytest.approx([0.04, 0.004])
    nets = json.loads((tmp_path / "lsgd-nets" / "result.json").read_text())["per_seed"][0]["runs"]
    assert {read_run_json(f"{r['dir']}/config.json", "config")["model"] for r in nets} == {"cnn7", "resnet20"}
    lstm = json.loads((tmp_path / "lsgd-lstm" / "result.json").read_text())["per_seed"][0]["runs"]
    assert all(r["lstm"]["synthetic_vocab"] == WIKITEXT2_VOCAB and r["lstm"]["hidden"] == 200 for r in lstm)
    assert "dry run" in (tmp_path / "report.md").read_text()
    # tau above 2 is cut to 2 so that every method communicates once: DOWNPOUR/EASGD/LSGD (tau 4), Fig. 6's tau 10
    assert all(r["communication_rounds"] >= 1 for r in nets + lstm)
