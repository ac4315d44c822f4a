"""The layout's rules, checked: every module imports on its own, the import graph has no cycle, and
imports sit at module top except for the optional heavy libraries named below.

The graph is read from the source (ast), so a cycle hidden inside a function counts too: a
function-level import that closes a loop still means the two modules cannot be understood, or
tested, one at a time.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("piano_gpt_jax", "converters")

def _optional_dependencies() -> set[str]:
    """Import names of pyproject.toml's extras: the one list of optional dependencies."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("-", "_")
             for reqs in extras.values() for req in reqs}
    return names - {"jax"}  # jax[cuda12] adds a backend to a core dependency


# Imports allowed inside functions, each for a stated reason: optional at install time (the
# extras of pyproject.toml), must be configured before import (matplotlib needs the Agg backend
# first), or heavy and needed by a few paths only (music21 for the built-in corpus, symusic and
# mido for MIDI files, tqdm for progress bars, numpy._core for the stubs that read torch pickles
# without running code).
LAZY_ALLOWED = _optional_dependencies() | {
    "matplotlib", "music21", "symusic", "mido", "tqdm", "numpy._core", "warnings"}
# Files outside the rule: command-line edges (late imports keep `--help` fast) and tests, which may
# import what one test needs inside it.
CLI_EDGE_NAMES = {"__main__.py", "conftest.py"}


def _outside_rule(path: Path) -> bool:
    return path.name in CLI_EDGE_NAMES or path.name.endswith("_test.py")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, child, is_package)
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    imported = submodule if submodule in modules else target
                    found.append((imported, in_function, child.lineno))
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed, cannot form a runtime cycle
            visit(child, nested)

    visit(tree, False)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each line a group that imports itself):\n" + "\n".join(
        " <-> ".join(group) for group in cycles
    )


def test_the_graph_sees_the_data_path():
    """Guards the checker itself: known edges must be present, or an empty graph would pass."""
    graph = _graph()
    assert "piano_gpt_jax.music.tokenizer" in graph["piano_gpt_jax.data.records"]
    assert "piano_gpt_jax.model" in graph["piano_gpt_jax.jitted_steps"]
    assert "piano_gpt_jax.run.loop" in graph["piano_gpt_jax.train"]
    assert "piano_gpt_jax.data.settings" in graph["piano_gpt_jax.data.pipeline"]


def _rows() -> tuple[tuple[str, ...], ...]:
    """ARCHITECTURE.md's table, top to bottom, as the module names of each row's first cell
    (`piano_gpt_jax/__init__.py` is the package itself, ""): a module may import from its own
    row or rows above. The map is the rule, so the two cannot drift apart."""
    rows = []
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            names = []
            for path in re.findall(r"`([^`]+)`", cell):
                name = path.removeprefix("piano_gpt_jax/").rstrip("/").removesuffix(".py")
                names.append("" if name == "__init__" else name)
            rows.append(tuple(names))
    return tuple(rows)


LAYERS = _rows()


def test_the_rows_are_read_from_the_map():
    assert LAYERS[0] == ("", "host_memory", "memory_limits")
    assert ("music",) in LAYERS and ("app",) in LAYERS and ("converters",) in LAYERS
    row = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert row["music"] < row["data"] < row["model"] < row["jitted_steps"] < row["checkpoints"]
    assert row["sampling_settings"] == row["sampling"] < row["run"] < row["app"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    name = "converters" if parts[0] == "converters" else (parts[1] if len(parts) > 1 else "")
    for row, names in enumerate(LAYERS):
        if name in names:
            return row
    return None


def test_modules_import_only_from_their_row_or_above():
    """Test helpers (converters.testing, app.testing_support) may reach anywhere: they build
    whole runs."""
    modules = _modules()
    downward = []
    for name, targets in _graph().items():
        if _outside_rule(modules[name]) or "testing" in name.rsplit(".", 1)[-1]:
            continue
        for target in targets:
            mine, theirs = _layer(name), _layer(target)
            if mine is None or theirs is None or theirs > mine:
                downward.append(f"{name} (row {mine}) imports {target} (row {theirs})")
    assert not downward, "\n".join(sorted(downward))


def test_the_music_layer_does_not_import_jax():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("piano_gpt_jax.music"):
            continue
        roots = {target.split(".")[0] for target, _, _ in _imports(name, path, modules)}
        accelerator_libraries = roots & {"jax", "jaxlib", "flax", "optax", "orbax"}
        assert not accelerator_libraries, f"{name} imports {accelerator_libraries}"
        internal = {t for t, _, _ in _imports(name, path, modules) if t in modules}
        upward = {t for t in internal if not t.startswith("piano_gpt_jax.music")}
        assert not upward, f"{name} reaches out of the music layer: {upward}"


def test_imports_sit_at_module_top():
    modules = _modules()
    late = []
    for name, path in modules.items():
        if _outside_rule(path):
            continue
        for target, in_function, line in _imports(name, path, modules):
            allowed = any(target == ok or target.startswith(ok + ".") for ok in LAZY_ALLOWED)
            if in_function and not allowed:
                late.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not late, "\n".join(late)


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module from an empty package cache in a fresh interpreter: an import that works only
    because another module ran first fails here."""
    names = sorted(name for name in _modules() if not name.endswith("__main__"))
    script = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=3)\n"
        "    ours = [m for m in sys.modules if m.startswith(('piano_gpt_jax', 'converters'))]\n"
        "    for loaded in ours:\n"
        "        del sys.modules[loaded]\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(names)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())


def test_the_optional_dependencies_are_pyprojects_extras():
    """torch, omegaconf, wandb, streamlit: each lazily imported library that is optional at
    install time comes from pyproject.toml, not from a second list here."""
    assert {"torch", "omegaconf", "wandb", "streamlit", "selenium"} <= _optional_dependencies()
