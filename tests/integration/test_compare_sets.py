"""``coopsgd compare --set NAME``: a named comparison expands to its runs with their own and shared settings;
flags override the set; bad names end in one line (exit 2); the cost figure draws loss against the clock
and against the bytes sent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coopsgd.cli import COMPARE_DEFAULTS, COMPARE_PRESETS, COMPARE_SETS, _compare_plan, build_parser, main
from coopsgd.errors import ConfigError

#: the inner optimizer every run of the modern set shares (AdamW, same lr, betas, eps and weight decay)
ADAMW = {"optimizer": "adamw", "lr": 0.003, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def plan(*argv: str):
    return _compare_plan(build_parser().parse_args(["compare", *argv]))


def _preset_fields() -> set[str]:
    from coopsgd.train.config import config_settings

    return {s.key for _, s in config_settings() if s.info.preset}


def test_modern_set_expands_to_its_four_runs() -> None:
    base, runs = plan("--set", "modern")
    assert [(label, c.algorithm.preset) for label, c in runs] == [("sync", "sync"), ("local_sgd", "local_sgd"),
                                                        ("diloco", "diloco"), ("slowmo", "slowmo")]
    cfg = dict(runs)
    for c in cfg.values():
        assert {k: c.to_dict()[k] for k in ADAMW} == ADAMW
        assert (c.problem.model, c.problem.dataset, c.problem.model_args) == ("lstm_lm", "wikitext2",
                                                      {"emb_size": 32, "hidden_size": 32, "num_layers": 1})
        assert (c.algorithm.workers, c.problem.batch_size, c.schedule.max_steps, c.clock.net_latency_ms, c.clock.net_bandwidth_mbps) == (4, 8, 200, 50.0, 100.0)
    # the runs differ in their preset and its settings only
    shared = [{k: v for k, v in c.to_dict().items() if k not in _preset_fields() | {"preset"}} for c in cfg.values()]
    assert all(s == shared[0] for s in shared)
    assert base.to_dict() == cfg["sync"].to_dict()
    # tau set explicitly (diloco's own default is the paper's H = 500): rounds happen in a 200-step run
    assert [cfg[n].algorithm.tau for n in ("sync", "local_sgd", "diloco", "slowmo")] == [None, 20, 20, 20]
    d, s = cfg["diloco"], cfg["slowmo"]
    assert (d.algorithm.outer_optimizer, d.algorithm.outer_lr, d.algorithm.outer_momentum) == ("nesterov", 0.7, 0.9)
    assert (s.algorithm.base_algorithm, s.algorithm.outer_lr, s.algorithm.outer_momentum) == ("local_sgd", 1.0, 0.5)
    # the specs they build: one exact average every 20 steps (every step for sync), z's outer optimizer
    specs = {n: c.build_spec() for n, c in cfg.items()}
    assert specs["sync"].tau == 1 and specs["local_sgd"].tau == 20
    assert specs["diloco"].tau == 20 and specs["diloco"].outer.nesterov and specs["diloco"].outer.lr == 0.7
    assert specs["slowmo"].tau == 20 and specs["slowmo"].outer.momentum == 0.5 and not specs["slowmo"].outer.nesterov
    assert specs["slowmo"].params["base_algorithm"] == "local_sgd"


def test_llm_set_runs_every_method_on_one_uneven_cluster() -> None:
    """issue 27 item 4: the small GPT, one slow class of workers shared by every run, the methods' own settings."""
    _, runs = plan("--set", "llm")
    cfg = dict(runs)
    assert [(label, c.algorithm.preset) for label, c in runs] == [
        ("sync", "sync"), ("diloco", "diloco"), ("streaming", "streaming_diloco"),
        ("streaming_int4", "streaming_diloco"), ("async_local_sgd", "async_local_sgd")]
    for c in cfg.values():
        assert (c.problem.model, c.problem.dataset, c.clock.worker_speeds) == ("gpt", "wikitext2", [1.0, 0.5])
        assert {k: c.to_dict()[k] for k in ADAMW} == ADAMW
    shared = [{k: v for k, v in c.to_dict().items() if k not in _preset_fields() | {"preset", "compress"}}
              for c in cfg.values()]
    assert all(s == shared[0] for s in shared)
    specs = {n: c.build_spec() for n, c in cfg.items()}
    assert specs["streaming"].params["fragments"] == 4 and specs["streaming"].compressed is None
    assert cfg["streaming_int4"].communication.compress == "int4" and specs["streaming_int4"].compressed is not None
    assert cfg["async_local_sgd"].algorithm.delayed_nesterov == 4 and cfg["async_local_sgd"].algorithm.dynamic_local_updates
    assert specs["async_local_sgd"].asynchronous is not None


def test_flags_and_config_keys_override_the_set(tmp_path) -> None:
    _, runs = plan("--set", "modern", "--tau", "5", "--lr", "0.001", "--outer-lr", "0.5")
    cfg = dict(runs)
    assert [cfg[n].algorithm.tau for n in ("sync", "local_sgd", "diloco", "slowmo")] == [None, 5, 5, 5]
    assert {c.schedule.lr for c in cfg.values()} == {0.001}
    assert (cfg["local_sgd"].algorithm.outer_lr, cfg["diloco"].algorithm.outer_lr, cfg["slowmo"].algorithm.outer_lr) == (None, 0.5, 0.5)
    # --epochs drops the set's max_steps, --model its LSTM sizes
    _, runs = plan("--set", "modern", "--epochs", "1", "--model", "mlp", "--dataset", "mnist_bundled")
    c = dict(runs)["local_sgd"]
    assert (c.schedule.max_steps, c.schedule.epochs, c.problem.model, c.problem.model_args, c.algorithm.tau) == (None, 1.0, "mlp", {}, 20)
    conf = tmp_path / "c.toml"
    conf.write_text('workers = 2\nweight-decay = 0.1\n')
    _, runs = plan("--set", "modern", "--config", str(conf))
    assert {(c.algorithm.workers, c.optimizer.weight_decay) for _, c in runs} == {(2, 0.1)}


def test_without_a_set_compare_keeps_its_preset_list_and_defaults() -> None:
    base, runs = plan()
    assert [label for label, _ in runs] == COMPARE_PRESETS.split(",")
    assert all(label == c.algorithm.preset for label, c in runs)
    assert (base.problem.model, base.schedule.epochs) == (COMPARE_DEFAULTS["model"], COMPARE_DEFAULTS["epochs"])
    assert base.optimizer.name is None


def test_every_set_builds() -> None:
    for name, s in COMPARE_SETS.items():
        _, runs = plan("--set", name)
        assert [label for label, _ in runs] == [label for label, _, _ in s.runs]
        assert len({label for label, _ in runs}) == len(runs)  # labels name the run directories
        for _, c in runs:
            c.build_spec()


BAD = [
    (["--set", "nope"], "--set='nope' is invalid: choose from modern"),
    (["--set", ""], "--set=''"),
    (["--set", "modern", "--presets", "sync,local_sgd"], "cannot be combined with --set"),
    (["--set", "modern", "--tau", "0"], "tau"),
    (["--presets", ""], "--presets"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sets_give_one_line_exit_2(capsys, tmp_path, argv, needle) -> None:
    code = main(["compare", *argv, "--out", str(tmp_path / "c")])
    out, err = capsys.readouterr()
    assert code == 2 and needle in err and out == ""
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(ConfigError):
        plan(*argv)


def test_cost_figure_draws_loss_against_clock_and_bytes(capsys, tmp_path, monkeypatch) -> None:
    import coopsgd.plots as plots

    # a set writes the cost figure (the modern set's loop on the reference engine: plain SGD on a quadratic)
    code = main(["compare", "--set", "modern", "--engine", "reference", "--optimizer", "sgd", "--lr", "0.1",
                 "--objective", "quadratic", "--steps", "40", "--out", str(tmp_path / "s"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [data["results"][n]["communication_rounds"] for n in ("sync", "local_sgd", "diloco", "slowmo")] == [40, 2, 2, 2]
    assert data["cost_plot"] == str(tmp_path / "s" / "compare_cost.png")
    assert (tmp_path / "s" / "compare_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a plain comparison keeps its one figure
    code = main(["compare", "--engine", "reference", "--presets", "sync,local_sgd", "--workers", "4", "--tau", "4",
                 "--objective", "quadratic", "--steps", "40", "--out", str(tmp_path / "c"), "--json"])
    assert code == 0
    assert "cost_plot" not in json.loads(capsys.readouterr().out)
    assert not (tmp_path / "c" / "compare_cost.png").exists()
    figs = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, out, dpi=110: figs.append(fig) or out)
    dirs = [tmp_path / "c" / n for n in ("sync", "local_sgd")]
    plots.plot_runs(dirs, tmp_path / "x.png", against=("time", "bytes"))
    ax_time, ax_bytes = figs[0].axes
    assert "simulated" in ax_time.get_xlabel() and "bytes" in ax_bytes.get_xlabel()
    # both runs communicate: log axes, the start (t = 0, nothing sent) left out
    assert ax_time.get_xscale() == ax_bytes.get_xscale() == "log"
    for k, d in enumerate(dirs):
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if r.get("test_loss") is not None]
        assert recs[0]["step"] == 0 and recs[0]["time_s"] == recs[0]["bytes_sent"] == 0
        timed = [r for r in recs if r["time_s"] > 0]
        sent = [r for r in recs if r["bytes_sent"] > 0]  # local_sgd: nothing before its first round
        assert len(timed) == len(recs) - 1 and len(sent) == len(recs) - (1 if k == 0 else 4)
        np.testing.assert_array_equal(ax_time.lines[k].get_xdata(), [r["time_s"] for r in timed])
        np.testing.assert_array_equal(ax_time.lines[k].get_ydata(), [r["test_loss"] for r in timed])
        np.testing.assert_array_equal(ax_bytes.lines[k].get_xdata(), [r["bytes_sent"] / 1e6 for r in sent])
        np.testing.assert_array_equal(ax_bytes.lines[k].get_ydata(), [r["test_loss"] for r in sent])
    # sync sends 4x local_sgd's bytes (a round every step instead of every 4): same final x ratio
    assert ax_bytes.lines[0].get_xdata()[-1] == pytest.approx(4 * ax_bytes.lines[1].get_xdata()[-1])
    for kw, field in (({"against": ("time", "flops")}, "against"), ({"against": ()}, "against"),
                      ({"against": ("time", "time")}, "against"), ({"against": ("bytes",), "loss": "acc"}, "loss")):
        with pytest.raises(ConfigError, match=field):
            plots.plot_runs(dirs, tmp_path / "y.png", **kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_modern_set_runs_end_to_end(capsys, tmp_path) -> None:
    """The modern set, shrunk by flags (2 workers, 4 steps, tau 2): every run trains its LSTM with AdamW; the
    rounds, bytes and simulated times follow from the schedules (same compute per step, same all-reduce)."""
    out = tmp_path / "m"
    code = main(["compare", "--set", "modern", "--workers", "2", "--max-steps", "4", "--tau", "2", "--eval-every", "2",
                 "--eval-samples", "4", "--batch-size", "2", "--executor", "loop", "--out", str(out), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert list(res) == ["sync", "local_sgd", "diloco", "slowmo"]
    assert [res[n]["communication_rounds"] for n in res] == [4, 2, 2, 2]
    local = res["local_sgd"]
    assert res["sync"]["bytes_sent"] == 2 * local["bytes_sent"] > 0
    assert res["diloco"]["bytes_sent"] == res["slowmo"]["bytes_sent"] == local["bytes_sent"]
    for n in ("diloco", "slowmo"):
        assert res[n]["simulated_time_s"] == pytest.approx(local["simulated_time_s"], rel=1e-12)
    comm = local["simulated_split_s"]["communication_s"]
    assert res["sync"]["simulated_time_s"] == pytest.approx(local["simulated_time_s"] + comm, rel=1e-9)
    # z's outer step moves the evaluated model away from local SGD's plain average
    assert res["diloco"]["final"]["test_loss"] != local["final"]["test_loss"]
    meta = json.loads((out / "compare.json").read_text())
    assert meta["set"] == "modern" and meta["presets"] == list(res)
    assert meta["runs"]["diloco"]["outer_lr"] == 0.7 and meta["runs"]["slowmo"]["outer_momentum"] == 0.5
    for n in res:
        cfg = json.loads((out / n / "config.json").read_text())
        assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["model"]) == ("adamw", 0.003, 0.01, "lstm_lm")
    assert (out / "compare_cost.png").stat().st_size > 1000 and (out / "compare.png").is_file()
