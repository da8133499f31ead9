"""Presets: each applies cleanly to params.yaml and yields params every stage accepts."""
from __future__ import annotations

import os
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
    check_chain(tmp_path, params)
    assert "# Source-only" in text or "# The one source of truth" in text     # comments survive


def check_chain(tmp_path, params: dict) -> None:
    """Every pseudo-label output, self-training run and distillation round parses; models named
    by the chain are produced by an earlier stage, pseudo-labels by a pseudo_label output."""
    from lib.engine.pseudo import output_params
    from lib.engine.training import run_params
    (tmp_path / "data/pretrained").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data/pretrained/r101_1x_sk0.pth").write_bytes(b"")     # the SimCLR file a preset names
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        runs = params["selftrain"].get("runs") or {}
        rounds = params["distill"].get("rounds") or {}
        models = {"warmup", *(params.get("variants") or {}), *runs, *(f"distill_{k}" for k in rounds)}
        outputs = params["pseudo_label"].get("outputs") or {}
        for name in outputs:
            job, _ = output_params(params["pseudo_label"], name)
            assert job.model in models, name
        for section, key, names in (("selftrain", "runs", runs), ("distill", "rounds", rounds)):
            for name in names:
                raw = run_params(params, section, key, name)
                parse_stage(raw, f"{section}.{key}.{name}")
                assert raw["pseudo"] in outputs and (raw.get("init") is None or raw["init"] in models)
        assert set(params["evaluate"]["models"]) <= models
    finally:
        os.chdir(cwd)


def test_published_cpsl_recipe(tmp_path, monkeypatch):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_cpsl.yaml")
    from lib.engine.training import run_params
    stage1, cpsl = parse_stage(run_params(params, "selftrain", "runs", "selftrain"), "selftrain")
    assert (cpsl.temperature, cpsl.epsilon, cpsl.queue_length, cpsl.ema) == (0.08, 0.05, 65536, 0.999)
    assert (stage1.optim["model"].lr, stage1.optim["model"].head_lr_mult, stage1.train.iters) == (1e-4, 5.0, 90000)
    assert stage1.data.crop == (512, 896) and stage1.normalize == "unit"
    (tmp_path / "data/pretrained").mkdir(parents=True)
    (tmp_path / "data/pretrained/r101_1x_sk0.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    kd1, kd = parse_stage(run_params(params, "distill", "rounds", "1"), "distill")
    assert kd.kd_form == "released" and kd1.pseudo_threshold == 0.95 and kd1.model.extra_bn
    assert (kd1.optim["model"].lr, kd1.optim["model"].head_lr_mult) == (6e-4, 10.0)
    assert run_params(params, "distill", "rounds", "2")["init"] == "distill_1"


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
