"""Safe run directories, default output directories, progress lines and TensorBoard scalars.

A run never writes into a directory that holds another configuration's run: ``--out`` at one is refused
(exit 2, one line naming the directory and the first differing field, the directory byte-for-byte
unchanged) unless ``--overwrite``, which removes every file of the old run first. Runs are tiny (a few
steps of the MLP or LeNet on the bundled MNIST, or the reference engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coopsgd.cli import main
from coopsgd.errors import ConfigError
from coopsgd.fileio import LOCK_FILE
from coopsgd.train import RunConfig
from coopsgd.train.rundir import (
    check_compare_dir,
    check_run_dir,
    config_difference,
    prepare_run_dir,
    tensorboard_scalars,
)
from coopsgd.train.trainer import train


def events(run_dir: Path) -> list[Path]:
    """The TensorBoard event files of a run directory (they lie in the directory itself)."""
    return sorted(run_dir.glob("events.out.tfevents.*"))

SMALL = ["--workers", "2", "--max-steps", "4", "--eval-every", "2", "--eval-samples", "100", "--batch-size", "16"]
REF = ["--engine", "reference", "--objective", "quadratic", "--workers", "2", "--steps", "10"]


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``path``."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("coopsgd: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# another configuration's run: refused, or replaced with --overwrite
# ---------------------------------------------------------------------------------------------------------


def test_out_at_another_configurations_run_is_refused_and_left_unchanged(capsys, tmp_path) -> None:
    d = tmp_path / "job"
    code, _, err = cli(capsys, "run", "--preset", "sync", "--model", "lenet", *SMALL, "--checkpoint-every", "2",
                       "--out", str(d), "--json")
    assert code == 0, err
    before = snapshot(d)
    assert "checkpoint.pt" in before
    code, out, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d))
    assert code == 2 and out == ""
    line = error_line(err)
    assert str(d) in line and "engine" in line and "'simulate' there, 'reference' here" in line
    assert "--overwrite" in line
    assert snapshot(d) == before
    # the same with a setting of the algorithm
    code, _, err = cli(capsys, "run", "--preset", "sync", "--model", "lenet", *SMALL, "--lr", "0.5", "--out", str(d))
    assert code == 2 and "lr: 0.1 there, 0.5 here" in error_line(err)
    assert snapshot(d) == before


def test_overwrite_removes_every_file_of_the_old_run(capsys, tmp_path) -> None:
    d = tmp_path / "job"
    assert cli(capsys, "run", "--preset", "sync", "--model", "lenet", *SMALL, "--out", str(d), "--json")[0] == 0
    old_events = events(d)
    assert (d / "checkpoint.pt").is_file() and old_events
    code, out, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d), "--overwrite", "--json")
    assert code == 0, err
    assert json.loads(out)["out"] == str(d)
    # the reference engine writes no checkpoint: the LeNet run's must not be left beside its config
    assert not (d / "checkpoint.pt").exists()
    assert json.loads((d / "config.json").read_text())["engine"] == "reference"
    new_events = events(d)
    assert {p.name for p in d.iterdir()} == {"config.json", "environment.json", "metrics.jsonl", "summary.json",
                                             LOCK_FILE, *(e.name for e in new_events)}
    assert len(new_events) == 1 and new_events[0] not in old_events
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(11))  # the reference run's records only


def test_rerunning_the_same_configuration_replaces_its_run(capsys, tmp_path) -> None:
    d = tmp_path / "job"
    args = ["run", "--preset", "local_sgd", "--tau", "2", *SMALL, "--out", str(d), "--json"]
    assert cli(capsys, *args)[0] == 0
    first = json.loads((d / "summary.json").read_text())
    # the same fields (a longer run is the same configuration: max_steps is one a resume may change)
    code, _, err = cli(capsys, *args, "--max-steps", "6")
    assert code == 0, err
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6]  # replaced, not appended
    assert len(events(d)) == 1
    assert json.loads((d / "summary.json").read_text())["steps"] == 6 != first["steps"]


def test_foreign_files_are_never_removed_even_with_overwrite(capsys, tmp_path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    (d / "config.json").write_text('{"name": "another tool"}')
    before = snapshot(d)
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d), *extra)
        assert code == 2
        line = error_line(err)
        assert str(d) in line and "'config.json'" in line and "'notes.txt'" in line and "did not write" in line
        assert snapshot(d) == before


def test_coopsgd_files_without_a_config_are_replaced_only_with_overwrite(capsys, tmp_path) -> None:
    d = tmp_path / "job"
    assert cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d), "--json")[0] == 0
    (d / "config.json").unlink()
    before = snapshot(d)
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d))
    assert code == 2 and "no readable config.json" in error_line(err) and snapshot(d) == before
    assert cli(capsys, "run", "--preset", "sync", *REF, "--out", str(d), "--overwrite", "--json")[0] == 0
    assert (d / "config.json").is_file()


def test_out_that_is_a_file_is_refused(capsys, tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(f))
    assert code == 2 and "not a directory" in error_line(err)


def test_the_rule_in_the_library() -> None:
    old = RunConfig(preset="sync", workers=2).to_dict()
    assert config_difference(old, RunConfig(preset="sync", workers=2, max_steps=9, eval_every=3, out="x",
                                            checkpoint_every=2, tensorboard=False).to_dict()) is None
    assert config_difference(old, RunConfig(preset="sync", workers=2, epochs=2.0).to_dict()) is None
    assert config_difference(old, RunConfig(preset="sync", workers=4).to_dict()) == ("workers", 2, 4)
    # a field an older config.json lacks counts as its default
    legacy = {k: v for k, v in old.items() if k != "seed"}
    assert config_difference(legacy, old) is None
    assert config_difference(legacy, RunConfig(preset="sync", workers=2, seed=3).to_dict()) == ("seed", 0, 3)
    # a field the new config does not have
    assert config_difference({**old, "retired": 1}, old) == ("retired", 1, None)


def test_the_library_refuses_too_and_plain_train_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "r"
    cfg = RunConfig(preset="sync", workers=2, max_steps=2, eval_samples=100)
    train(cfg, out=d)
    before = snapshot(d)
    with pytest.raises(ConfigError, match="preset: 'sync' there, 'local_sgd' here") as info:
        train(RunConfig(preset="local_sgd", workers=2, max_steps=2), out=d)
    assert info.value.field == "out"
    assert snapshot(d) == before
    summary = train(RunConfig(preset="local_sgd", workers=2, max_steps=2, eval_samples=100), out=d, overwrite=True)
    assert summary["out"] == str(d)
    assert json.loads((d / "config.json").read_text())["preset"] == "local_sgd"
    # a library run without a run directory saves nothing (and creates no runs/)
    summary = train(RunConfig(preset="sync", workers=2, max_steps=2, eval_samples=100))
    assert "out" not in summary and not (tmp_path / "runs").exists()


def test_resume_keeps_its_directory_and_cannot_overwrite(capsys, tmp_path) -> None:
    d = tmp_path / "job"
    assert cli(capsys, "run", "--preset", "sync", *SMALL, "--checkpoint-every", "2", "--out", str(d), "--json")[0] == 0
    code, _, err = cli(capsys, "run", "--resume", str(d), "--overwrite")
    assert code == 2 and "--overwrite" in error_line(err)
    cfg = RunConfig(preset="sync", workers=2, max_steps=6, eval_every=2, eval_samples=100, batch_size=16)
    with pytest.raises(ConfigError, match="overwrite"):
        train(cfg, out=d, resume=d, overwrite=True)
    # resuming into a directory of another configuration is refused (and cannot be forced)
    with pytest.raises(ConfigError, match=r"lr: 0\.1 there, 0\.2 here"):
        train(RunConfig(preset="sync", workers=2, max_steps=6, lr=0.2, eval_samples=100, batch_size=16),
              out=d, resume=d)
    # the resume itself (test_resume.py checks it is exact) keeps the run's files and appends
    assert cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")[0] == 0
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6]


# ---------------------------------------------------------------------------------------------------------
# default output directories
# ---------------------------------------------------------------------------------------------------------


def test_run_without_out_writes_a_fresh_directory_and_says_where(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "run", "--preset", "local_sgd", "--tau", "2", *SMALL, "--json")
    assert code == 0, err
    first = Path(json.loads(out)["out"])
    assert first.parent == Path("runs") and first.name.startswith("local_sgd-")
    assert (tmp_path / first / "config.json").is_file() and (tmp_path / first / "checkpoint.pt").is_file()
    assert json.loads((tmp_path / first / "config.json").read_text())["out"] == str(first)
    code, out, err = cli(capsys, "run", "--preset", "local_sgd", "--tau", "2", *SMALL)
    assert code == 0, err
    second = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != first.name)
    assert len(second) == 1
    rel = str(second[0].relative_to(tmp_path))
    assert rel in out and "writing the run to" not in err  # in the summary line (not before a possible refusal)


def test_a_refused_run_leaves_no_empty_default_directory(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "run", "--preset", "sync", "--workers", "2", "--max-steps", "2",
                       "--dataset", "no-such-data")
    assert code == 2
    assert not any((tmp_path / "runs").iterdir())


def test_two_compares_without_out_get_two_directories(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    outs = []
    for _ in range(2):
        code, out, err = cli(capsys, "compare", "--presets", "sync,local_sgd", *REF, "--tau", "2", "--json")
        assert code == 0, err
        outs.append(Path(json.loads(out)["out"]))
    assert outs[0] != outs[1] and all(o.name.startswith("compare-") for o in outs)
    for o in outs:
        assert {p.name for p in (tmp_path / o).iterdir()} == {"compare.json", "compare.png", "sync", "local_sgd",
                                                              LOCK_FILE}
        assert json.loads((tmp_path / o / "compare.json").read_text())["presets"] == ["sync", "local_sgd"]


def test_compare_into_another_comparison_is_refused_unless_overwrite(capsys, tmp_path) -> None:
    c = tmp_path / "cmp"
    code, _, err = cli(capsys, "compare", "--presets", "sync,local_sgd,dpsgd", "--model", "mlp", *SMALL, "--tau", "2",
                       "--out", str(c), "--json")
    assert code == 0, err
    before = snapshot(c)
    # the reference engine into the main job's comparison: refused, nothing replaced (compare.png included)
    code, _, err = cli(capsys, "compare", "--presets", "sync,local_sgd", *REF, "--out", str(c))
    assert code == 2 and "engine: 'simulate' there, 'reference' here" in error_line(err)
    assert snapshot(c) == before
    # another list of presets is another comparison too
    code, _, err = cli(capsys, "compare", "--presets", "sync,local_sgd", "--model", "mlp", *SMALL, "--tau", "2",
                       "--out", str(c))
    assert code == 2 and "presets" in error_line(err) and snapshot(c) == before
    code, out, err = cli(capsys, "compare", "--presets", "sync,local_sgd", *REF, "--out", str(c), "--overwrite",
                         "--json")
    assert code == 0, err
    assert {p.name for p in c.iterdir()} == {"compare.json", "compare.png", "sync", "local_sgd", LOCK_FILE}  # no dpsgd/
    assert not (c / "sync" / "checkpoint.pt").exists()  # the simulator's run is gone with its checkpoint
    assert json.loads((c / "compare.json").read_text())["config"]["engine"] == "reference"


def test_compare_directory_rule() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = RunConfig(preset="sync", workers=2).to_dict()
        assert check_compare_dir(d / "missing", cfg, ["sync"]) == []
        (d / "sync").mkdir()  # a folder compare.json does not list is not coopsgd's
        with pytest.raises(ConfigError, match="did not write"):
            check_compare_dir(d, cfg, ["sync"], overwrite=True)
        # a run directory is not a compare directory
        r = d / "run"
        prepare_run_dir(r, cfg)
        (r / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match="did not write"):
            check_compare_dir(r, cfg, ["sync"])
        assert check_run_dir(r, cfg) == [r / "config.json"]


# ---------------------------------------------------------------------------------------------------------
# distributed: refused before any process starts
# ---------------------------------------------------------------------------------------------------------


def test_distributed_refusal_happens_before_launching(capsys, tmp_path, monkeypatch) -> None:
    import coopsgd.train.distributed as distributed

    d = tmp_path / "job"
    train(RunConfig(preset="local_sgd", tau=2, workers=2, max_steps=2, eval_samples=100), out=d)
    before = snapshot(d)

    def no_launch(*a, **k):
        raise AssertionError("the launcher must not be called")

    monkeypatch.setattr(distributed, "launch", no_launch)
    with pytest.raises(ConfigError, match="engine: 'simulate' there, 'distributed' here"):
        distributed.run_distributed(RunConfig(preset="local_sgd", tau=2, workers=2, max_steps=2), out=d)
    code, _, err = cli(capsys, "run", "--engine", "distributed", "--preset", "local_sgd", "--tau", "2",
                       "--workers", "2", "--max-steps", "2", "--out", str(d))
    assert code == 2 and str(d) in error_line(err)
    assert snapshot(d) == before
    # with overwrite the check passes and the launcher is reached; rank 0 removes the old run, not the parent
    with pytest.raises(AssertionError, match="must not be called"):
        distributed.run_distributed(RunConfig(preset="local_sgd", tau=2, workers=2, max_steps=2), out=d,
                                    overwrite=True)
    assert snapshot(d) == before


@pytest.mark.slow
def test_distributed_rank0_progress_and_tensorboard(capfd, tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'coopsgd[tensorboard]')")
    from coopsgd.train.distributed import run_distributed

    d = tmp_path / "dist"
    cfg = RunConfig(preset="local_sgd", tau=2, workers=2, max_steps=4, eval_every=2, eval_samples=100, batch_size=16)
    run_distributed(cfg, out=d, timeout_s=30, progress=True)
    err = capfd.readouterr().err
    assert "local_sgd x2 (distributed): step 4/4 (100%)" in err  # rank 0's lines only (stderr is no terminal)
    assert err.count("step 4/4 (100%)") == 1
    _same_scalars(d)


# ---------------------------------------------------------------------------------------------------------
# progress lines when stderr is not a terminal
# ---------------------------------------------------------------------------------------------------------


def test_progress_lines_when_stderr_is_not_a_terminal(capsys, tmp_path) -> None:
    code, _, err = cli(capsys, "run", "--preset", "sync", *SMALL, "--out", str(tmp_path / "a"))
    assert code == 0
    assert "sync x2: step 4/4 (100%), loss " in err and "done in" in err
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(tmp_path / "b"))
    assert code == 0 and "sync x2: step 10/10 (100%)" in err
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(tmp_path / "c"), "--json")
    assert code == 0 and "step" not in err  # --json: quiet


# ---------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same_scalars(run_dir: Path) -> None:
    """The event files hold exactly the numeric fields of metrics.jsonl, step by step."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for tag, value in tensorboard_scalars(rec).items():
            expected.setdefault(tag, []).append((rec["step"], value))
    got = _scalars(run_dir)
    assert set(got) == set(expected)
    for tag, series in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-30), tag


def test_tensorboard_scalars_equal_the_metrics(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'coopsgd[tensorboard]')")
    d = tmp_path / "sim"
    train(RunConfig(preset="lsgd", tau=2, workers=3, max_steps=6, eval_every=2, eval_samples=100, batch_size=16),
          out=d)
    _same_scalars(d)
    got = _scalars(d)
    assert {"train/train_loss", "test/test_loss", "test/test_accuracy", "train/lr",
            "communication/consensus_distance", "train/worker_loss/0", "train/worker_loss/2", "communication/rounds",
            "communication/leader"} <= set(got)
    assert not any(t.split("/")[1].startswith(("time_source", "dropped_rounds", "step")) for t in got)


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'coopsgd[tensorboard]')")
    common = {"preset": "local_sgd", "tau": 2, "workers": 2, "eval_every": 5, "eval_samples": 100, "batch_size": 16}
    d = tmp_path / "part"
    train(RunConfig(**common, max_steps=6), out=d)
    train(RunConfig(**common, max_steps=14), out=d, resume=d)
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 5, 10, 14]  # the first part's last record (6, off the grid) replaced: as one run of 14
    assert len(events(d)) == 2  # one event file per process, the old one kept
    _same_scalars(d)
    # a run that went on past its last checkpoint (a crash after step 6): the events after step 6 are
    # replaced, as the metric records are
    ck = tmp_path / "ck"
    train(RunConfig(**common, max_steps=6), out=ck)
    e = tmp_path / "crashed"
    train(RunConfig(**common, max_steps=14), out=e)
    train(RunConfig(**common, max_steps=14), out=e, resume=ck / "checkpoint.pt")
    steps = [json.loads(x)["step"] for x in (e / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 5, 10, 14]
    _same_scalars(e)
    assert [s for s, _ in _scalars(e)["train/train_loss"]] == [0, 5, 10, 14]


def test_tensorboard_switches(tmp_path, capsys, monkeypatch) -> None:
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(tmp_path / "off"), "--no-tensorboard",
                       "--json")
    assert code == 0, err
    assert not events(tmp_path / "off")
    assert json.loads((tmp_path / "off" / "config.json").read_text())["tensorboard"] is False
    # asked for but not installed: one clear line, before anything is written
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(tmp_path / "on"), "--tensorboard")
    assert code == 2 and "coopsgd[tensorboard]" in error_line(err)
    assert not (tmp_path / "on").exists()
    # auto without the package: no event files, no error
    code, _, err = cli(capsys, "run", "--preset", "sync", *REF, "--out", str(tmp_path / "auto"), "--json")
    assert code == 0 and not events(tmp_path / "auto")
    with pytest.raises(ConfigError, match="tensorboard"):
        RunConfig(tensorboard="yes")  # type: ignore[arg-type]


def test_unset_weight_decay_equals_an_older_runs_zero() -> None:
    # run directories written before the optimizer could be chosen hold weight_decay 0.0 and no optimizer
    for preset in ("local_sgd", "sync", "easgd"):
        new = RunConfig(preset=preset).to_dict()
        old = {k: v for k, v in new.items() if k != "optimizer"} | {"weight_decay": 0.0}
        assert config_difference(old, new) is None
        assert config_difference(new, old) is None
    # a current config that states weight_decay 0.0 is not an unset one (AdamW's default is 0.01)
    for kwargs in ({"preset": "local_sgd", "optimizer": "adamw"}, {"preset": "diloco"}):
        new = RunConfig(**kwargs).to_dict()
        assert config_difference({**new, "weight_decay": 0.0}, new) == ("weight_decay", 0.0, None)
    old = {k: v for k, v in RunConfig().to_dict().items() if k != "optimizer"} | {"weight_decay": 0.1}
    assert config_difference(old, RunConfig().to_dict()) == ("weight_decay", 0.1, None)
