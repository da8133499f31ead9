"""Presets: each applies cleanly to params.yaml, yields a model table every stage accepts, and
`dvc repro --dry` lists the stages its recipe needs; the published numbers are the papers'."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bench.recipes import copy_project
from lib.config import parse
from lib.data.convert import ResizeCrop, parse_dataset_spec
from lib.errors import ConfigError
from lib.infer.params import EvaluateParams
from lib.models.weights import WeightsParams
from lib.preset import main as apply_preset
from lib.pseudo.writer import pseudo_row
from lib.table import SCRATCH, check_acyclic, find_training_row, model_names, model_reference, table
from lib.train.stage import parse_recipe
from lib.validate import check_params
from tests.test_pipeline import ENV

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "presets").glob("*.yaml"))


def applied(tmp_path: Path, preset: Path) -> tuple[dict, str]:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_preset([str(preset), "--params", str(params)])
    return yaml.safe_load(params.read_text()), params.read_text()


def parsed(params: dict, name: str):
    """(recipe, method params) of row ``name``."""
    return parse_recipe(find_training_row(params, name))


def produced_datasets(params: dict) -> set[str]:
    return ({*params["datasets"], *(params["stylize"].get("outputs") or {}),
             *(params["cyclegan"].get("outputs") or [])})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_gives_a_valid_table(tmp_path, preset, monkeypatch):
    params, text = applied(tmp_path, preset)
    monkeypatch.chdir(tmp_path)
    for raw in params["weights"].values():
        Path(raw["file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(raw["file"]).touch()
    if not params["models"] and not params["selftrained"]:     # a base preset: its children add the rows
        with pytest.raises(ConfigError, match="the model table is empty"):
            check_params(params)
        return
    check_params(params)      # what the check stage runs before any other stage
    check_acyclic(params)
    rows = [k for t in ("models", "selftrained") for k in table(params, t)]
    for name in rows:
        parsed(params, name)
        start = model_reference(find_training_row(params, name).start)[0]
        assert start == SCRATCH or start in params["weights"] or start in rows, name
    for name, raw in params["weights"].items():
        parse(WeightsParams, raw, f"weights.{name}")
    for name in table(params, "pseudo_labels"):
        job, _ = pseudo_row(params, name)
        assert model_reference(job.model)[0] in rows
    evaluate = parse(EvaluateParams, params["evaluate"], "evaluate")
    assert list(evaluate.models) == model_names(params)     # the merge of the tables, nothing to keep in sync
    for dataset in (*evaluate.targets, params["source"], params["target"]):
        assert dataset in produced_datasets(params), dataset
    for name, raw in params["datasets"].items():
        parse_dataset_spec(name, raw)
    assert "# What to train, label and score" in text     # comments survive


def dry_run(tmp_path: Path, preset: Path) -> set[str]:
    """`dvc repro --dry -f` of a copy of the project with the preset applied and empty stand-ins for
    the raw data folders and weights files it names."""
    project = tmp_path / "project"
    copy_project(project)
    apply_preset([str(preset), "--params", str(project / "params.yaml")])
    params = yaml.safe_load((project / "params.yaml").read_text())
    for raw in params["datasets"].values():
        if not raw["root"].startswith("data/raw/synthetic"):
            (project / raw["root"]).mkdir(parents=True, exist_ok=True)
    for raw in params["weights"].values():
        (project / raw["file"]).parent.mkdir(parents=True, exist_ok=True)
        (project / raw["file"]).touch()
    res = subprocess.run(["dvc", "repro", "--dry", "-f"], cwd=project, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return {line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage '")}


def test_dry_run_of_the_cpsl_recipe_lists_its_chain(tmp_path):
    stages = dry_run(tmp_path, ROOT / "presets/gta5_cityscapes_cpsl.yaml")
    assert stages == {"check", "synthesize", "prepare@gta5", "prepare@cityscapes", "scratch",
                      "weights@imagenet_r101", "weights@simclr_r101", "train@warmup", "pseudo_label@soft_warmup",
                      "selftrain@stage1", "pseudo_label@hard_stage1", "selftrain@kd1", "pseudo_label@hard_kd1",
                      "selftrain@kd2", *(f"evaluate@{m}-cityscapes" for m in ("warmup", "stage1", "kd1", "kd2")),
                      "summary"}


@pytest.mark.parametrize("preset, expected", [
    ("gta5_cityscapes_advent_minent_ensemble", {"train@advent", "train@minent", "ensemble@advent_minent",
                                                "evaluate@advent_minent-cityscapes"}),
    ("gta5_cityscapes_bafft", {"cyclegan_train@gta5_cyclegan", "translate@gta5_cyclegan", "train@step1",
                               "pseudo_label@median_step1", "selftrain@step2"}),
    ("gta5_robustnet_isw", {"prepare@mapillary_1536", "train@robustnet", "evaluate@robustnet-mapillary_1536"}),
    ("cityscapes_darkzurich_ciss", {"prepare@dark_zurich", "train@ciss", "evaluate@ciss-dark_zurich"}),
])
def test_dry_run_of_a_recipe_lists_what_it_needs(tmp_path, preset, expected):
    stages = dry_run(tmp_path, ROOT / f"presets/{preset}.yaml")
    assert expected <= stages
    assert not any(s.startswith(("prepare@synth", "stylize@synth", "selftrain@kd")) for s in stages)


def test_published_cpsl_recipe(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_cpsl.yaml")
    stage1, cpsl = parsed(params, "stage1")
    assert (cpsl.temperature, cpsl.epsilon, cpsl.queue_length, cpsl.ema) == (0.08, 0.05, 65536, 0.999)
    assert (stage1.optim["model"].lr, stage1.optim["model"].head_lr_mult, stage1.train.iters) == (1e-4, 5.0, 90000)
    assert stage1.data.crop == (512, 896) and stage1.normalize == "unit"
    kd1, kd = parsed(params, "kd1")
    assert kd.kd_form == "released" and kd1.pseudo_threshold == 0.95 and kd1.model.extra_bn
    assert (kd1.optim["model"].lr, kd1.optim["model"].head_lr_mult) == (6e-4, 10.0)
    assert find_training_row(params, "kd1").start == "simclr_r101" and params["weights"]["simclr_r101"]["format"] == "simclr"
    assert find_training_row(params, "kd2").start == "kd1/best"            # S3 resumes the best S2
    assert find_training_row(params, "stage1").start == "warmup/best"
    assert {n: p["model"] for n, p in params["pseudo_labels"].items()} == {   # kd1's teacher: the labeller
        "soft_warmup": "warmup/best", "hard_stage1": "stage1/best", "hard_kd1": "kd1/best"}
    warmup, adaptsegnet = parsed(params, "warmup")
    assert (adaptsegnet.gan, adaptsegnet.adv_main, adaptsegnet.adv_aux) == ("ls", 0.01, 0.0)
    assert warmup.model.head == "cpsl" and warmup.model.bn == "frozen"         # ProDA's freeze_bn: eval mode
    for recipe in (warmup, stage1, kd1):
        assert (recipe.model.style, recipe.normalize, recipe.train.precision) == ("caffe", "unit", "fp32")
        assert (recipe.select.every, recipe.select.split, recipe.select.images) == (1000, "val", 0)
        assert recipe.source_style == "lab"        # GTA5 restyled by a random Cityscapes image at each load
    assert params["source"] == "gta5" and not params["stylize"].get("outputs")


def test_published_advent_numbers(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_advent.yaml")
    recipe, advent = parsed(params, "advent")
    assert (advent.adv_main, advent.adv_aux, advent.aux_weight) == (1e-3, 2e-4, 0.1)
    assert (recipe.train.iters, recipe.schedule.horizon, recipe.optim["model"].lr) == (120000, 250000, 2.5e-4)
    assert recipe.optim["model"].head_lr_mult == 10 and recipe.optim["discriminator"].betas == (0.9, 0.99)
    assert recipe.data.crop == (720, 1280) and recipe.stream_data("target").crop == (512, 1024)
    assert recipe.model.bn == "frozen_affine" and recipe.model.depth == 101
    # ADVENT's start: its Caffe-layout DeepLab file, BGR inputs minus the mean, PIL-bicubic resizes
    assert find_training_row(params, "advent").start == "deeplab_imagenet"
    assert params["weights"]["deeplab_imagenet"]["format"] == "deeplab_caffe"
    assert "DeepLab_resnet_pretrained_imagenet.pth" in params["weights"]["deeplab_imagenet"]["file"]
    assert (recipe.model.style, recipe.normalize, recipe.data.interpolation) == ("caffe", "caffe", "bicubic")
    assert recipe.stream_data("target").interpolation == "bicubic" and recipe.train.precision == "fp32"
    evaluate = parse(EvaluateParams, params["evaluate"], "evaluate")
    assert (evaluate.inference.input_size, evaluate.inference.resize) == ((512, 1024), "bicubic")
    assert recipe.select.every == 2000                     # ADVENT's TEST.MODE best, with the evaluation's protocol
    assert dataclasses.replace(recipe.select.inference, channels_last=True) == evaluate.inference
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_adaptsegnet.yaml")
    recipe, _ = parsed(params, "adaptsegnet")
    assert recipe.model.aspp_two_branch_compat and recipe.train.iters == 150000 and recipe.schedule.horizon == 250000
    assert find_training_row(params, "adaptsegnet").start == "deeplab_init" and set(params["weights"]) == {"deeplab_init"}
    assert "init-f81d91e8" in params["weights"]["deeplab_init"]["file"] and recipe.select.every == 5000


def test_published_bafft_recipe(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_cityscapes_bafft.yaml")
    step1, _ = parsed(params, "step1")
    step2, _ = parsed(params, "step2")
    assert find_training_row(params, "step1").start == "deeplab_init" and set(params["weights"]) == {"deeplab_init"}
    assert find_training_row(params, "step2").start == "step1/best"
    for recipe in (step1, step2):       # evaluated every 5000 iterations, BestGTA5.pth kept
        assert (recipe.select.every, recipe.model.style, recipe.normalize, recipe.train.precision) == (
            5000, "caffe", "caffe", "fp32")
    job, options = pseudo_row(params, "median_step1")
    assert (job.model, job.form) == ("step1/best", "class_median")
    # labelled at the input size step 1 was trained on (1024x512), not at 2048x1024
    assert options.inference.input_size == step1.stream_data("target").resize == (512, 1024)
    assert options.inference.resize == "bicubic"


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.stem.startswith("synthetic")], ids=lambda p: p.stem)
def test_paper_presets_train_in_fp32_and_skip_mislabelled_gta5_frames(tmp_path, preset):
    params, _ = applied(tmp_path, preset)
    for name in (k for t in ("models", "selftrained") for k in table(params, t)):
        assert parsed(params, name)[0].train.precision == "fp32", name
    assert parse(EvaluateParams, params["evaluate"], "evaluate").inference.precision == "fp32"
    if any(raw["layout"] in ("gta5", "gtav_split") for raw in params["datasets"].values()):
        assert params["prepare"]["size_mismatch"] == "skip"
    assert params["synthesize"]["enabled"] is False      # real data: no synthetic benchmark is written
    for name, raw in params["weights"].items():
        assert parse(WeightsParams, raw, f"weights.{name}").published, name   # a missing file says where to get it


def test_missing_and_looping_presets_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        apply_preset([str(tmp_path / "nope.yaml"), "--params", str(tmp_path / "p.yaml")])
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SystemExit):
        apply_preset([str(loop), "--params", str(tmp_path / "params.yaml")])
    bad = tmp_path / "b.yaml"
    bad.write_text("copy: {recipes.x: recipes.nope}\n")
    with pytest.raises(SystemExit):
        apply_preset([str(bad), "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert "preset not found" in err and "loop" in err and "copy: 'recipes.nope' is not in params.yaml" in err


def test_replace_keeps_the_tables_the_evaluation_merges(tmp_path):
    """`replace` empties a table in place: the evaluation's merge of the tables follows the new rows."""
    preset = tmp_path / "one.yaml"
    preset.write_text("replace: [models, selftrained, pseudo_labels]\nmodels:\n  solo: {recipe: source_only, from: scratch}\n")
    params, text = applied(tmp_path, preset)
    assert list(params["evaluate"]["models"]) == ["solo"] and params["selftrained"] == {}
    assert "<<: [*models, *selftrained, *ensembles]" in text


def test_a_block_a_base_changes_reaches_the_recipes_and_the_next_layers_copy(tmp_path):
    """A recipe merges a block (`<<: *model`); a base preset that changes the block changes every such
    recipe, and a later layer's `copy` of a recipe takes the changed block, not the value read first."""
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    base.write_text("blocks:\n  model: {head_width: 96, extra_bn: null}\n")
    child.write_text("base: base.yaml\ncopy: {recipes.advent: recipes.source_only}\n")
    params, _ = applied(tmp_path, child)
    for recipe in ("source_only", "cpsl_stage1", "cpsl_kd", "advent"):
        assert params["recipes"][recipe]["model"]["head_width"] == 96, recipe
        assert "extra_bn" not in params["recipes"][recipe]["model"], recipe
    from lib.preset import apply
    from ruamel.yaml import YAML
    import json
    in_memory = json.loads(json.dumps(apply(YAML().load((ROOT / "params.yaml").read_text()), child)))
    assert in_memory == params       # what bench/gpu.py reads in memory is what DVC reads
    # a null cannot delete what a recipe takes from a block (the merge would bring it back): one clear line
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipes:\n  source_only:\n    model: {output_stride: null}\n")
    with pytest.raises(SystemExit):
        applied(tmp_path, bad)


def test_a_row_of_the_wrong_table_is_one_clear_line():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["odd"] = {"recipe": "cpsl_kd", "from": "warmup", "pseudo": "hard_stage1"}
    with pytest.raises(ConfigError, match=r"unknown key 'models.odd.pseudo'.*put it under `selftrained`"):
        find_training_row(params, "odd")
    params["models"]["odd"] = {"recipe": "source_only", "from": "nowhere"}
    with pytest.raises(ConfigError, match="models.odd.from 'nowhere' is neither scratch, a weights entry nor another model"):
        find_training_row(params, "odd")
    params["models"]["odd"] = {"recipe": "source_only", "from": "odd"}
    with pytest.raises(ConfigError, match="models.odd.from 'odd'"):
        find_training_row(params, "odd")
    params["models"]["scratch"] = {"recipe": "source_only", "from": "warmup"}
    with pytest.raises(ConfigError, match="the name 'scratch' is reserved"):
        find_training_row(params, "warmup")


def test_the_table_grows_in_no_circle():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_acyclic(params)
    params["models"]["warmup"]["from"] = "kd2"
    with pytest.raises(ConfigError, match="grows in a circle: warmup -> kd2 -> kd1 -> stage1 -> warmup"):
        check_acyclic(params)


def test_published_blindnet_and_robustnet_recipes(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_blindnet.yaml")
    recipe, blindnet = parsed(params, "blindnet")
    assert (params["source"], params["target"]) == ("gtav", "gtav")       # no unseen domain is a dependency
    assert (blindnet.cml_weight, blindnet.ccl_weight, blindnet.cwcl_weight, blindnet.sdcl_weight) == (0.2, 0.2, 0.3, 0.3)
    model = recipe.model
    assert (model.arch, model.depth, model.instance_norm) == ("deeplabv3plus", 50, "in")
    assert find_training_row(params, "blindnet").start == "imagenet_r50"
    sgd = recipe.optim["model"]
    assert (sgd.type, sgd.lr, sgd.momentum, sgd.weight_decay, sgd.head_lr_mult) == ("sgd", 0.01, 0.9, 5e-4, 1.0)
    assert (recipe.schedule.power, recipe.schedule.warmup_iters, recipe.train.iters, recipe.train.seed) == (0.9, 0, 40000, 304)
    data = recipe.data
    assert (data.batch_size, data.crop, data.scale, data.sampling, data.class_uniform_pct) == (
        8, (768, 768), (0.5, 2.0), "class_uniform", 0.5)
    assert params["prepare"]["centroid_tile"] == 1024
    assert parse_dataset_spec("mapillary", params["datasets"]["mapillary"]).resize_crop == ResizeCrop(1024, 1024)
    evaluate = parse(EvaluateParams, params["evaluate"], "evaluate")
    assert evaluate.averages == {"unseen": ["cityscapes", "bdd100k", "mapillary"]}
    assert "gtav" in evaluate.targets and evaluate.inference.input_size is None

    params, _ = applied(tmp_path, ROOT / "presets" / "gta5_robustnet_isw.yaml")
    recipe, isw = parsed(params, "robustnet")
    assert (isw.whitening, isw.whitening_weight, isw.clusters, isw.trials) == ("isw", 0.6, 3, 10)
    assert (isw.trial_images, isw.statistics_iter, recipe.data.batch_size, recipe.model.instance_norm) == (500, 4644, 16, "in")
    assert recipe.optim["model"].lr == 0.01 and recipe.train.iters == 40000 and recipe.data.crop == (768, 768)
    assert parse_dataset_spec("m", params["datasets"]["mapillary_1536"]).resize_crop == ResizeCrop(1536, 1536)
    assert params["evaluate"]["averages"] == {"unseen": ["cityscapes", "bdd100k", "mapillary"],
                                              "unseen_robustnet": ["cityscapes", "bdd100k", "mapillary_1536"]}
    assert model_names(params) == ["robustnet"]


@pytest.mark.parametrize("preset, target, weights", [("cityscapes_acdc_ciss", "acdc", (50.0, 20.0)),
                                                     ("cityscapes_darkzurich_ciss", "dark_zurich", (100.0, 10.0))])
def test_published_ciss_recipes(tmp_path, preset, target, weights):
    params, _ = applied(tmp_path, ROOT / "presets" / f"{preset}.yaml")
    recipe, ciss = parsed(params, "ciss")
    assert (params["source"], params["target"]) == ("cityscapes", target)
    assert (ciss.source_weight, ciss.target_weight) == weights
    assert (ciss.stylization, ciss.fda_beta, ciss.ema, ciss.pseudo_threshold, ciss.fd_weight) == ("fda", 0.01, 0.999, 0.968, 0.005)
    adamw = recipe.optim["model"]
    assert (adamw.type, adamw.lr, adamw.weight_decay, adamw.head_lr_mult) == ("adamw", 6e-5, 0.01, 10.0)
    assert (recipe.schedule.power, recipe.schedule.warmup_iters, recipe.train.iters) == (1.0, 1500, 40000)
    assert recipe.data.sampling == "rare_class" and recipe.stream_data("target").sampling == "uniform"
    assert recipe.data.batch_size == recipe.stream_data("target").batch_size == 2
    assert find_training_row(params, "ciss").start == "imagenet_r101"
    assert (recipe.data.cat_max_ratio, recipe.stream_data("target").cat_max_ratio) == (0.75, None)
    assert params["evaluate"]["targets"] == [target] and set(params["datasets"]) == {"cityscapes", target}


def test_synthetic_generalisation_and_condition_presets(tmp_path):
    params, _ = applied(tmp_path, ROOT / "presets" / "synthetic_blindnet.yaml")
    blind, _ = parsed(params, "blindnet")
    control, control_method = parsed(params, "source_only")
    assert (blind.model.instance_norm, control.model.instance_norm, control_method.aux_weight) == ("in", "none", 0.4)
    assert control.model.arch == blind.model.arch == "deeplabv3plus" and control.train.iters == blind.train.iters == 300
    assert control.data == blind.data
    assert params["evaluate"]["averages"] == {"unseen": ["synth_cityscapes", "synth_acdc_night"]}
    assert not params["pseudo_labels"] and not params["selftrained"]

    params, _ = applied(tmp_path, ROOT / "presets" / "synthetic_ciss.yaml")
    rows = {name: (find_training_row(params, name), *parsed(params, name))
            for name in ("source_only", "ciss", "dacs", "source_only_more")}
    assert (params["source"], params["target"]) == ("synth_cityscapes", "synth_acdc_night")
    assert {name: (row.recipe, row.start, recipe.train.iters) for name, (row, recipe, _) in rows.items()} == {
        "source_only": ("source_only", "scratch", 400), "ciss": ("ciss", "source_only", 200),
        "dacs": ("ciss", "source_only", 200), "source_only_more": ("source_only", "source_only", 200)}
    assert rows["ciss"][2].invariant and not rows["dacs"][2].invariant
    assert rows["ciss"][2].source_weight == 50.0 and rows["ciss"][2].target_weight == 20.0
    assert model_names(params) == ["source_only", "ciss", "dacs", "source_only_more"]


def test_small_floats_stay_floats_for_the_stages(tmp_path):
    """ruamel writes a loaded 6e-5 as `6e-05`, which PyYAML (the stages' reader) takes for a string;
    the preset's own spelling is kept instead."""
    preset = tmp_path / "small.yaml"
    preset.write_text("recipes:\n  source_only:\n    optim:\n      model: {type: adamw, lr: 6.0e-5}\n"
                      "    schedule: {warmup_ratio: 1.0e-6}\n")
    params, _ = applied(tmp_path, preset)
    recipe = params["recipes"]["source_only"]
    assert recipe["optim"]["model"]["lr"] == 6e-5 and recipe["schedule"]["warmup_ratio"] == 1e-6


def test_a_load_time_threshold_the_set_was_not_written_for_is_refused_before_any_stage(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_params(params)
    params["recipes"]["cpsl_kd"]["pseudo_threshold"] = 0.9
    with pytest.raises(ConfigError, match=r"selftrained\.kd1 \(recipes\.cpsl_kd\.pseudo_threshold\) reads "
                                          r"pseudo_labels\.hard_stage1: .*written for \(0\.95\).* set "
                                          r"pseudo_labels\.hard_stage1\.options\.threshold: 0\.9"):
        check_params(params)
    for name in ("hard_stage1", "hard_kd1"):
        params["pseudo_labels"][name]["options"]["threshold"] = 0.9
    check_params(params)
    params["pseudo_labels"]["hard_stage1"]["form"] = "class_balanced"
    with pytest.raises(ConfigError, match="thresholded per class when written"):
        check_params(params)


def test_a_synthetic_root_with_synthesize_disabled_is_refused_and_a_datasets_edit_keeps_the_benchmark(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_params(params)
    params["synthesize"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"datasets\.synth_gta5\.root data/raw/synthetic/gta5 is written by the "
                                          r"synthesize stage, but synthesize\.enabled is false"):
        check_params(params)
    # the stage depends on its own section only: editing a dataset never rewrites the benchmark
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["synthesize"]
    assert stage["params"] == ["synthesize"]


def test_the_full_synthetic_preset_restores_the_research_size_chain_for_every_synthetic_preset(tmp_path):
    """presets/synthetic_full.yaml is the setting docs/results.md measured the synthetic results in; the
    other synthetic presets lay themselves over it, so they do not shrink with the default demo."""
    full, _ = applied(tmp_path, ROOT / "presets" / "synthetic_full.yaml")
    assert full["synthesize"]["counts"] == {"source": {"train": 1000, "val": 200}, "target": {"train": 1000, "val": 200},
                                            "night": {"train": 400, "val": 200}}
    assert set(full["stylize"]["outputs"]) == {"synth_gta5_fda", "synth_gta5_reinhard", "synth_gta5_lab"}
    assert full["datasets"]["synth_acdc_night"]["splits"] == ["train", "val"]
    for recipe in ("source_only", "cpsl_stage1", "cpsl_kd"):
        raw = full["recipes"][recipe]
        assert "output_stride" not in raw["model"] and raw["data"]["crop"] == [64, 128], recipe
        assert raw["train"]["iters"] == (1000 if recipe == "source_only" else 200), recipe
        assert (raw["select"]["every"], raw["select"]["images"]) == ((250 if recipe == "source_only" else 50), 100)
    assert [full["recipes"][r]["data"]["batch_size"] for r in ("source_only", "cpsl_stage1")] == [8, 4]
    assert full["recipes"]["cpsl_kd"]["optim"]["model"] == {**full["blocks"]["adamw"], "lr": 0.0001}
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert default["recipes"]["source_only"]["model"]["output_stride"] == 16
    assert default["recipes"]["source_only"]["select"]["every"] == 0      # the demo selects no checkpoint
    assert default["recipes"]["cpsl_kd"]["optim"]["model"]["lr"] == 0.00005   # the demo's slower KD rounds
    for preset in sorted((ROOT / "presets").glob("synthetic_*.yaml")):
        if preset.stem != "synthetic_full":
            assert yaml.safe_load(preset.read_text())["base"] == "synthetic_full.yaml", preset.name


def test_the_check_takes_the_evaluation_merge_in_any_order():
    """PyYAML orders a merge of several mappings differently from one version to another (6.0.3 puts
    the selftrained rows before the models, 6.0.4 after): the check asks for the same rows, not the same order."""
    from lib.config import load_params
    params = load_params(ROOT / "params.yaml")
    models = params["evaluate"]["models"]
    assert len(models) > 1
    params["evaluate"]["models"] = dict(reversed(list(models.items())))
    check_params(params)
    params["evaluate"]["models"] = dict(list(models.items())[1:])
    with pytest.raises(ConfigError, match="evaluate.models must be the merge of the tables"):
        check_params(params)
