"""dvc.yaml tracks the code a stage's outputs depend on: a changed engine module re-runs its stages.

The dependency lists are written by hand (a stage imports more than it runs: listing every import
would re-run training after an edit of the evaluator).  What must never be missing is the engine
core a stage computes with: the training loop and everything it imports for the training stages,
the inference path and everything it imports for the stages that predict.  ``lib/errors.py`` (the
exception types and their messages) is left out on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UNTRACKED = {"lib/errors.py"}
TRAINING = ("warmup", "variant", "finetune", "selftrain", "distill", "cyclegan_train")
PREDICTING = ("pseudo_label", "evaluate", "ensemble")


def module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {m for m in found if m.split(".")[0] == "lib"}


def import_closure(start: str) -> set[str]:
    """Project-relative paths of ``start`` and every lib module it imports, transitively (no __init__)."""
    seen: set[Path] = set()
    todo = [ROOT / start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return {p.relative_to(ROOT).as_posix() for p in seen if p.name != "__init__.py"}


def stage_deps(name: str) -> list[str]:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    return [str(dep).rstrip("/") for dep in stage.get("do", stage)["deps"]]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


def engine_core(entry: str) -> set[str]:
    return {p for p in import_closure(entry) if p.startswith("lib/engine/")} - UNTRACKED


def test_the_closure_follows_imports():
    core = engine_core("lib/engine/loop.py")
    assert {"lib/engine/loop.py", "lib/engine/precision.py", "lib/engine/checkpoint.py",
            "lib/engine/distributed.py", "lib/engine/optim.py"} <= core
    assert "lib/engine/evaluation.py" not in core


@pytest.mark.parametrize("stage", TRAINING)
def test_training_stages_track_the_loop_and_what_it_imports(stage):
    deps = stage_deps(stage)
    missing = sorted(p for p in engine_core("lib/engine/loop.py") if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} does not list {missing}"


@pytest.mark.parametrize("stage", PREDICTING)
def test_predicting_stages_track_the_inference_path(stage):
    deps = stage_deps(stage)
    missing = sorted(p for p in engine_core("lib/engine/inference.py") if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} does not list {missing}"
