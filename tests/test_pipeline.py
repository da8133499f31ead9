"""End to end: the committed dvc.yaml run by real DVC in a temporary git repository on tiny params."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synthesize"].update(height=32, width=64, workers=1,
                                counts={d: {"train": 4, "val": 2} for d in ("source", "target", "night")})
    params["prepare"]["workers"] = 1
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the committed project (git-tracked files) in a fresh git repository."""
    dest = tmp_path_factory.mktemp("project")
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "tiny project")
    sh(dest, "dvc", "repro")
    return dest


def test_repro_writes_every_prepared_dataset(project):
    for name, layout in [("synth_gta5", "gta5"), ("synth_cityscapes", "cityscapes"),
                         ("synth_acdc_night", "acdc")]:
        out = project / "data" / "prepared" / name
        meta = json.loads((out / "meta.json").read_text())
        assert meta["layout"] == layout and meta["counts"] == {"train": 4, "val": 2}
        index = pd.read_csv(out / "index.csv", keep_default_na=False)
        assert list(index.columns[:4]) == ["id", "split", "image", "label"]
        assert all((project / p).is_file() for p in index["image"])
        assert all((project / p).is_file() for p in index["label"])
        assert (out / "class_counts.csv").is_file() and (out / "centroids.csv").is_file()
    assert (project / "data" / "raw" / "synthetic" / "gta5" / "split.mat").is_file()


def test_second_repro_is_up_to_date(project):
    out = sh(project, "dvc", "repro")
    assert "didn't change, skipping" in out or "up to date" in out
    assert "Running stage" not in out
    assert "up to date" in sh(project, "dvc", "status")


def test_prepare_param_change_reruns_only_prepare(project):
    out = sh(project, "dvc", "exp", "run", "-S", "prepare.centroid_tile=16")
    assert "Running stage 'prepare@synth_gta5'" in out
    assert "Running stage 'synthesize'" not in out
    meta = json.loads((project / "data/prepared/synth_gta5/meta.json").read_text())
    assert meta["centroid_tile"] == 16


def test_dataset_param_change_reruns_only_that_dataset(project):
    out = sh(project, "dvc", "exp", "run", "-S", "datasets.synth_cityscapes.splits=[val]")
    assert "Running stage 'prepare@synth_cityscapes'" in out
    assert "Running stage 'prepare@synth_gta5'" not in out
    assert "Running stage 'synthesize'" not in out
