"""Architecture rules (docs/architecture.md), checked on the source so that they cannot drift.

* arrows point one way: ``engines`` never import ``train``, ``experiments``, the CLI layer or glue modules;
  the pure math (``topology``, ``theory``, ``algorithms``) imports neither engines nor ``torch.distributed``;
  inside ``train`` the modules import each other without a cycle (the run set-up below the runners);
* nothing in the engines or the training loop branches on a preset's name, or reads a schedule's private
  attributes (schedules declare what they need).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from coopsgd.algorithms.presets import PRESETS

SRC = Path(__file__).resolve().parents[2] / "src" / "coopsgd"


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def _imports(path: Path, pkg: str | None = None) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (functions included), resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if pkg is None:
        pkg = ".".join(("coopsgd", *path.relative_to(SRC).with_suffix("").parts[:-1]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _modules(package):
        for line, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    return bad


def test_engines_import_nothing_above_them() -> None:
    forbidden = ("coopsgd.train", "coopsgd.experiments", "coopsgd.cli", "coopsgd.torchrun", "coopsgd.analysis",
                 "coopsgd.plots", "coopsgd.wrapper")
    assert _violations("engines", forbidden) == []


@pytest.mark.parametrize("package", ["topology", "theory", "algorithms"])
def test_pure_math_imports_no_engine_and_no_process_group(package: str) -> None:
    forbidden = ("coopsgd.engines", "coopsgd.train", "coopsgd.experiments", "coopsgd.cli", "torch.distributed")
    assert _violations(package, forbidden) == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("coopsgd", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, at any depth (functions included): ``from m import x``
    is an import of the module ``m.x`` when that is a module, else of ``m``."""
    paths = _modules(package)
    names = {_module_name(p) for p in paths}

    def resolve(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for path in paths:
        me = _module_name(path)
        pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in names else resolve(base) for a in node.names}
        graph[me] = {t for t in found if t is not None and t != me}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``None``: it is acyclic)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_train_imports_without_a_cycle() -> None:
    """docs/architecture.md's order inside train/: config, loop, progress, rundir -> problem -> checkpoint,
    records -> setup -> reference, distributed -> trainer (each imports only what is left of it)."""
    graph = _import_graph("train")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    t = "coopsgd.train."
    assert f"{t}trainer" not in set().union(*(graph[m] for m in graph if m != f"{t}trainer"))
    for low in ("problem", "checkpoint", "records", "setup"):
        assert not graph[t + low] & {f"{t}trainer", f"{t}distributed", f"{t}reference"}, low


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_rule_catches_a_violation(tmp_path) -> None:
    """The checker itself: imports inside functions and relative imports are found and resolved."""
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from coopsgd.train.trainer import train\n    from ..train import loop\n")
    names = {name for _, name in _imports(f, "coopsgd.engines")}
    assert {"coopsgd.train.trainer", "coopsgd.train", "coopsgd.train.loop"} <= names


def _preset_name_branches(path: Path) -> list[str]:
    """Comparisons of a string literal naming a preset (``x == "fedavg"``, ``x in ("sync", ...)``)."""
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        consts = []
        for side in [node.left, *node.comparators]:
            if isinstance(side, ast.Constant) and isinstance(side.value, str):
                consts.append(side.value)
            elif isinstance(side, (ast.Tuple, ast.List, ast.Set)):
                consts += [e.value for e in side.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        hits = [c for c in consts if c in PRESETS]
        if hits:
            bad.append(f"{path.relative_to(SRC)}:{node.lineno} compares with preset name(s) {hits}")
    return bad


def _private_schedule_reads(path: Path) -> list[str]:
    """``schedule._x`` / ``sched._x`` reads: engines must use what a schedule declares."""
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name in ("schedule", "sched"):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} reads {name}.{node.attr}")
    return bad


@pytest.mark.parametrize("package", ["engines", "train"])
def test_no_branch_on_preset_names_and_no_private_schedule_state(package: str) -> None:
    bad = []
    for path in _modules(package):
        bad += _preset_name_branches(path) + _private_schedule_reads(path)
    assert bad == []


def test_compression_imports_only_torch_numpy_and_the_leaves() -> None:
    if not (SRC / "compression").is_dir():
        pytest.skip("no compression package")
    allowed = ("coopsgd.compression", "coopsgd.errors", "coopsgd.settings")
    bad = [f"{p.relative_to(SRC)}:{line} imports {name}" for p in _modules("compression")
           for line, name in _imports(p)
           if name.startswith("coopsgd") and not any(name == a or name.startswith(a + ".") for a in allowed)]
    assert bad == []


def test_train_imports_no_experiment_and_no_cli() -> None:
    assert _violations("train", ("coopsgd.experiments", "coopsgd.cli", "coopsgd.torchrun")) == []


def test_only_the_cli_layer_imports_experiments_and_nothing_imports_the_cli() -> None:
    cli_layer = ("cli", "torchrun.py", "__main__.py", "catalog.py")
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        in_cli = rel.parts[0] in cli_layer
        for line, name in _imports(path):
            if not in_cli and rel.parts[0] != "experiments" and name.startswith("coopsgd.experiments"):
                bad.append(f"{rel}:{line} imports {name}")
            if not in_cli and (name.startswith("coopsgd.cli") or name.startswith("coopsgd.torchrun")):
                bad.append(f"{rel}:{line} imports {name}")
    assert bad == []
