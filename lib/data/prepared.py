"""The prepared-dataset contract: what ``prepare@<name>`` writes and everything downstream reads.

``data/prepared/<name>/`` holds
- ``index.csv``: one row per sample, columns ``id, split, image, label, height, width``.
  ``image`` is the path of the raw image (never copied); ``label`` the path of the converted
  uint8 train-ID PNG (255 = ignore), empty when the sample is unlabelled.  Relative paths are
  relative to the project root (the folder ``dvc repro`` runs in).
- ``labels/<split>/<id>.png``: the converted labels.
- ``class_counts.csv``: ``id`` and one column per class (pixel counts), labelled samples only.
- ``centroids.csv``: ``id, class, cy, cx``: for every (tile, class present) the integer centre of mass
  of that class in that tile, in full-image coordinates (RobustNet's class-uniform index).
- ``meta.json``: class protocol, counts per split, source layout, conversion choices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib.data.classes import CLASS_SETS, ClassSet
from lib.errors import DataError

INDEX = "index.csv"
COUNTS = "class_counts.csv"
CENTROIDS = "centroids.csv"
META = "meta.json"
PREPARED_ROOT = Path("data/prepared")   # where the prepare@<name> stages write
INDEX_COLUMNS = ["id", "split", "image", "label", "height", "width"]


def require_prepared(name: str) -> None:
    if not (PREPARED_ROOT / name / "index.csv").is_file():
        raise DataError(f"{PREPARED_ROOT / name}: prepared dataset not found (is '{name}' under 'datasets'?)")


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what}); run the prepare stage for this dataset first")
    return path


def load_index(prepared: str | Path, split: str | None = None, labelled: bool = False) -> pd.DataFrame:
    """The index, optionally restricted to one split; ``label`` is '' for unlabelled rows.

    ``labelled=True`` makes an unlabelled row in the selection an error (training on a source,
    evaluating).
    """
    df = pd.read_csv(_require(Path(prepared) / INDEX, "prepared index"),
                     dtype={"id": str, "split": str, "image": str, "label": str},
                     keep_default_na=False)
    _check_inside_dataset(df, Path(prepared))
    if split is not None:
        if split not in set(df["split"]):
            raise DataError(f"{Path(prepared) / INDEX}: no samples in split '{split}' "
                            f"(splits present: {sorted(set(df['split']))})")
        df = df[df["split"] == split].reset_index(drop=True)
    if labelled and (df["label"] == "").any():
        raise DataError(f"{Path(prepared) / INDEX}: split '{split}' has unlabelled rows, but labels are needed")
    return df


def _check_inside_dataset(df: pd.DataFrame, prepared: Path) -> None:
    """Every path of the index lies under the raw dataset root its meta names or among the prepared
    datasets (converted labels, stylized copies), so a tampered row cannot feed training any file."""
    meta = prepared / META
    root = json.loads(meta.read_text()).get("root") if meta.is_file() else None
    if root is None:
        return      # a hand-made index without a prepare stage's meta: no root to hold it to
    allowed = [os.path.abspath(root), os.path.abspath(prepared.parent)]
    for line, row in enumerate(df.itertuples(index=False), start=2):   # line 1 is the header
        for column in ("image", "label"):
            path = getattr(row, column)
            where = os.path.abspath(path) if path else None
            if where and not any(where == a or where.startswith(a + os.sep) for a in allowed):
                raise DataError(f"{prepared / INDEX} line {line} (id {row.id}): {column} {path} is outside the "
                                f"dataset (expected a path under {root} or {prepared.parent})")


def load_meta(prepared: str | Path) -> dict:
    return json.loads(_require(Path(prepared) / META, "prepared meta").read_text())


def load_class_set(prepared: str | Path) -> ClassSet:
    return CLASS_SETS[load_meta(prepared)["class_protocol"]]


def load_class_counts(prepared: str | Path, ids: list[str] | None = None) -> np.ndarray:
    """(N, C) int64 pixel counts, rows in the order of ``ids`` (default: file order)."""
    df = pd.read_csv(_require(Path(prepared) / COUNTS, "class pixel counts"), dtype={"id": str})
    if ids is not None:
        df = df.set_index("id").reindex(ids)
        if df.isna().any().any():
            raise DataError(f"{Path(prepared) / COUNTS}: no class counts for some requested "
                            "samples (are they unlabelled?)")
        return df.to_numpy(np.int64)
    return df.drop(columns="id").to_numpy(np.int64)


def load_centroids(prepared: str | Path) -> pd.DataFrame:
    return pd.read_csv(_require(Path(prepared) / CENTROIDS, "class centroids"), dtype={"id": str})


def resolve(path: str, project_root: str | Path = ".") -> Path:
    """Index paths are relative to the project root unless absolute."""
    p = Path(path)
    return p if p.is_absolute() else Path(project_root) / p
