"""A published recipe end to end through ``dvc repro`` at a reduced size with the real aspect ratios
and raw layouts: bench/recipes.py on BlindNet's preset at 1/8 of the real sizes (GTA5's split
layout at 1914x1052 with a frame whose label has another size, Cityscapes 2048x1024, BDD100K
1280x720, Mapillary landscape, portrait, 16:9 and odd-sized, each divided by 8), the preset's
crops, resizes and tiles divided likewise, two iterations.  A shape fault at a non-square aspect
fails here rather than hours into a GPU run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bench import recipes

ROOT = Path(__file__).resolve().parents[1]


def test_blindnet_recipe_end_to_end_at_the_real_aspect_ratios(tmp_path):
    args = argparse.Namespace(scale=0.125, frames=2, iters=2, workers=1)
    result = recipes.run_preset(ROOT / "presets" / "gta5_blindnet.yaml", tmp_path, args)
    assert result["completed"], (tmp_path / "gta5_blindnet.log").read_text()[-4000:]
    project = tmp_path / "gta5_blindnet"
    stages = {row["stage"]: row for row in result["stages"]}
    targets = ("gtav", "cityscapes", "bdd100k", "mapillary")
    assert {"train@blindnet", "weights@imagenet_r50", *(f"evaluate@blindnet-{t}" for t in targets)} <= set(stages)
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    for target in targets:
        assert 0.0 <= summary["blindnet"][target]["mIoU"] <= 100.0
    # the GTAV frame whose label has another size was skipped; Mapillary kept its four aspects, resized
    # to a short side of 1024 / 8 and centre-cropped to a square
    gtav = pd.read_csv(project / "data/prepared/gtav/index.csv")
    assert "00001" not in set(gtav["id"].astype(str).str.zfill(5)) and len(gtav) == args.frames + 2
    assert set(zip(gtav["height"], gtav["width"])) == {(132, 239)}
    mapillary = pd.read_csv(project / "data/prepared/mapillary/index.csv")
    assert len(mapillary) == 4 and set(zip(mapillary["height"], mapillary["width"])) == {(128, 128)}
    assert stages["train@blindnet"]["unit"] == "iteration" and stages["train@blindnet"]["full_units"] == 40000
    assert stages["evaluate@blindnet-cityscapes"]["full_units"] == 500
    assert all(row["peak_rss_mb"] > 0 for row in result["stages"] if row["seconds"] > 2)
