"""The code a result records (coopsgd.experiments.provenance): hashes, git state, fallbacks, staleness."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from coopsgd.experiments import provenance as prov

GIT = shutil.which("git")


def _package(root: Path) -> Path:
    """A small package tree: two modules, a presentation-only module and a bundled data file."""
    pkg = root / "coopsgd"
    (pkg / "experiments").mkdir(parents=True)
    (pkg / "data" / "bundled").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The package."""\n\nVALUE = 1  # one\n')
    (pkg / "experiments" / "run.py").write_text(
        '"""Runs."""\n\n\ndef f(x):\n    """Double it."""\n    return 2 * x  # doubled\n')
    (pkg / "experiments" / "report.py").write_text("TITLE = 'report'\n")
    (pkg / "data" / "bundled" / "numbers.txt").write_text("1 2 3\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("ignored = True\n")
    return pkg


def test_source_hash_is_the_sorted_files_bytes(tmp_path) -> None:
    pkg = _package(tmp_path)
    files = prov.source_files(pkg)
    assert [rel for rel, _ in files] == ["__init__.py", "experiments/report.py", "experiments/run.py"]
    h = hashlib.sha256()
    for rel, path in files:  # the documented definition, written out
        name, content = rel.encode(), path.read_bytes()
        h.update(len(name).to_bytes(8, "big") + name + len(content).to_bytes(8, "big") + content)
    assert prov.source_sha256(pkg) == h.hexdigest()
    before = prov.source_sha256(pkg)
    (pkg / "__init__.py").write_bytes((pkg / "__init__.py").read_bytes().replace(b"\n", b"\r\n"))
    assert prov.source_sha256(pkg) == before  # line ends do not count
    (pkg / "__init__.py").write_text('"""The package."""\n\nVALUE = 1  # one!\n')
    assert prov.source_sha256(pkg) != before  # any byte of a module does


def test_results_code_hash_ignores_comments_docstrings_and_the_report(tmp_path) -> None:
    pkg = _package(tmp_path)
    base = prov.results_code_sha256(pkg)
    run = pkg / "experiments" / "run.py"
    run.write_text('"""Runs, reworded\nover two lines."""\n\ndef f(x):\n\n    """Twice x."""  \n'
                   '    return 2 * x  # the double\n# trailing note\n')
    (pkg / "experiments" / "report.py").write_text("TITLE = 'another report'\n")
    assert prov.results_code_sha256(pkg) == base
    assert prov.source_sha256(pkg) != prov.source_sha256(_package(tmp_path / "fresh"))
    run.write_text('"""Runs."""\n\n\ndef f(x):\n    """Double it."""\n    return 3 * x  # doubled\n')
    changed = prov.results_code_sha256(pkg)
    assert changed != base  # a statement counts
    (pkg / "data" / "bundled" / "numbers.txt").write_text("1 2 4\n")
    assert prov.results_code_sha256(pkg) not in (base, changed)  # so does the bundled data
    # a string that holds a '#' or looks like a docstring elsewhere is code
    assert prov.code_only(b'x = "a # b"\n') == b'x = "a # b"\n'
    assert prov.code_only(b'x = 1\n"""not a docstring"""\n') != prov.code_only(b"x = 1\n")
    assert prov.code_only("s = 'é'  # café\n".encode()) == "s = 'é'\n".encode()
    assert prov.code_only(b"def (:\n") == b"def (:\n"  # a file that does not parse counts as it is


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "HOME": str(cwd), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=env).stdout


@pytest.mark.skipif(GIT is None, reason="needs git")
def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path) -> None:
    repo = tmp_path / "repo"
    pkg = _package(repo / "src")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert prov.git_state(pkg) == (head, False)
    _git(repo, "rm", "-q", "--cached", "src/coopsgd/__init__.py")  # an index that lags HEAD: the files are HEAD's
    assert prov.git_state(pkg) == (head, False)
    _git(repo, "add", "src/coopsgd/__init__.py")
    (repo / "README").write_text("outside the package\n")  # a change outside the package is not the package's
    assert prov.git_state(pkg) == (head, False)
    (pkg / "experiments" / "new.py").write_text("x = 1\n")  # an untracked module under the package
    assert prov.git_state(pkg) == (head, True)
    (pkg / "experiments" / "new.py").unlink()
    (pkg / "__init__.py").write_text("VALUE = 2\n")  # a tracked file changed
    assert prov.git_state(pkg) == (head, True)


@pytest.mark.skipif(GIT is None, reason="needs git")
def test_an_installed_package_inside_another_checkout_has_no_commit(tmp_path) -> None:
    repo = tmp_path / "project"
    (repo / "venv").mkdir(parents=True)
    (repo / ".gitignore").write_text("venv/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".gitignore")
    _git(repo, "commit", "-q", "-m", "project")
    pkg = _package(repo / "venv" / "site-packages")  # an installed wheel: its files are not tracked there
    assert prov.git_state(pkg) == (None, None)
    p = prov.provenance(pkg)
    assert p["git_commit"] is None and p["git_dirty"] is None
    assert p["source_sha256"] == prov.source_sha256(pkg) and p["results_code_sha256"] == prov.results_code_sha256(pkg)


def test_no_git_and_unreadable_files_never_fail(tmp_path, monkeypatch) -> None:
    pkg = _package(tmp_path)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(prov.subprocess, "run", no_git)
    p = prov.provenance(pkg)
    assert (p["git_commit"], p["git_dirty"]) == (None, None)
    assert p["source_sha256"] == prov.source_sha256(pkg) and len(p["source_sha256"]) == 64
    assert "no git checkout" in prov.describe(p) and p["source_sha256"][:12] in prov.describe(p)
    assert prov.source_sha256(tmp_path / "absent") == prov.source_sha256(tmp_path / "also absent")  # empty, not an error

    def unreadable(self):
        raise PermissionError("denied")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    p = prov.provenance(pkg)
    assert p["source_sha256"] is None and p["results_code_sha256"] is None
    assert prov.staleness(p, p) == "not recorded"


def test_the_installed_package_records_versions_and_threads() -> None:
    import torch

    from coopsgd import __version__

    p = prov.provenance()
    assert p["coopsgd"] == __version__ and p["torch"] == torch.__version__
    assert p["threads"] == torch.get_num_threads() and p["one_thread_models"]
    assert p["source_sha256"] and p["results_code_sha256"] and p["python"]
    json.dumps(p)  # JSON-ready


def test_staleness_and_changes_during_a_run(tmp_path) -> None:
    pkg = _package(tmp_path)
    started = prov.provenance(pkg)
    assert prov.staleness(started, started) == "current"
    assert prov.staleness(None, started) == "not recorded"
    assert prov.staleness({"coopsgd": "0.1.0"}, started) == "not recorded"
    assert prov.staleness({**started, "results_code_sha256": "0" * 64}, started) == "stale"
    assert prov.staleness({**started, "git_commit": "another"}, started) == "current"  # the commit is not compared
    assert "source_changed_during_run" not in prov.finish(started, pkg)
    (pkg / "__init__.py").write_text('"""Reworded."""\n\nVALUE = 1\n')  # a docstring: the results code is the same
    assert "source_changed_during_run" not in prov.finish(started, pkg)
    (pkg / "__init__.py").write_text("VALUE = 2\n")
    done = prov.finish(started, pkg)
    assert done["source_changed_during_run"] is True and prov.staleness(done, started) == "stale"


def test_reproduce_records_the_code_in_result_json_and_the_report(tmp_path) -> None:
    from coopsgd.cli import main

    assert main(["reproduce", "lsgd-toy", "--quick", "--out", str(tmp_path / "lsgd-toy")]) == 0
    data = json.loads((tmp_path / "lsgd-toy" / "result.json").read_text())
    p = data["provenance"]
    assert p["results_code_sha256"] == prov.results_code_sha256() and p["argv"]
    assert set(p) >= {"coopsgd", "git_commit", "git_dirty", "source_sha256", "torch", "threads", "blas"}
    assert main(["reproduce", "report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert f"Code: coopsgd {p['coopsgd']}" in text and "| lsgd-toy | quick | 1 |" in text
    assert "| current |" in text and "Produced by the results code rendering this report" in text
