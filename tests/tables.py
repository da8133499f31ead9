"""Building a model table in a test: one row, its recipe, and the artifacts it starts from."""
from __future__ import annotations

from pathlib import Path

from lib.models.weights import write_scratch
from lib.table import SCRATCH, find_training_row
from lib.train.stage import run_training_stage


def one_row(name: str, method: str, recipe: dict, source: str, target: str | None = None, start: str = SCRATCH,
            pseudo: str | None = None, overrides: dict | None = None, **tables) -> dict:
    """params.yaml holding one model row ``name`` (under ``selftrained`` when it reads ``pseudo``)
    trained with ``recipes.<method> = recipe``; ``tables`` adds other sections (pseudo_labels, ...)."""
    row = {"recipe": method, "from": start, **({"pseudo": pseudo} if pseudo else {}),
           **({"overrides": overrides} if overrides else {})}
    params = {"source": source, "target": target, "recipes": {method: recipe},
              "models": {}, "selftrained": {}}
    params["selftrained" if pseudo else "models"][name] = row
    for key, value in tables.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    return params


def ensure_scratch(root: Path = Path(".")) -> None:
    """data/models/scratch, the start of rows trained from random initialisation."""
    if not (root / "data/models" / SCRATCH / "model.pt").is_file():
        write_scratch(root / "data/models" / SCRATCH)


def train(params: dict, name: str) -> Path:
    """Run the training stage of row ``name`` in the current folder (data/models/<name>)."""
    ensure_scratch()
    return run_training_stage(find_training_row(params, name))
