"""Presets: each applies cleanly to params.yaml and yields params every stage accepts."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lib.config import merged, parse
from lib.engine.evaluation import EvaluateParams
from lib.engine.training import parse_stage
from lib.errors import ConfigError
from lib.preset import main as apply_preset

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "presets").glob("*.yaml"))


def applied(tmp_path: Path, preset: Path) -> tuple[dict, str]:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_preset([str(preset), "--params", str(params)])
    return yaml.safe_load(params.read_text()), params.read_text()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_gives_valid_params(tmp_path, preset):
    params, text = applied(tmp_path, preset)
    parse_stage(params["warmup"], "warmup")
    evaluate = parse(EvaluateParams, params["evaluate"], "evaluate")
    for name, members in evaluate.ensembles.items():
        assert set(members) <= {"warmup", *params.get("variants", {})}, name
    for name, overrides in (params.get("variants") or {}).items():
        parse_stage(merged(params["warmup"], overrides), name)
    for target in evaluate.targets:
        assert target in params["datasets"] or target in params["stylize"]["outputs"]
    assert "# Source-only" in text or "# The one source of truth" in text     # comments survive


def test_published_advent_numbers(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_advent.yaml")
    stage, advent = parse_stage(params["warmup"], "warmup")
    assert (stage.method, advent.adv_main, advent.adv_aux, advent.aux_weight) == ("advent", 1e-3, 2e-4, 0.1)
    assert (stage.train.iters, stage.schedule.horizon, stage.optim["model"].lr) == (120000, 250000, 2.5e-4)
    assert stage.optim["model"].head_lr_mult == 10 and stage.optim["discriminator"].betas == (0.9, 0.99)
    assert stage.data.crop == (720, 1280) and stage.stream_data("target").crop == (512, 1024)
    assert stage.model.bn == "frozen_affine" and stage.model.depth == 101


def test_missing_and_looping_presets_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        apply_preset([str(tmp_path / "nope.yaml"), "--params", str(tmp_path / "p.yaml")])
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SystemExit):
        apply_preset([str(loop), "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert "preset not found" in err and "loop" in err


def test_variant_params_lay_the_entry_over_warmup():
    from lib.engine.training import variant_params
    params = {"warmup": {"method": "advent", "train": {"iters": 4, "seed": 0}},
              "variants": {"minent": {"method": "minent", "train": {"seed": 1}}},
              "evaluate": {"ensembles": {"both": {"warmup": 0.5, "minent": 0.5}}}}
    assert variant_params(params, "minent") == {"method": "minent", "train": {"iters": 4, "seed": 1}}
    with pytest.raises(ConfigError, match="variants.nope is not a mapping"):
        variant_params(params, "nope")
    params["variants"]["both"] = {}
    with pytest.raises(ConfigError, match="the name is taken"):
        variant_params(params, "both")
