"""TensorBoard as a user sees it: ``tensorboard --logdir runs`` over several run directories lists each run by
its directory's name, with the scalars in the train/, test/, communication/ and time/ sections; a run
written with the older ``tensorboard/`` folder is resumed as one run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coopsgd.train import RunConfig
from coopsgd.train.rundir import TENSORBOARD_GROUPS, check_run_dir, tensorboard_tag
from coopsgd.train.trainer import train

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'coopsgd[tensorboard]')")

SMALL = {"workers": 2, "eval_every": 2, "eval_samples": 50, "batch_size": 16}


def _runs(logdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What TensorBoard reads from ``logdir``: run name -> tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run, tags in mux.Runs().items():
        acc = mux.GetAccumulator(run)
        out[run] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return out


def test_runs_are_named_by_their_directory_and_grouped(tmp_path) -> None:
    runs = tmp_path / "runs"
    train(RunConfig(preset="local_sgd", tau=2, max_steps=4, **SMALL), out=runs / "local-tau2")
    train(RunConfig(preset="sync", max_steps=4, **SMALL), out=runs / "sync")
    got = _runs(runs)
    assert set(got) == {"local-tau2", "sync"}
    for run, scalars in got.items():
        groups = {t.split("/", 1)[0] for t in scalars}
        assert groups == set(TENSORBOARD_GROUPS), run
        assert {"train/train_loss", "train/lr", "train/worker_loss/1", "test/test_loss", "test/test_accuracy",
                "communication/rounds", "communication/bytes_sent", "communication/consensus_distance",
                "time/simulated_time_s", "time/wall_time_s"} <= set(scalars), run
        records = [json.loads(x) for x in (runs / run / "metrics.jsonl").read_text().splitlines()]
        assert [s for s, _ in scalars["test/test_accuracy"]] == [r["step"] for r in records]
        assert [v for _, v in scalars["test/test_accuracy"]] == pytest.approx([r["test_accuracy"] for r in records])
    # local SGD with tau = 2 communicates every other step, synchronous SGD every step
    assert got["local-tau2"]["communication/rounds"][-1] == (4, 2.0)
    assert got["sync"]["communication/rounds"][-1] == (4, 4.0)


def test_tags() -> None:
    assert tensorboard_tag("test_perplexity") == "test/test_perplexity"
    assert tensorboard_tag("measured_compute_s") == "time/measured_compute_s"
    assert tensorboard_tag("simulated_idle_s") == "time/simulated_idle_s"
    assert tensorboard_tag("time_s") == "time/time_s"
    assert tensorboard_tag("measured_samples_per_s") == "time/measured_samples_per_s"
    assert tensorboard_tag("zeta") == "communication/zeta"
    assert tensorboard_tag("worker_loss/3") == "train/worker_loss/3"
    assert tensorboard_tag("train_accuracy") == "train/train_accuracy"
    assert tensorboard_tag("epoch") == "train/epoch"


def test_a_run_with_the_older_tensorboard_folder_resumes_as_one_run(tmp_path) -> None:
    common = {"preset": "local_sgd", "tau": 2, **SMALL}
    d = tmp_path / "runs" / "old"
    train(RunConfig(**common, max_steps=4), out=d)
    legacy = d / "tensorboard"
    legacy.mkdir()
    for f in d.glob("events.out.tfevents.*"):
        f.rename(legacy / f.name)
    # the older layout is still a coopsgd run directory (a rerun would remove it, a resume continues it)
    assert check_run_dir(d, RunConfig(**common, max_steps=4).to_dict(), overwrite=True) == sorted(
        [*d.glob("*.json*"), d / "checkpoint.pt", legacy])
    train(RunConfig(**common, max_steps=8), out=d, resume=d)
    assert not legacy.exists()
    assert len(list(d.glob("events.out.tfevents.*"))) == 2
    got = _runs(tmp_path / "runs")
    assert set(got) == {"old"}
    assert [s for s, _ in got["old"]["train/train_loss"]] == [0, 2, 4, 6, 8]


def test_a_foreign_file_named_like_an_event_file_is_refused(tmp_path) -> None:
    d = tmp_path / "run"
    train(RunConfig(preset="sync", max_steps=2, **SMALL), out=d)
    (d / "events.out.tfevents.123.host.1.0").write_text("my notes")
    from coopsgd.errors import ConfigError

    with pytest.raises(ConfigError, match="did not write"):
        check_run_dir(d, RunConfig(preset="sync", max_steps=2, **SMALL).to_dict(), overwrite=True)
