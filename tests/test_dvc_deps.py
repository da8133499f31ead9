"""dvc.yaml declares exactly the code a stage runs, and lib/ and stages/ import nothing in a circle.

A stage's code dependencies are derived here from the imports (function-level ones included) of its
entry point; a training stage adds the one method file its row's recipe names.  Left out on purpose:
``__init__.py`` files (docstrings and re-exports) and ``lib/errors.py`` (the exception types and their
messages).  Every training stage lists the same shared list: its entry point's closure plus the
library the method files draw on (lib/losses, lib/methods/parts, ...), so an edit there re-runs every
training stage; an edit to a method file re-runs only the rows whose recipe is that method.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from lib.methods.base import available_methods

ROOT = Path(__file__).resolve().parents[1]
UNTRACKED = {"lib/errors.py"}


def module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def type_checking_blocks(tree: ast.AST) -> set[ast.AST]:
    """The nodes under ``if TYPE_CHECKING:``: imports for annotations only, never executed."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                inside |= set(ast.walk(child))
    return inside


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (function-level imports included, the
    annotation-only ones under ``if TYPE_CHECKING:`` left out)."""
    found = set()
    tree = ast.parse(path.read_text())
    skipped = type_checking_blocks(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {m for m in found if m.split(".")[0] in ("lib", "stages")}


def imported_files(path: Path) -> set[Path]:
    return {f for f in map(module_file, imported_modules(path)) if f is not None and f != path}


def import_closure(start: str) -> set[str]:
    """Project-relative paths of ``start`` and every project module it imports, transitively."""
    seen: set[Path] = set()
    todo = [ROOT / start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported_files(path)
    return {p.relative_to(ROOT).as_posix() for p in seen if p.name != "__init__.py"} - UNTRACKED


def stage_deps(name: str) -> list[str]:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    return [str(dep).rstrip("/") for dep in stage.get("do", stage)["deps"]]


def code_deps(name: str) -> set[str]:
    return {d for d in stage_deps(name) if d.startswith(("lib/", "stages/"))}


def expand(deps: set[str]) -> set[str]:
    """Folders of the dependency list as the Python files under them (no __init__)."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        if path.is_dir():
            files |= {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py") if p.name != "__init__.py"}
        else:
            files.add(dep)
    return files


def method_library() -> set[str]:
    """What the method files import besides the training stage's own closure."""
    core = import_closure("stages/train.py")
    library = set()
    for method in available_methods():
        library |= import_closure(f"lib/methods/{method}.py") - core
    return {p for p in library if not is_method_file(p)}


def is_method_file(path: str) -> bool:
    return path.startswith("lib/methods/") and path.count("/") == 2 and path != "lib/methods/base.py"


ENTRY_POINTS = {"check": "stages/check.py", "synthesize": "stages/synthesize.py", "prepare": "stages/prepare.py", "stylize": "stages/stylize.py",
                "scratch": "stages/weights.py", "weights": "stages/weights.py", "pseudo_label": "stages/pseudo_label.py",
                "ensemble": "stages/ensemble.py", "evaluate": "stages/evaluate.py", "summary": "stages/summary.py",
                "cyclegan_train": "stages/cyclegan_train.py", "translate": "stages/translate.py"}


@pytest.mark.parametrize("stage", sorted(ENTRY_POINTS))
def test_a_stage_declares_exactly_what_its_entry_point_imports(stage):
    declared = expand(code_deps(stage))
    wanted = import_closure(ENTRY_POINTS[stage])
    assert sorted(wanted - declared) == [], f"dvc.yaml stage {stage} misses code it runs"
    assert sorted(declared - wanted) == [], f"dvc.yaml stage {stage} declares code it never imports"


@pytest.mark.parametrize("stage", ["train", "selftrain"])
def test_a_training_stage_declares_its_closure_the_method_library_and_its_own_method_file(stage):
    declared = code_deps(stage)
    assert "lib/methods/${item.recipe}.py" in declared
    shared = expand(declared - {"lib/methods/${item.recipe}.py"})
    assert not any(is_method_file(p) for p in shared), "a training stage must not depend on every method file"
    wanted = (import_closure("stages/train.py") | method_library())
    assert sorted(wanted - shared) == [], f"dvc.yaml stage {stage} misses code it runs"
    assert sorted(shared - wanted) == [], f"dvc.yaml stage {stage} declares code no training stage imports"


@pytest.mark.parametrize("method", available_methods())
def test_a_method_file_imports_no_other_method_file(method):
    """So a row depends on one method file: lib/methods/${item.recipe}.py and the shared library."""
    others = [p for p in import_closure(f"lib/methods/{method}.py")
              if is_method_file(p) and p != f"lib/methods/{method}.py"]
    assert others == []


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in [*ROOT.glob("lib/**/*.py"), *ROOT.glob("stages/*.py")]:
        graph[path.relative_to(ROOT).as_posix()] = {f.relative_to(ROOT).as_posix() for f in imported_files(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_lib_and_stages():
    """Any import counts, function-level ones included (a lazy import still ties two modules together)."""
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
