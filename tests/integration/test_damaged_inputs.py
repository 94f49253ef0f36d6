"""Damaged files, unusable output paths and absurd numbers through the CLI (issue 14, items 3-5 and 8).

Every case ends with exit status 2 and exactly one line on stderr that names the file and the field (no
traceback), and leaves the run directory byte-for-byte as it was. In-process ``main([...])`` calls; one
4-step run (~3 s) is shared by the damaged-run-directory cases.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coopsgd.cli import main
from coopsgd.errors import ConfigError
from coopsgd.train.rundir import RunDir, load_checkpoint


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coopsgd"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoint at step 4) that the cases copy and damage."""
    d = tmp_path_factory.mktemp("good") / "run"
    code = main(["run", "--workers", "2", "--max-steps", "4", "--checkpoint-every", "2", "--executor", "loop",
                 "--no-tensorboard", "--json", "--out", str(d)])
    assert code == 0
    return d


def _ckpt(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        state = torch.load(d / "checkpoint.pt", weights_only=True)
        new = edit(state)
        torch.save(state if new is None else new, d / "checkpoint.pt")

    return damage


def _cfg(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        new = edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg if new is None else new))

    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])

    return damage


def _set(entry: str, value: object) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        *path, last = entry.split(".")
        target = state
        for key in path:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value

    return edit


# (id, damage, needles in the one line)
RUN_DIR_CASES = [
    # checkpoint.pt
    ("ckpt-empty", lambda d: (d / "checkpoint.pt").write_bytes(b""), ["checkpoint.pt", "empty"]),
    ("ckpt-truncated", _truncate("checkpoint.pt"), ["checkpoint.pt", "truncated"]),
    ("ckpt-not-a-mapping", _ckpt(lambda s: [1, 2, 3]), ["checkpoint.pt", "not a coopsgd checkpoint"]),
    ("ckpt-negative-step", _ckpt(_set("step", -4)), ["checkpoint.pt", "step=-4"]),
    ("ckpt-string-step", _ckpt(_set("step", "4")), ["checkpoint.pt", "step='4'"]),
    ("ckpt-overflowing-step", _ckpt(_set("step", 10**30)), ["checkpoint.pt", "step=10000000000"]),
    ("ckpt-negative-epoch", _ckpt(_set("loader.epoch", -1)), ["checkpoint.pt", "loader.epoch=-1"]),
    ("ckpt-loader-string", _ckpt(_set("loader", "x")), ["checkpoint.pt", "loader='x'"]),
    ("ckpt-loop-wrong-type", _ckpt(_set("loop.skips_in_a_row", "a")), ["checkpoint.pt", "loop.skips_in_a_row='a'"]),
    ("ckpt-loop-nan-time", _ckpt(_set("loop.train_s", math.nan)), ["checkpoint.pt", "loop.train_s=nan"]),
    ("ckpt-no-engine-state", _ckpt(_set("engine_state", KeyError)), ["checkpoint.pt", "engine_state=None"]),
    ("ckpt-engine-state-format", _ckpt(_set("engine_state.format", "v0")), ["checkpoint.pt", "engine_state.format='v0'"]),
    ("ckpt-config-missing", _ckpt(_set("config", KeyError)), ["checkpoint.pt", "config=None"]),
    ("ckpt-of-another-run", _ckpt(_set("config.lr", 0.05)), ["checkpoint.pt", "config.json", "lr is 0.05"]),
    # config.json
    ("config-truncated", _truncate("config.json"), ["config.json", "not valid JSON at line"]),
    ("config-empty", lambda d: (d / "config.json").write_text(""), ["config.json", "empty"]),
    ("config-a-list", lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "not a list"]),
    ("config-workers-eight", _cfg(_set("workers", "eight")), ["config.json", "workers='eight'"]),
    ("config-missing-preset", _cfg(_set("preset", KeyError)), ["config.json", "'preset' is missing"]),
    ("config-missing-lr", _cfg(_set("lr", KeyError)), ["checkpoint.pt", "config.json", "lr is 0.1"]),
    ("config-not-utf8", lambda d: (d / "config.json").write_bytes((d / "config.json").read_bytes().replace(
        b'"mlp"', b'"ml\xe9"')), ["config.json", "not UTF-8", "0xe9"]),
    ("config-seed-overflow", _cfg(_set("seed", 2**70)), ["config.json", "seed=1180591620717411303424"]),
    ("config-unknown-key", _cfg(_set("wrokers", 4)), ["config.json", "unknown key 'wrokers'"]),
]


@pytest.mark.parametrize("damage,needles", [c[1:] for c in RUN_DIR_CASES], ids=[c[0] for c in RUN_DIR_CASES])
def test_damaged_run_directory_is_refused_and_left_unchanged(capsys, tmp_path, good_run, damage, needles) -> None:
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    if "lr is 0.1" in needles:  # a config.json without lr reads as the default (0.1): make the run's differ
        state = torch.load(d / "checkpoint.pt", weights_only=True)
        state["config"]["lr"] = 0.05
        torch.save(state, d / "checkpoint.pt")
        cfg = json.loads((d / "config.json").read_text())
        cfg["lr"] = 0.05
        (d / "config.json").write_text(json.dumps(cfg))
        needles = ["checkpoint.pt", "config.json", "lr is 0.05"]
    damage(d)
    before = snapshot(d)
    code, _, err = cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")
    assert_one_line(code, err, *needles)
    assert snapshot(d) == before, "a refused resume must leave the run directory unchanged"


HOLDER = """
import sys
from coopsgd.fileio import lock_directory
held = [lock_directory(d) for d in sys.argv[1:]]
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_directory_another_process_writes_is_refused_naming_it(capsys, tmp_path, good_run) -> None:
    """Issue 24, class 1: a run directory whose lock another process holds (here a process that only holds
    it) is refused by every writing command, naming that process; nothing in it changes. A directory
    whose holder died is free again (the kernel dropped the lock)."""
    import sys

    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    e = tmp_path / "results"  # a `reproduce` output directory
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d), str(e)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        before = snapshot(d), snapshot(e)
        for argv in (["run", "--resume", str(d), "--max-steps", "6", "--json"],
                     ["run", "--workers", "2", "--max-steps", "4", "--checkpoint-every", "2", "--json", "--out", str(d)],
                     ["compare", "--presets", "sync", "--out", str(d)],
                     ["reproduce", "lsgd-toy", "--quick", "--out", str(e)],
                     ["reproduce", "report", str(e)]):
            code, _, err = cli(capsys, *argv)
            where = str(e) if argv[0] == "reproduce" else str(d)
            assert_one_line(code, err, where, f"in use by another coopsgd process (PID {holder.pid})")
        assert (snapshot(d), snapshot(e)) == before
    finally:
        holder.kill()
        holder.wait()
    code, out, err = cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")
    assert code == 0, err


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_follows_the_umask(capsys, tmp_path, umask, mode) -> None:
    """Issue 24, class 8: atomically written files (JSON, checkpoints, figures) used to be 0600 whatever
    the umask, while metrics.jsonl followed it; now every file a run writes follows it."""
    from coopsgd.fileio import atomic_write_bytes

    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        code, _, err = cli(capsys, "run", "--workers", "2", "--max-steps", "2", "--no-tensorboard", "--json",
                           "--out", str(out))
        assert code == 0, err
        atomic_write_bytes(tmp_path / "other.bin", b"x")
    finally:
        os.umask(old)
    files = [p for p in out.iterdir() if p.is_file()] + [tmp_path / "other.bin"]
    assert {"checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


@pytest.mark.parametrize("result,needles", [
    ({"claims": "reproduced"}, ["claims='reproduced'", "must be a list"]),
    ({"claims": [{"paper": "x", "verdict": "reproduced"}]}, ["claims[0]", "paper, what, verdict"]),
    ({"metrics": {"final loss": {"n": 3, "mean": "low"}}}, ["metrics.final loss", "band"]),
    ({"runtime_s": "5 s"}, ["runtime_s='5 s'", "must be a number"]),
    ([1, 2], ["must hold a JSON object"]),
], ids=["claims-text", "claim-without-what", "band-text", "runtime-text", "a-list"])
def test_damaged_result_json_for_reproduce_report(capsys, tmp_path, result, needles) -> None:
    """Issue 24, class 7: ``reproduce report DIR`` with a result.json of the wrong shape is one line naming
    the file and the field (exit 2), and writes no report."""
    (tmp_path / "lsgd-toy").mkdir()
    (tmp_path / "lsgd-toy" / "result.json").write_text(json.dumps(result))
    code, _, err = cli(capsys, "reproduce", "report", str(tmp_path))
    assert_one_line(code, err, "result.json", *needles)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("engine", ["simulate", "distributed"])
def test_state_that_cannot_fit_is_refused_before_it_is_allocated(capsys, tmp_path, monkeypatch, engine) -> None:
    """Issue 24, class 6: the stacked state is estimated against the free memory before it is allocated
    (here the machine is made to have 1000 bytes free): one line with the size it would need, no run directory,
    no process started."""
    import coopsgd.train.setup as setup

    monkeypatch.setattr(setup, "available_memory", lambda device: 1000)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--engine", engine, "--workers", "2", "--max-steps", "2", "--json",
                       "--out", str(out))
    assert_one_line(code, err, "the run's state needs", "but cpu has 1000 bytes free")
    assert not out.exists()


def test_outputs_never_replace_files_coopsgd_did_not_write(capsys, tmp_path, good_run) -> None:
    """Issue 24, class 2: ``reproduce`` does not replace a user's result.json, report.md or figure, and no
    command writes into (or below) a run directory; each refusal is one line and changes nothing."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "result.json").write_text('{"my": "numbers"}')
    (mine / "report.md").write_text("# my report\n")
    (mine / "plot.png").write_bytes(b"\x89PNG my own figure")
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = {d: snapshot(d) for d in (mine, run)}
    for argv, needles in [
        (["reproduce", "lsgd-toy", "--quick", "--out", str(mine)], ["holds files coopsgd did not write", "plot.png"]),
        (["reproduce", "report", str(mine)], ["report.md"]),
        (["reproduce", "lsgd-toy", "--quick", "--out", str(run)], ["is a run directory"]),
        (["reproduce", "lsgd-toy", "--quick", "--out", str(run / "toy")], ["lies inside the run directory"]),
        (["run", "--workers", "2", "--max-steps", "2", "--json", "--out", str(run / "inner")],
         ["lies inside the run directory"]),
        (["compare", "--presets", "sync", "--out", str(run / "cmp")], ["lies inside the run directory"]),
    ]:
        code, _, err = cli(capsys, *argv)
        assert_one_line(code, err, *needles)
    assert {d: snapshot(d) for d in (mine, run)} == before


def test_an_installed_but_broken_tensorboard_is_found_before_the_run(capsys, tmp_path, monkeypatch) -> None:
    """Issue 24, class 6: an optional dependency that is installed but whose import fails is reported before
    the run starts: an error when asked for (one line, no run directory), a warning and no event files when
    the setting is left to what is installed."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    import coopsgd.train.tensorboard as tensorboard

    monkeypatch.setattr(tensorboard, "tensorboard_import_error", lambda: "ImportError: broken install")
    ref = ["run", "--engine", "reference", "--objective", "quadratic", "--workers", "2", "--steps", "4"]
    code, _, err = cli(capsys, *ref, "--tensorboard", "--out", str(tmp_path / "asked"))
    assert_one_line(code, err, "tensorboard", "installed but cannot be imported (ImportError: broken install)")
    assert not (tmp_path / "asked").exists()
    with pytest.warns(RuntimeWarning, match=r"cannot be imported \(ImportError: broken install\)"):
        code, _, err = cli(capsys, *ref, "--json", "--out", str(tmp_path / "auto"))
    assert code == 0, err
    assert not list((tmp_path / "auto").glob("events.out.tfevents.*"))


def test_undamaged_copy_resumes(capsys, tmp_path, good_run) -> None:
    """The control: the same copy without damage resumes (so the cases above fail for their damage)."""
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    code, out, err = cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 6
    assert load_checkpoint(d / "checkpoint.pt")["step"] == 6


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl (and the run's JSON files) given to `coopsgd plot`
# ---------------------------------------------------------------------------------------------------------

def _metrics(good: list[str], edit: Callable[[list[dict]], str]) -> str:
    return edit([json.loads(line) for line in good])


def _line1(**fields: object) -> Callable[[list[dict]], str]:
    def edit(recs: list[dict]) -> str:
        rec = {**recs[0], **fields}
        for k, v in fields.items():
            if v is KeyError:
                del rec[k]
        return json.dumps(rec) + "\n" + "".join(json.dumps(r) + "\n" for r in recs[1:])

    return edit


METRICS_CASES = [
    ("a-list-line", lambda r: json.dumps(r[0]) + "\n[1, 2, 3]\n", ["metrics.jsonl:2", "JSON object", "list"]),
    ("a-number-line", lambda r: "5\n", ["metrics.jsonl:1", "int"]),
    ("torn-middle-line", lambda r: json.dumps(r[0]) + "\n" + json.dumps(r[1])[:40] + "\n" + json.dumps(r[2]) + "\n",
     ["metrics.jsonl:2", "not JSON"]),
    ("string-loss", _line1(train_loss="abc"), ["metrics.jsonl:1", "train_loss='abc'"]),
    ("no-step", _line1(step=KeyError), ["metrics.jsonl:1", "step=None"]),
    ("string-step", _line1(step="0"), ["metrics.jsonl:1", "step='0'"]),
    ("negative-step", _line1(step=-1), ["metrics.jsonl:1", "step=-1"]),
    ("string-consensus", _line1(consensus_distance="x"), ["metrics.jsonl:1", "consensus_distance='x'"]),
    ("string-time", _line1(time_s="x"), ["metrics.jsonl:1", "time_s='x'"]),
    ("list-accuracy", _line1(test_accuracy=[1]), ["metrics.jsonl:1", "test_accuracy=[1]"]),
    ("bool-rounds", _line1(rounds=True), ["metrics.jsonl:1", "rounds=True"]),
    ("worker-losses-strings", _line1(worker_losses=["a"]), ["metrics.jsonl:1", "worker_losses"]),
]


@pytest.mark.parametrize("edit,needles", [c[1:] for c in METRICS_CASES], ids=[c[0] for c in METRICS_CASES])
def test_damaged_metrics_given_to_plot(capsys, tmp_path, good_run, edit, needles) -> None:
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    good = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text(_metrics(good, edit))
    before = snapshot(d)
    fig = tmp_path / "fig.png"
    code, _, err = cli(capsys, "plot", str(d), "--out", str(fig))
    assert_one_line(code, err, *needles)
    assert not fig.exists() and snapshot(d) == before


@pytest.mark.parametrize("name,content,needles", [
    ("metrics.jsonl", b'{"step": 0, "x": "\xe9"}\n', ["metrics.jsonl", "not UTF-8"]),
    ("config.json", b'{"preset": ', ["config.json", "not valid JSON"]),
    ("config.json", b"[1]", ["config.json", "not a list"]),
    ("summary.json", b"\xff\xfe", ["summary.json", "not UTF-8"]),
    ("summary.json", b"", ["summary.json", "empty"]),
], ids=["metrics-not-utf8", "config-truncated", "config-list", "summary-not-utf8", "summary-empty"])
def test_damaged_run_files_given_to_plot(capsys, tmp_path, good_run, name, content, needles) -> None:
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    (d / name).write_bytes(content)
    code, _, err = cli(capsys, "plot", str(d), "--out", str(tmp_path / "fig.png"))
    assert_one_line(code, err, *needles)


def test_torn_last_metrics_line_is_skipped_and_plot_works(capsys, tmp_path, good_run, saved_figures,
                                                          check_png) -> None:
    """A crash while a record was appended leaves a torn last line (no newline): readers skip it."""
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    good = (d / "metrics.jsonl").read_text()
    n = good.count("\n")
    (d / "metrics.jsonl").write_text(good + '{"step": 9, "train_lo')
    assert len(RunDir.read_metrics(d)) == n
    code, out, err = cli(capsys, "plot", str(d), "--out", str(tmp_path / "fig.png"), "--json")
    assert code == 0, err
    check_png(tmp_path / "fig.png")
    # the figure holds the n whole records, and nothing of the torn one
    recs = [json.loads(line) for line in good.splitlines()]
    [loss_vs_step] = saved_figures[0].axes[0].lines
    assert list(loss_vs_step.get_xdata()) == [r["step"] for r in recs if r.get("train_loss") is not None]
    assert list(loss_vs_step.get_ydata()) == [r["train_loss"] for r in recs if r.get("train_loss") is not None]


# ---------------------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------------------

CONFIG_FILE_CASES = [
    ("latin1.toml", b'preset = "sync"\nmodel = "ml\xe9"\n', ["latin1.toml", "not UTF-8", "line 2"]),
    ("latin1.yaml", b"preset: sync\nmodel: ml\xe9\n", ["latin1.yaml", "not UTF-8"]),
    ("latin1.json", b'{"preset": "sync", "model": "ml\xe9"}', ["latin1.json", "not UTF-8"]),
    ("utf16.json", '{"preset": "sync"}'.encode("utf-16"), ["utf16.json", "not UTF-8", "0xff"]),
    ("empty.toml", b"", ["empty.toml", "empty"]),
    ("out5.toml", b"out = 5\n", ["out5.toml", "out=5"]),
    ("out-empty.toml", b'out = ""\n', ["out-empty.toml", "out=''"]),
    ("eight.toml", b'workers = "eight"\n', ["eight.toml", "workers='eight'"]),
    ("seed.json", b'{"seed": 1180591620717411303424}', ["seed.json", "seed=1180591620717411303424"]),
    ("model.yaml", b"model: 5\n", ["model.yaml", "model=5"]),
]


@pytest.mark.parametrize("name,content,needles", CONFIG_FILE_CASES, ids=[c[0] for c in CONFIG_FILE_CASES])
def test_damaged_config_file(capsys, tmp_path, name, content, needles) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    code, _, err = cli(capsys, "run", "--config", str(f), "--max-steps", "1")
    assert_one_line(code, err, *needles)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "5").exists()


# ---------------------------------------------------------------------------------------------------------
# unusable output paths
# ---------------------------------------------------------------------------------------------------------

OUTPUT_CASES = [
    (["run", "--max-steps", "1", "--out", "{file}/sub"], "out="),
    (["run", "--max-steps", "1", "--out", "{file}"], "exists and is not a directory"),
    (["compare", "--presets", "sync", "--max-steps", "1", "--out", "{file}/sub"], "out="),
    (["plot", "{run}", "--out", "{file}/fig.png"], "out="),
    (["plot", "{run}", "--out", "{dir}"], "fig.png"),  # a directory, not a figure file name
    (["topology", "ring", "--plot", "{file}/fig.png"], "--plot"),
    (["theory", "heatmap", "--out", "{file}/fig.png"], "--out"),
    (["reproduce", "matrix-completion", "--quick", "--out", "{file}/mc"], "--out"),
]


@pytest.mark.parametrize("argv,needle", OUTPUT_CASES, ids=[" ".join(c[0][:2]) + f"-{i}" for i, c in enumerate(OUTPUT_CASES)])
def test_output_below_a_regular_file(capsys, tmp_path, good_run, argv, needle) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("keep me\n")
    (tmp_path / "fig.png").mkdir()
    paths = {"file": str(regular), "run": str(good_run), "dir": str(tmp_path / "fig.png")}
    code, _, err = cli(capsys, *[a.format(**paths) for a in argv])
    assert_one_line(code, err, needle, "a-file" if "{file}" in " ".join(argv) else "fig.png")
    assert regular.read_text() == "keep me\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions (chmod does not restrict it)")
def test_unwritable_output_directory(capsys, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = cli(capsys, "run", "--max-steps", "1", "--out", str(locked / "run"))
        assert_one_line(code, err, "out=", "not writable")
        code, _, err = cli(capsys, "topology", "ring", "--plot", str(locked / "fig.png"))
        assert_one_line(code, err, "--plot", "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def _enospc_when(match: Callable[[str], bool], monkeypatch: pytest.MonkeyPatch, *, partial: bool = False) -> list[str]:
    """Make ``os.fsync`` (atomic writes) or ``os.write`` (metrics appends, with ``partial``: after writing
    half the bytes) fail with ENOSPC for files whose path ``match``es; returns the paths that failed."""
    failed: list[str] = []

    def path_of(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    if partial:
        real_write = os.write

        def write(fd: int, data: bytes) -> int:
            if match(path_of(fd)):
                failed.append(path_of(fd))
                real_write(fd, bytes(data[: len(data) // 2]))  # a torn record, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    else:
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if match(path_of(fd)):
                failed.append(path_of(fd))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    return failed


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names from /proc/self/fd")


@pytest.mark.slow
@needs_proc
def test_full_disk_at_the_checkpoint_keeps_the_previous_one(capsys, tmp_path, good_run, monkeypatch) -> None:
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    old = (d / "checkpoint.pt").read_bytes()
    failed = _enospc_when(lambda p: ".checkpoint.pt." in p, monkeypatch)
    code, _, err = cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")
    monkeypatch.undo()
    assert failed
    assert_one_line(code, err, f"cannot write '{d / 'checkpoint.pt'}'", "No space left on device",
                    "the previous file is unchanged")
    assert (d / "checkpoint.pt").read_bytes() == old
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")], "no temporary file is left"
    # nothing is lost: the run resumes from the step-4 checkpoint and finishes
    code, out, err = cli(capsys, "run", "--resume", str(d), "--max-steps", "6", "--json")
    assert code == 0, err
    assert [r["step"] for r in RunDir.read_metrics(d)][-1] == 6


@needs_proc
def test_full_disk_during_a_metrics_append_leaves_no_torn_record(capsys, tmp_path, monkeypatch) -> None:
    rd = RunDir(tmp_path / "run")
    rd.start_metrics()
    rd.log({"step": 0, "train_loss": 1.0})
    rd.log({"step": 1, "train_loss": 0.5})
    before = rd.metrics_path.read_bytes()
    failed = _enospc_when(lambda p: p.endswith("metrics.jsonl"), monkeypatch, partial=True)
    with pytest.raises(OSError) as info:
        rd.log({"step": 2, "train_loss": 0.25})
    monkeypatch.undo()
    assert failed and info.value.errno == errno.ENOSPC
    assert "metrics.jsonl" in str(getattr(info.value, "coopsgd_message", ""))
    assert rd.metrics_path.read_bytes() == before, "the half-written record was cut back"
    rd.log({"step": 2, "train_loss": 0.25})  # space again: the file continues cleanly
    rd.close()
    assert [r["step"] for r in RunDir.read_metrics(rd.path)] == [0, 1, 2]


@needs_proc
def test_full_disk_during_a_run_is_one_line(capsys, tmp_path, monkeypatch) -> None:
    d = tmp_path / "run"
    _enospc_when(lambda p: p.endswith("metrics.jsonl"), monkeypatch, partial=True)
    code, _, err = cli(capsys, "run", "--workers", "2", "--max-steps", "2", "--executor", "loop", "--json",
                       "--out", str(d))
    monkeypatch.undo()
    assert_one_line(code, err, "metrics.jsonl", "No space left on device")
    assert (d / "metrics.jsonl").read_bytes() == b""  # the first record failed whole: no torn line


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_real_full_disk_on_a_small_tmpfs(tmp_path) -> None:
    """A real ENOSPC: a 600 KiB tmpfs takes the JSON files and metrics but not the 1.6 MB checkpoint."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        res = subprocess.run(["coopsgd", "run", "--workers", "2", "--max-steps", "4", "--executor", "loop",
                              "--json", "--out", str(mnt / "run")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
        assert "checkpoint.pt" in res.stderr and "No space left on device" in res.stderr
        assert not [p for p in (mnt / "run").iterdir() if p.name.endswith(".tmp")]
        assert RunDir.read_metrics(mnt / "run")[-1]["step"] == 4  # every record before the failure is kept
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------------------
# absurd numbers
# ---------------------------------------------------------------------------------------------------------

BIG = str(10**30)
NUMBER_CASES = [
    # seeds
    (["run", "--seed", str(2**70)], "seed=1180591620717411303424"),
    (["run", "--seed", "-1"], "seed=-1"),
    (["topology", "random", "--workers", "10", "--seed", str(2**70)], "seed="),
    (["reproduce", "matrix-completion", "--seed", str(2**70)], "--seed="),
    # counts and sizes
    (["run", "--max-steps", BIG], "max_steps="),
    (["run", "--tau", BIG], "tau="),
    (["run", "--eval-every", BIG], "eval_every="),
    (["run", "--checkpoint-every", BIG], "checkpoint_every="),
    (["run", "--lr-warmup-steps", BIG], "lr_warmup_steps="),
    (["run", "--eval-samples", BIG], "eval_samples="),
    (["run", "--max-skips", BIG], "max_skips="),
    (["run", "--workers", str(10**12)], "workers="),
    (["run", "--batch-size", "0"], "batch_size=0"),
    (["run", "--epochs", "1e300"], "epochs="),
    (["theory", "--preset", "local_sgd", "--params", BIG], "params="),
    # rates
    (["run", "--lr", "1e400"], "lr=inf"),
    (["run", "--lr", "nan"], "lr=nan"),
    (["run", "--lr", "1e300"], "float32"),
    (["run", "--preset", "lsgd", "--lam", "1e300"], "lam="),
    (["run", "--lr", "1e30", "--lr-decay-factor", "1e10", "--lr-decay-epochs", "1,2"], "lr_decay_factor="),
    (["run", "--compute-gflops", "1e-300"], "compute_gflops="),
    (["run", "--net-bandwidth-mbps", "1e-300"], "net_bandwidth_mbps="),
    (["run", "--compute", "lognormal", "--compute-spread", "1e300"], "compute_spread="),
    # times
    (["run", "--timeout-s", "1e300"], "timeout_s="),
    (["run", "--compute-ms", "1e308"], "compute_ms="),
    (["run", "--net-latency-ms", "1e308"], "net_latency_ms="),
    # zero or empty never means "the default"
    (["reproduce", "matrix-completion", "--trials", "0"], "--trials=0"),
    (["reproduce", "matrix-completion", "--steps", "0"], "--steps=0"),
    (["reproduce", "matrix-completion", "--d", "0"], "--d=0"),
    (["reproduce", "matrix-completion", "--ranks", ""], "ranks=''"),
    (["reproduce", "matrix-completion", "--d", str(10**8)], "--d="),
    (["reproduce", "csgd-fig4", "--trials", "3"], "--trials=3"),
    (["theory", "heatmap", "--out", "h.png", "--max-tau", "0"], "--max-tau=0"),
    (["run", "--out", ""], "out=''"),
    # graphs too large to build densely
    (["topology", "random", "--workers", "200000"], "8192"),
    (["topology", "one_peer_exponential", "--workers", "262144"], "8192"),
    (["topology", "ring", "--workers", str(10**12)], "workers="),
    (["topology", "ring", "--workers", "5000", "--plot", "ring.png"], "--plot="),
    (["theory", "--preset", "dpsgd", "--workers", "200000"], "8192"),
    (["run", "--engine", "reference", "--preset", "dpsgd", "--workers", "20000", "--objective", "quadratic"], "8192"),
]


@pytest.mark.parametrize("argv,needle", NUMBER_CASES, ids=[" ".join(c[0])[:60] for c in NUMBER_CASES])
def test_absurd_number(capsys, tmp_path, argv, needle) -> None:
    argv = list(argv)
    if argv[0] == "run":
        argv += ["--out", str(tmp_path / "out")] if "--out" not in argv else []
        if "--max-steps" not in argv:
            argv += ["--max-steps", "1"]
    code, _, err = cli(capsys, *argv)
    assert_one_line(code, err, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_large_ring_spectrum_in_closed_form(capsys) -> None:
    """`topology ring --workers 200000` answers from the closed form (it used to allocate 37 GiB)."""
    n = 200000
    code, out, err = cli(capsys, "topology", "ring", "--workers", str(n), "--json")
    assert code == 0, err
    info = json.loads(out)
    lam2 = 1.0 - (2.0 - 2.0 * math.cos(2.0 * math.pi / n)) / 3.0  # W = I - L/3, L's smallest non-zero
    assert info["matrix"] is None and info["n"] == n
    assert info["zeta"] == pytest.approx(lam2, abs=1e-15)
    assert info["smallest_eigenvalue"] == pytest.approx(-1.0 / 3.0, abs=1e-15)
    assert info["connected"] and info["theory_applies"] and info["closed_form"]


def test_config_error_from_overflowing_seed_is_a_config_error() -> None:
    from coopsgd.train.config import RunConfig

    with pytest.raises(ConfigError, match="seed"):
        RunConfig(seed=2**64)
