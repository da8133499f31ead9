"""Bad input fails with one clear line naming the file, and leaves no partial prepared folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lib.data.convert import PrepareParams, parse_dataset_spec, prepare_dataset
from lib.errors import ConfigError, DataError
from tests import layouts as L

ROOT = Path(__file__).resolve().parents[1]


def prepare(tmp_path: Path, spec: dict, **kw) -> dict:
    return prepare_dataset(parse_dataset_spec("ds", spec), tmp_path / "prepared" / "ds",
                           PrepareParams(workers=1, **kw))


def cityscapes(tmp_path: Path, n: int = 2) -> Path:
    root = tmp_path / "cs"
    L.make_cityscapes(root, np.random.default_rng(0), {"train": n})
    return root


def first_label(root: Path) -> Path:
    return sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))[0]


def expect_error(tmp_path, spec, match: str, exc=DataError, **kw):
    with pytest.raises(exc, match=match) as info:
        prepare(tmp_path, spec, **kw)
    assert "\n" not in str(info.value)
    out = tmp_path / "prepared"
    assert not (out / "ds").exists(), "a failed conversion left an output that looks finished"
    assert not out.exists() or not any(p.name.startswith(".") for p in out.iterdir()), "temporary folder left behind"
    return str(info.value)


def spec(root: Path, **extra) -> dict:
    return {"layout": "cityscapes", "root": str(root), "splits": ["train"], **extra}


def test_missing_root(tmp_path):
    msg = expect_error(tmp_path, spec(tmp_path / "nowhere"), "dataset folder not found")
    assert "nowhere" in msg and "leftImg8bit" in msg


def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, spec(tmp_path / "empty"), "dataset folder is empty")


def test_image_without_label(tmp_path):
    root = cityscapes(tmp_path)
    label = first_label(root)
    label.unlink()
    msg = expect_error(tmp_path, spec(root), "image without its label")
    assert str(label) in msg


def test_label_size_mismatch_error_and_skip(tmp_path):
    root = cityscapes(tmp_path, n=3)
    label = first_label(root)
    L.save_gray(label, np.full((5, 7), 7, np.uint8))
    msg = expect_error(tmp_path, spec(root), "differs from its image")
    assert str(label) in msg and "7x5" in msg
    meta = prepare(tmp_path, spec(root), size_mismatch="skip")
    assert meta["counts"] == {"train": 2} and len(meta["skipped"]) == 1


def test_rgb_label_where_ids_expected(tmp_path):
    root = cityscapes(tmp_path)
    label = first_label(root)
    L.save_rgb(label, np.zeros((L.H, L.W, 3), np.uint8))
    msg = expect_error(tmp_path, spec(root), "RGB label where single-channel")
    assert str(label) in msg


def test_unknown_label_id(tmp_path):
    root = cityscapes(tmp_path)
    label = first_label(root)
    ids = np.full((L.H, L.W), 7, np.uint8)
    ids[0, 0] = 77
    L.save_gray(label, ids)
    msg = expect_error(tmp_path, spec(root), r"unknown label ID\(s\) \[77\]")
    assert str(label) in msg and "0..33" in msg


def test_unreadable_label(tmp_path):
    root = cityscapes(tmp_path)
    label = first_label(root)
    label.write_bytes(b"this is not a png")
    assert str(label) in expect_error(tmp_path, spec(root), "unreadable label")


def test_truncated_image(tmp_path):
    root = cityscapes(tmp_path)
    image = sorted((root / "leftImg8bit" / "train").glob("*/*.png"))[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert str(image) in expect_error(tmp_path, spec(root), "corrupt or truncated image")


def test_corrupt_image_header(tmp_path):
    root = cityscapes(tmp_path)
    image = sorted((root / "leftImg8bit" / "train").glob("*/*.png"))[0]
    image.write_bytes(b"\x00" * 100)
    assert str(image) in expect_error(tmp_path, spec(root), "unreadable image")


def test_8bit_synthia_label(tmp_path):
    root = tmp_path / "SYNTHIA"
    L.make_synthia(root, np.random.default_rng(0), n=2)
    label = sorted((root / "GT" / "LABELS").glob("*.png"))[0]
    L.save_gray(label, np.zeros((L.H, L.W), np.uint8))
    msg = expect_error(tmp_path, {"layout": "synthia", "root": str(root), "val_fraction": 0.0},
                       "16-bit multi-channel")
    assert str(label) in msg


def test_gtav_single_channel_where_colour_expected(tmp_path):
    root = tmp_path / "GTAV"
    L.make_gtav_split(root, np.random.default_rng(0), {"train": 1, "valid": 1})
    label = sorted((root / "labels" / "train").glob("*/*.png"))[0]
    L.save_gray(label, np.zeros((L.H, L.W), np.uint8))
    expect_error(tmp_path, {"layout": "gtav_split", "root": str(root)}, "RGB colour labels are expected")


def test_failure_keeps_previous_output(tmp_path):
    root = cityscapes(tmp_path)
    prepare(tmp_path, spec(root))
    before = (tmp_path / "prepared" / "ds" / "index.csv").read_text()
    first_label(root).write_bytes(b"junk")
    with pytest.raises(DataError):
        prepare(tmp_path, spec(root))
    assert (tmp_path / "prepared" / "ds" / "index.csv").read_text() == before


@pytest.mark.parametrize("bad, match", [
    ({"layout": "kitti", "root": "x"}, "not a known layout"),
    ({"root": "x"}, "missing or non-text key 'datasets.ds.layout'"),
    ({"layout": "cityscapes", "root": "x", "splitz": ["train"]}, "unknown key 'datasets.ds.splitz'"),
    ({"layout": "cityscapes", "root": "x", "splits": "train"}, "must be a list"),
    ({"layout": "cityscapes", "root": "x", "splits": ["training"]}, "unknown split 'training'"),
    ({"layout": "acdc", "root": "x", "conditions": ["haze"]}, "unknown condition 'haze'"),
    ({"layout": "synthia", "root": "x", "classes": 18}, "is not one of 19, 16, 13"),
    ({"layout": "synthia", "root": "x", "val_fraction": 1.5}, "val_fraction must be in"),
])
def test_bad_dataset_params(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_dataset_spec("ds", bad)


def run_stage(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_prints_one_line_and_exits_nonzero(tmp_path):
    root = cityscapes(tmp_path)
    first_label(root).unlink()
    params = {"prepare": {"workers": 1}, "datasets": {"ds": spec(root)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = run_stage(tmp_path, "stages.prepare", "ds")
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "image without its label" in lines[-1]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data" / "prepared" / "ds").exists()


def test_stage_wrong_params_type(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {"workers": "two"}, "datasets": {
        "ds": {"layout": "cityscapes", "root": "x"}}}))
    res = run_stage(tmp_path, "stages.prepare", "ds")
    assert res.returncode == 2 and "prepare.workers must be of type int" in res.stderr


def test_stage_unknown_dataset_name(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"prepare": {}, "datasets": {}}))
    res = run_stage(tmp_path, "stages.prepare", "gta")
    assert res.returncode == 2 and "no dataset 'gta'" in res.stderr
