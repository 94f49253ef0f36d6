"""Training runs end to end: learning on bundled MNIST, run directories, configs, failures, bad input."""

from __future__ import annotations

import json

import pytest

from coopsgd.cli import main
from coopsgd.engines.reference import NonFiniteError
from coopsgd.errors import ConfigError
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.trainer import train


def test_local_sgd_mlp_learns_bundled_mnist(tmp_path) -> None:
    """Local SGD, 8 workers, MLP on the bundled MNIST split reaches >= 90% held-out accuracy."""
    cfg = RunConfig(preset="local_sgd", workers=8, tau=4, model="mlp", dataset="mnist_bundled", lr=0.1,
                    momentum=0.9, batch_size=32, epochs=3, seed=0, out=str(tmp_path / "run"))
    summary = train(cfg)
    assert summary["final"]["test_accuracy"] >= 0.90, summary
    assert summary["communication_rounds"] == summary["steps"] // 4
    assert summary["simulated_time_s"] > 0
    run = tmp_path / "run"
    for name in ("config.json", "environment.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] and "git_revision" in env
    hist = env["label_histograms"]
    assert len(hist) == 8 and sum(map(sum, hist)) == 8000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[-1]["step"] == summary["steps"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    for key in ("worker_losses", "test_accuracy", "consensus_distance", "zeta", "rounds", "bytes_sent",
                "simulated_time_s", "simulated_compute_s", "simulated_communication_s", "simulated_idle_s",
                "time_s", "time_source", "measured_train_s", "wall_time_s", "dropped_rounds", "leader"):
        assert key in records[-1], key
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == summary["steps"]


def test_cli_run_simulate_json_contract(capsys, tmp_path) -> None:
    code = main(["run", "--preset", "easgd", "--workers", "4", "--tau", "2", "--max-steps", "12", "--eval-every",
                 "6", "--out", str(tmp_path / "r"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert set(data["final"]) >= {"train_loss", "test_loss", "test_accuracy"}
    for key in ("simulated_time_s", "wall_time_s", "communication_rounds", "bytes_sent"):
        assert key in data
    assert data["communication_rounds"] == 6


def test_config_file_and_flag_override(capsys, tmp_path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "dpsgd"\nworkers = 4\ntopology = "ring"\nmax_steps = 6\nlr = 0.05\n')
    code = main(["run", "--config", str(cfg), "--workers", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["workers"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: sync\nlearning_rate: 0.1\n")
    code = main(["run", "--config", str(bad)])
    _, err = capsys.readouterr()
    assert code == 2 and "learning_rate" in err


def test_nan_stops_with_worker_and_step_and_no_checkpoint(tmp_path) -> None:
    cfg = RunConfig(preset="local_sgd", workers=2, tau=2, model="mlp", lr=1e6, max_steps=50, eval_every=1,
                    out=str(tmp_path / "nan"))
    with pytest.raises(NonFiniteError, match=r"worker \d+ at step \d+"):
        train(cfg)
    run = tmp_path / "nan"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step" in summary["error"]
    assert not (run / "checkpoint.pt").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line that was written is valid JSON


def test_compare_and_plot_commands(capsys, tmp_path, saved_figures, check_runs_figure, check_png) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--presets", "sync,local_sgd", "--workers", "2", "--max-steps", "8", "--eval-every", "4",
                 "--out", str(out), "--json"])
    res, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(res)
    assert data["results"]["sync"]["communication_rounds"] == 8
    runs = [out / "sync", out / "local_sgd"]
    # the figure shows each run's metrics.jsonl, point for point, under the run's name; the PNG is 12 x 8 in
    # at 160 dpi (plots.FIGURE_DPI) and not blank
    assert len(saved_figures) == 1
    check_runs_figure(saved_figures[0], runs, ["sync", "local_sgd"])
    check_png(out / "compare.png", size=(1920, 1280))
    code = main(["plot", *map(str, runs), "--out", str(tmp_path / "p.svg"), "--title", "two runs", "--json"])
    res, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(res)["runs"]
    assert [r["path"] for r in rows] == [str(r) for r in runs]
    for row, run in zip(rows, runs, strict=True):
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["train_loss"] == last["train_loss"] and row["rounds"] == last["rounds"]
    assert len(saved_figures) == 2 and saved_figures[1]._suptitle.get_text() == "two runs"
    check_runs_figure(saved_figures[1], runs, ["sync", "local_sgd"])  # labels from each run's config
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


BAD_RUNS = [
    ({"dataset": "imagenet21k"}, "dataset"),
    ({"model": "transformer"}, "model"),
    ({"preset": "gossip"}, "preset"),
    ({"dataset": "digits", "workers": 2000}, "workers"),
    ({"partition": "dirichlet", "dirichlet_beta": 0.0}, "dirichlet_beta"),
    ({"partition": "random"}, "partition"),
    ({"batch_size": 5000}, "batch_size"),
    ({"dtype": "float16"}, "dtype"),
    ({"executor": "gpu"}, "executor"),
    ({"epochs": 0}, "epochs"),
    ({"momentum": 1.0}, "momentum"),
    ({"nesterov": True}, "nesterov"),
    ({"lr_decay_epochs": "a,b"}, "lr_decay_epochs"),
    ({"preset": "sync", "tau": 4}, "tau"),
    ({"workers": 0}, "workers"),
    ({"compute": "quantum"}, "compute"),
    ({"net_bandwidth_mbps": 0}, "net_bandwidth_mbps"),
    ({"dataset": "cifar10"}, "dataset"),
]


@pytest.mark.parametrize("override,field", BAD_RUNS, ids=[f for _, f in BAD_RUNS])
def test_bad_run_input_names_the_field_and_writes_nothing(tmp_path, override, field) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        train(RunConfig.from_dict({"max_steps": 2, "out": str(out), **override}))
    assert field in str(info.value)
    assert not out.exists(), "a rejected run must not leave a run directory behind"


def test_out_path_that_is_a_file(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="out"):
        train(RunConfig(max_steps=2, out=str(f)))


def test_example_configs_are_valid() -> None:
    from pathlib import Path

    from coopsgd.train import load_config

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.[ty]*ml"))
    assert examples, "examples/ should hold config files"
    for path in examples:
        cfg = RunConfig.from_dict(load_config(path), source=str(path))
        cfg.spec_kwargs()  # every setting is accepted by its preset


def test_fedavg_local_epochs_set_the_round_length() -> None:
    from coopsgd.train.trainer import build

    exp = build(RunConfig(preset="fedavg", workers=4, local_epochs=0.5, fraction=0.5, batch_size=50))
    assert exp.spec.tau == round(0.5 * exp.steps_per_epoch)  # 2000 samples/client -> 40 batches of 50
    assert exp.spec.tau == 20
    with pytest.raises(ConfigError, match="local_epochs"):
        RunConfig(preset="local_sgd", local_epochs=1.0)


def test_downpour_push_order_follows_the_simulated_clock() -> None:
    from coopsgd.train.trainer import build

    cfg = dict(preset="downpour", workers=4, tau=2, max_steps=6, compute="pareto", compute_spread=0.8, seed=1)
    exp = build(RunConfig(**cfg))
    orders = []
    for _ in range(6):
        stats = exp.sim.step(exp.loader.next_step(), 0.05)
        if "order" in stats.info:
            orders.append(stats.info["order"])
    assert len(orders) == 3
    seeded = [exp.spec.schedule.order(r).tolist() for r in range(3)]
    assert orders != seeded  # heavy-tailed compute times reorder the pushes


def test_language_model_run_reads_batches_as_batch_first(tmp_path) -> None:
    """lm_windows + WorkerLoader give (batch, seq_len) tokens: the LSTM must be built batch-first."""
    from coopsgd.train.trainer import build

    cfg = RunConfig(dataset="wikitext2", model="lstm_lm", model_args={"emb_size": 16, "hidden_size": 16},
                    workers=2, batch_size=4, max_steps=2, eval_samples=8, executor="loop", out=str(tmp_path / "lm"))
    exp = build(cfg)
    assert exp.is_lm and exp.sim.center_model().batch_first
    summary = train(cfg)
    assert summary["final"]["test_perplexity"] > 1


def test_compare_defaults_yield_to_flags_and_config(monkeypatch, tmp_path) -> None:
    """`coopsgd compare` defaults to the main job's LeNet/15 epochs, but a flag or a config file wins."""
    import coopsgd.cli as cli

    seen = []
    monkeypatch.setattr("coopsgd.train.trainer.run", lambda cfg, **kw: seen.append(cfg) or (_ for _ in ()).throw(
        ConfigError("stop here")))
    # one --out each: a directory holding another comparison is refused (tests/integration/test_rundirs.py)
    cli.main(["compare", "--presets", "sync", "--out", str(tmp_path / "a")])
    assert seen[-1].problem.model == "lenet" and seen[-1].schedule.epochs == 15.0
    cli.main(["compare", "--presets", "sync", "--model", "mlp", "--out", str(tmp_path / "b")])
    assert seen[-1].problem.model == "mlp" and seen[-1].schedule.epochs == 15.0
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 2\n')
    cli.main(["compare", "--presets", "sync", "--config", str(cfg), "--out", str(tmp_path / "c")])
    assert seen[-1].problem.model == "lenet" and seen[-1].schedule.epochs == 2.0


@pytest.mark.parametrize(("preset", "tau", "steps", "warned"),
                         [("local_sgd", 10, 4, True), ("local_sgd", 4, 4, False), ("diloco", 6, 5, True),
                          ("diloco", 5, 5, False)])
def test_run_without_any_round_is_warned(caplog, preset, tau, steps, warned) -> None:
    import logging

    cfg = RunConfig(preset=preset, workers=2, tau=tau, model="mlp", max_steps=steps, eval_every=steps,
                    batch_size=16)
    with caplog.at_level(logging.WARNING, logger="coopsgd.train.trainer"):
        train(cfg)
    hits = [r.getMessage() for r in caplog.records if "no communication round" in r.getMessage()]
    assert bool(hits) is warned
    if warned:
        assert f"{steps} steps (tau = {tau})" in hits[0]
