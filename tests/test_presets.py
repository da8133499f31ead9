"""Presets: each applies cleanly to params.yaml and yields params every stage accepts."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from lib.config import merged, parse
from lib.data.convert import ResizeCrop, parse_dataset_spec
from lib.infer.evaluation import EvaluateParams
from lib.train.stage import parse_stage
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
    for name, raw in params["datasets"].items():
        parse_dataset_spec(name, raw)
    check_chain(tmp_path, params)
    assert "# Source-only" in text or "# The one source of truth" in text     # comments survive


def check_chain(tmp_path, params: dict) -> None:
    """Every pseudo-label output, self-training run and distillation round parses; models named
    by the chain are produced by an earlier stage, pseudo-labels by a pseudo_label output."""
    from lib.pseudo.labels import output_params
    from lib.train.stage import finetune_params, run_params
    (tmp_path / "data/pretrained").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data/pretrained/r101_1x_sk0.pth").write_bytes(b"")     # the SimCLR file a preset names
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        runs = params["selftrain"].get("runs") or {}
        rounds = params["distill"].get("rounds") or {}
        finetune = params.get("finetune") or {}
        models = {"warmup", *(params.get("variants") or {}), *finetune, *runs, *(f"distill_{k}" for k in rounds)}
        for name in finetune:
            raw = finetune_params(params, name)
            parse_stage(raw, f"finetune.{name}")
            assert raw["init"] in models and raw["init"] != name
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
    from lib.train.stage import run_params
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
    from lib.train.stage import variant_params
    params = {"warmup": {"method": "advent", "train": {"iters": 4, "seed": 0}},
              "variants": {"minent": {"method": "minent", "train": {"seed": 1}}},
              "evaluate": {"ensembles": {"both": {"warmup": 0.5, "minent": 0.5}}}}
    assert variant_params(params, "minent") == {"method": "minent", "train": {"iters": 4, "seed": 1}}
    with pytest.raises(ConfigError, match="variants.nope is not a mapping"):
        variant_params(params, "nope")
    params["variants"]["both"] = {}
    with pytest.raises(ConfigError, match="variants.both: the model name 'both' is taken by evaluate.ensembles.both"):
        variant_params(params, "both")


def test_finetune_params_lay_the_entry_over_warmup_without_its_model():
    from lib.train.stage import finetune_params
    params = {"warmup": {"method": "source_only", "model": {"depth": 18}, "train": {"iters": 4, "seed": 0}},
              "finetune": {"dacs": {"init": "warmup", "method": "ciss", "model": {"bn": "batch"},
                                    "train": {"iters": 2}},
                           "bare": {"method": "minent"}, "taught": {"init": "warmup", "teacher": "warmup"}},
              "variants": {"minent": {}}}
    assert finetune_params(params, "dacs") == {"method": "ciss", "init": "warmup", "model": {"bn": "batch"},
                                               "train": {"iters": 2, "seed": 0}}
    with pytest.raises(ConfigError, match="finetune.nope is not a mapping"):
        finetune_params(params, "nope")
    with pytest.raises(ConfigError, match="finetune.bare.init must name"):
        finetune_params(params, "bare")
    with pytest.raises(ConfigError, match="finetune.taught.teacher: a finetune run reads no teacher"):
        finetune_params(params, "taught")
    params["finetune"]["minent"] = {"init": "warmup"}
    with pytest.raises(ConfigError, match="finetune.minent: the model name 'minent' is taken by variants.minent"):
        finetune_params(params, "minent")


def test_chain_runs_cannot_reuse_a_model_name():
    from lib.train.stage import model_owners, run_params
    params = {"warmup": {}, "variants": {"minent": {}},
              "selftrain": {"method": "cpsl_stage1", "runs": {"selftrain": {"init": "warmup"},
                                                             "minent": {"init": "warmup"},
                                                             "distill_1": {"init": "warmup"}}},
              "distill": {"rounds": {"1": {"teacher": "selftrain"}}}}
    assert model_owners(params)["distill_1"] == ["selftrain.runs.distill_1", "distill.rounds.1"]
    assert run_params(params, "selftrain", "runs", "selftrain") == {"method": "cpsl_stage1", "init": "warmup"}
    with pytest.raises(ConfigError, match="selftrain.runs.minent: the model name 'minent' is taken by variants.minent"):
        run_params(params, "selftrain", "runs", "minent")
    with pytest.raises(ConfigError, match="distill.rounds.1: the model name 'distill_1' is taken by selftrain.runs"):
        run_params(params, "distill", "rounds", "1")


def test_published_blindnet_and_robustnet_recipes(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_blindnet.yaml")
    stage, blindnet = parse_stage(params["warmup"], "warmup")
    assert (stage.method, stage.source, stage.target) == ("blindnet", "gtav", None)
    assert (blindnet.cml_weight, blindnet.ccl_weight, blindnet.cwcl_weight, blindnet.sdcl_weight) == (0.2, 0.2, 0.3, 0.3)
    model = stage.model
    assert (model.arch, model.depth, model.weights, model.instance_norm) == ("deeplabv3plus", 50, "imagenet", "in")
    sgd = stage.optim["model"]
    assert (sgd.type, sgd.lr, sgd.momentum, sgd.weight_decay, sgd.head_lr_mult) == ("sgd", 0.01, 0.9, 5e-4, 1.0)
    assert (stage.schedule.power, stage.schedule.warmup_iters, stage.train.iters, stage.train.seed) == (0.9, 0, 40000, 304)
    data = stage.data
    assert (data.batch_size, data.crop, data.scale, data.sampling, data.class_uniform_pct) == (
        8, (768, 768), (0.5, 2.0), "class_uniform", 0.5)
    assert params["prepare"]["centroid_tile"] == 1024
    assert parse_dataset_spec("mapillary", params["datasets"]["mapillary"]).resize_crop == ResizeCrop(1024, 1024)
    evaluate = parse(EvaluateParams, params["evaluate"], "evaluate")
    assert evaluate.averages == {"unseen": ["cityscapes", "bdd100k", "mapillary"]}
    assert "gtav" in evaluate.targets and evaluate.inference.input_size is None

    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_robustnet_isw.yaml")
    stage, isw = parse_stage(params["warmup"], "warmup")
    assert (stage.method, isw.whitening, isw.whitening_weight, isw.clusters, isw.trials) == ("robustnet", "isw", 0.6, 3, 10)
    assert (isw.trial_images, isw.statistics_iter, stage.data.batch_size, stage.model.instance_norm) == (500, 4644, 16, "in")
    assert stage.optim["model"].lr == 0.01 and stage.train.iters == 40000 and stage.data.crop == (768, 768)
    assert parse_dataset_spec("m", params["datasets"]["mapillary_1536"]).resize_crop == ResizeCrop(1536, 1536)
    assert params["evaluate"]["averages"] == {"unseen": ["cityscapes", "bdd100k", "mapillary"],
                                              "unseen_robustnet": ["cityscapes", "bdd100k", "mapillary_1536"]}


@pytest.mark.parametrize("preset, target, weights", [("cityscapes_acdc_ciss", "acdc", (50.0, 20.0)),
                                                     ("cityscapes_darkzurich_ciss", "dark_zurich", (100.0, 10.0))])
def test_published_ciss_recipes(tmp_path, preset, target, weights):
    params, _ = applied(tmp_path, ROOT / "presets" / f"{preset}.yaml")
    stage, ciss = parse_stage(params["warmup"], "warmup")
    assert (stage.method, stage.source, stage.target) == ("ciss", "cityscapes", target)
    assert (ciss.source_weight, ciss.target_weight) == weights
    assert (ciss.stylization, ciss.fda_beta, ciss.ema, ciss.pseudo_threshold, ciss.fd_weight) == ("fda", 0.01, 0.999, 0.968, 0.005)
    adamw = stage.optim["model"]
    assert (adamw.type, adamw.lr, adamw.weight_decay, adamw.head_lr_mult) == ("adamw", 6e-5, 0.01, 10.0)
    assert (stage.schedule.power, stage.schedule.warmup_iters, stage.train.iters) == (1.0, 1500, 40000)
    assert stage.data.sampling == "rare_class" and stage.stream_data("target").sampling == "uniform"
    assert stage.data.batch_size == stage.stream_data("target").batch_size == 2 and stage.model.weights == "imagenet"
    assert params["evaluate"]["targets"] == [target] and set(params["datasets"]) >= {"cityscapes", target}
    assert "acdc" not in params["datasets"] or target == "acdc"


def test_synthetic_generalisation_and_condition_presets(tmp_path):
    from lib.train.stage import finetune_params
    params, _ = applied(tmp_path, ROOT / "presets" / "synthetic_blindnet.yaml")
    stage, _ = parse_stage(params["warmup"], "warmup")
    control, _ = parse_stage(merged(params["warmup"], params["variants"]["source_only"]), "source_only")
    assert (stage.method, stage.model.instance_norm, control.method, control.model.instance_norm) == (
        "blindnet", "in", "source_only", "none")
    assert control.model.arch == stage.model.arch == "deeplabv3plus" and control.train.iters == stage.train.iters
    assert params["evaluate"]["averages"] == {"unseen": ["synth_cityscapes", "synth_acdc_night"]}
    assert not params["stylize"]["outputs"] and not params["pseudo_label"]["outputs"]

    params, _ = applied(tmp_path, ROOT / "presets" / "synthetic_ciss.yaml")
    start, _ = parse_stage(params["warmup"], "warmup")
    runs = {name: parse_stage(finetune_params(params, name), name) for name in ("ciss", "dacs", "source_only")}
    assert (start.method, start.source, start.target) == ("source_only", "synth_cityscapes", "synth_acdc_night")
    assert {name: (stage.method, stage.init, stage.train.iters) for name, (stage, _) in runs.items()} == {
        "ciss": ("ciss", "warmup", 200), "dacs": ("ciss", "warmup", 200), "source_only": ("source_only", "warmup", 200)}
    assert runs["ciss"][1].invariant and not runs["dacs"][1].invariant
    assert runs["ciss"][1].source_weight == 50.0 and runs["ciss"][1].target_weight == 20.0
    assert all(stage.source == "synth_cityscapes" and stage.target == "synth_acdc_night" and stage.model is None
               for stage, _ in runs.values())
    assert params["evaluate"]["models"] == ["warmup", "ciss", "dacs", "source_only"]
    assert not params["variants"] and not params["selftrain"]["runs"] and not params["distill"]["rounds"]


def test_small_floats_stay_floats_for_the_stages(tmp_path):
    """ruamel writes a loaded 6e-5 as `6e-05`, which PyYAML (the stages' reader) takes for a string;
    the preset's own spelling is kept instead."""
    preset = tmp_path / "small.yaml"
    preset.write_text("warmup:\n  optim:\n    model: {type: adamw, lr: 6.0e-5}\n  schedule: {warmup_ratio: 1.0e-6}\n")
    params, _ = applied(tmp_path, preset)
    assert params["warmup"]["optim"]["model"]["lr"] == 6e-5 and params["warmup"]["schedule"]["warmup_ratio"] == 1e-6
