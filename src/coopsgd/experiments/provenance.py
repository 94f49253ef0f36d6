"""Which code produced a result: the ``provenance`` of every ``result.json`` that ``coopsgd reproduce`` writes.

:func:`provenance` records the package version; the git commit when the package's own files are tracked in a
git checkout (``git rev-parse HEAD`` run in the package directory) and whether they differ from it
(``git_dirty``: a module or bundled data file changed, removed or added under the package); two hashes of the
package's files; the Python, numpy and torch versions; torch's thread count and CPU kernels; and the BLAS
libraries numpy and torch loaded (OpenBLAS picks its kernels by CPU, and the last bits of a result depend on
them). Nothing in it can fail a run: a missing ``git``, a package without a checkout (an installed wheel) or
an unreadable file leaves that field ``None``.

The two hashes (SHA-256, over the files sorted by their path relative to the package, ``/``-separated, line
ends read as ``\\n``):

* ``source_sha256``: the bytes of every ``coopsgd/**/*.py``; it names the code exactly, with or without git.
* ``results_code_sha256``: the code that can change a number of a result: every ``*.py`` except the modules
  that only read results (:data:`PRESENTATION_ONLY`: the report and this module), each with its comments,
  docstrings, blank lines and trailing spaces removed, plus the bundled data files (``data/bundled/``) byte
  for byte.

``coopsgd reproduce report`` compares ``results_code_sha256`` (:func:`staleness`), not the commit: a commit
that edits documentation, tests or a docstring leaves every number as it was, and a result rendered after it
is still current; an edit of a statement in any other module counts, even where it happens not to move a
number (the hash cannot tell: the report marks the result stale, and rerunning it tells). Versions, threads and
BLAS kernels are shown beside each result, not compared: the same code gives the same numbers on another
machine only with the same kernels and threads (``tests/integration/test_committed_results.py`` pins them).
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import platform
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

__all__ = ["PRESENTATION_ONLY", "provenance", "finish", "source_files", "source_sha256", "results_code_sha256",
           "git_state", "staleness", "describe"]

#: Package modules (paths relative to the package) that read results and never compute one: they are left out
#: of ``results_code_sha256``, so that editing the report leaves the results current.
PRESENTATION_ONLY: tuple[str, ...] = ("experiments/report.py", "experiments/provenance.py")
#: Package data that results are computed from (relative to the package), hashed byte for byte.
DATA_DIRS: tuple[str, ...] = ("data/bundled",)
#: The package directory (``src/coopsgd`` in a checkout, ``site-packages/coopsgd`` in an installation).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
#: Seconds each git command may take.
GIT_TIMEOUT_S = 5.0


def source_files(package: Path = PACKAGE_DIR) -> list[tuple[str, Path]]:
    """Every ``*.py`` of the package as ``(path relative to the package, "/"-separated; absolute path)``, sorted
    by the relative path (caches and hidden folders left out)."""
    files = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def _read(path: Path) -> bytes:
    return path.read_bytes().replace(b"\r\n", b"\n")


def _digest(entries: list[tuple[str, bytes]]) -> str:
    """SHA-256 over ``(name, content)`` pairs, each length-prefixed (no two lists give the same stream)."""
    h = hashlib.sha256()
    for name, content in entries:
        raw = name.encode("utf-8")
        h.update(len(raw).to_bytes(8, "big") + raw + len(content).to_bytes(8, "big") + content)
    return h.hexdigest()


def source_sha256(package: Path = PACKAGE_DIR) -> str | None:
    """SHA-256 of the bytes of every ``*.py`` of the package (``None`` when a file cannot be read)."""
    try:
        return _digest([(rel, _read(path)) for rel, path in source_files(package)])
    except OSError:
        return None


#: :func:`code_only` of each file content seen in this process (keyed by its SHA-256): parsing and tokenizing
#: the package takes about a second, and ``reproduce all`` asks once per experiment.
_CODE_ONLY: dict[str, bytes] = {}


def code_only(source: bytes) -> bytes:
    """``source`` without its comments, docstrings, blank lines and trailing spaces (what the statements are);
    a file that does not parse is returned as it is."""
    text = source.decode("utf-8", errors="surrogateescape")
    try:
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return source
    lines = text.split("\n")

    def byte_col(line: int, col: int) -> int:  # tokenize counts characters, the ast UTF-8 bytes
        return len(lines[line - 1][:col].encode("utf-8", errors="surrogateescape"))

    spans: list[tuple[int, int, int, int]] = []  # (start line, start byte, end line, end byte), lines from 1
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str) and first.end_lineno is not None
                    and first.end_col_offset is not None):
                spans.append((first.lineno, first.col_offset, first.end_lineno, first.end_col_offset))
    spans += [(t.start[0], byte_col(*t.start), t.end[0], byte_col(*t.end)) for t in tokens if t.type == tokenize.COMMENT]
    raw = [line.encode("utf-8", errors="surrogateescape") for line in lines]
    for l0, c0, l1, c1 in sorted(spans, reverse=True):  # from the end, so that earlier offsets stay valid
        if l0 == l1:
            raw[l0 - 1] = raw[l0 - 1][:c0] + raw[l0 - 1][c1:]
        else:
            raw[l0 - 1] = raw[l0 - 1][:c0]
            for i in range(l0, l1 - 1):
                raw[i] = b""
            raw[l1 - 1] = raw[l1 - 1][c1:]
    kept = [line.rstrip() for line in raw]
    return b"\n".join(line for line in kept if line.strip()) + b"\n"


def _code_only_cached(source: bytes) -> bytes:
    key = hashlib.sha256(source).hexdigest()
    if key not in _CODE_ONLY:
        _CODE_ONLY[key] = code_only(source)
    return _CODE_ONLY[key]


def results_code_sha256(package: Path = PACKAGE_DIR) -> str | None:
    """SHA-256 of the code that can change a result (see the module docstring; ``None`` when a file cannot be
    read)."""
    try:
        entries = [(rel, _code_only_cached(_read(path)) if rel.endswith(".py") else path.read_bytes())
                   for rel, path in _tree_files(package) if rel not in PRESENTATION_ONLY]
        return _digest(entries)
    except OSError:
        return None


def _git(package: Path, *args: str, stdin: str | None = None) -> str | None:
    """stdout of ``git -C package ARGS`` (``None`` if git is missing, fails or times out); never takes a lock."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        if stdin is None:
            res = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                                 timeout=GIT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
        else:
            res = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, input=stdin,
                                 timeout=GIT_TIMEOUT_S, env=env)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return res.stdout if res.returncode == 0 else None


def _counts(rel: str) -> bool:
    """Whether the package file at ``rel`` is one :func:`_tree_files` lists (a module or bundled data)."""
    parts = rel.split("/")
    if "__pycache__" in parts:
        return False
    if any(rel.startswith(d + "/") for d in DATA_DIRS):
        return True
    return rel.endswith(".py") and not any(part.startswith(".") for part in parts)


def _tree_files(package: Path) -> list[tuple[str, Path]]:
    """The package's files whose content a result can depend on: every ``*.py`` and the bundled data."""
    files = list(source_files(package))
    for folder in DATA_DIRS:
        root = package / folder
        if root.is_dir():
            files += [(p.relative_to(package).as_posix(), p) for p in root.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def git_state(package: Path = PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout whose ``HEAD`` holds the package's files; ``(None, None)`` when it
    holds none (an installed wheel, even inside another project's checkout) or git cannot say. ``dirty``: a
    module or bundled data file under the package differs from ``HEAD``, is missing, or is not in ``HEAD`` (a new
    module). The working files are compared with ``HEAD``'s blobs directly, so a stale or shared index changes
    nothing."""
    head = _git(package, "rev-parse", "--verify", "HEAD")
    listing = _git(package, "ls-tree", "-r", "HEAD", ".") if head else None
    if not head or not head.strip() or not listing or not listing.strip():
        return None, None
    committed: dict[str, str] = {}
    for line in listing.splitlines():
        meta, _, path = line.partition("\t")
        fields = meta.split()
        if len(fields) == 3 and fields[1] == "blob":
            committed[path] = fields[2]
    wanted = {rel for rel, _ in _tree_files(package)}
    relevant = {rel: sha for rel, sha in committed.items() if _counts(rel)}
    if set(relevant) != wanted:
        return head.strip(), True
    names = sorted(wanted)
    hashed = _git(package, "hash-object", "--stdin-paths", stdin="".join(f"{package / n}\n" for n in names))
    if hashed is None:
        return head.strip(), None
    return head.strip(), hashed.split() != [relevant[n] for n in names]


def _versions() -> dict[str, Any]:
    """Python, numpy and torch versions, torch's threads and CPU kernels, and the BLAS libraries loaded."""
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": None, "torch": None, "threads": None,
                           "torch_cpu_capability": None, "blas": None}
    try:
        import numpy

        out["numpy"] = numpy.__version__
        import torch

        out["torch"] = torch.__version__
        out["threads"] = int(torch.get_num_threads())
        out["torch_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # a broken installation still gets a result: the field stays None
        pass
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-untyped]

        out["blas"] = [{"library": str(i.get("internal_api")), "version": i.get("version"),
                        "architecture": i.get("architecture"), "threads": i.get("num_threads")}
                       for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception:
        pass
    return out


def provenance(package: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The provenance of a result computed now by the package at ``package`` (see the module docstring)."""
    from coopsgd import __version__
    from coopsgd.train.problem import ONE_THREAD_MODELS

    commit, dirty = git_state(package)
    return {
        "coopsgd": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "source_sha256": source_sha256(package),
        "results_code_sha256": results_code_sha256(package),
        **_versions(),
        # the simulator runs these models with one thread (coopsgd.train.problem.run_threads), the rest with `threads`
        "one_thread_models": list(ONE_THREAD_MODELS),
        "platform": f"{platform.system()} {platform.machine()}",
        "argv": list(sys.argv),
    }


def finish(started: dict[str, Any], package: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``started`` (the provenance taken when the run began), with ``source_changed_during_run`` set when the
    package's results code changed while it ran (the result may mix two versions)."""
    out = dict(started)
    if started.get("source_sha256") is None or source_sha256(package) == started["source_sha256"]:
        return out  # the quick check: not a byte changed
    now = results_code_sha256(package)
    if now is not None and started.get("results_code_sha256") is not None and now != started["results_code_sha256"]:
        out["source_changed_during_run"] = True
    return out


def staleness(recorded: Any, current: dict[str, Any]) -> str:
    """How a result's provenance compares with the code rendering the report: ``"current"`` (same results
    code), ``"stale"`` (other results code, or files changed while it ran) or ``"not recorded"`` (a result
    written before results recorded their code, or without a results hash)."""
    if not isinstance(recorded, dict) or not recorded.get("results_code_sha256"):
        return "not recorded"
    if recorded.get("source_changed_during_run"):
        return "stale"
    return "current" if recorded["results_code_sha256"] == current.get("results_code_sha256") else "stale"


def describe(p: dict[str, Any]) -> str:
    """One line naming the code of provenance ``p``: version, commit, results-code hash, torch, threads, BLAS."""
    parts = [f"coopsgd {p.get('coopsgd') or '?'}"]
    if p.get("git_commit"):
        parts.append(f"commit {str(p['git_commit'])[:10]}" + (" with uncommitted changes" if p.get("git_dirty") else ""))
    else:
        parts.append(f"source sha256 {str(p.get('source_sha256') or '?')[:12]} (no git checkout)")
    parts.append(f"results code {str(p.get('results_code_sha256') or '?')[:12]}")
    torch = f"torch {p.get('torch') or '?'}"
    if p.get("torch_cpu_capability"):
        torch += f" ({p['torch_cpu_capability']})"
    parts.append(torch)
    if p.get("threads") is not None:
        models = p.get("one_thread_models")
        small = ", ".join(map(str, models)) if isinstance(models, list) else ""
        parts.append(f"torch threads {p['threads']}" + (f" (1 for {small} on the simulator)" if small else ""))
    blas = p.get("blas")
    for b in blas if isinstance(blas, list) else []:
        if not isinstance(b, dict):
            continue
        parts.append(" ".join(str(x) for x in (b.get("library"), b.get("version"), b.get("architecture")) if x))
    if p.get("python"):
        parts.append(f"Python {p['python']}")
    return ", ".join(parts)
