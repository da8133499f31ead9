"""The benchmark scripts run and report consistent numbers (never absolute timings): the loader
against model throughput on a tiny prepared project, and bench/gpu.py's CPU dry run.  The scripts'
``main`` run in this process: a fresh interpreter per script would double the time on 2 cores."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from ruamel.yaml import YAML

from bench import gpu, loader_throughput
from bench import recipes as recipes_bench
from bench import optimizer as optimizer_bench
from bench import precision as precision_bench
from bench import soft_labels as soft_labels_bench
from bench.loader_throughput import (
    configured_workers,
    require_inputs,
    training_row,
    with_workers,
)
from bench.pipeline_times import arithmetic, kind_of
from bench.run_all import rows as bench_rows
from lib.config import ParamsLoader
from lib.errors import ConfigError, DataError
from lib.preset import tidy
from lib.table import find_training_row
from tests.layouts import prepare_gta_and_cityscapes
from tests.tables import ensure_scratch, one_row
from tests.test_pipeline import tiny_params

DISCRIMINATOR = {"type": "adam", "lr": 0.0001, "betas": [0.9, 0.99], "weight_decay": 0.0, "head_lr_mult": 1.0}


def plain(params) -> dict:
    """The tiny params as DVC and the stages read them once written: plain dicts and lists, every
    ``<<:`` merge resolved against the edited anchors."""
    text = io.StringIO()
    tidy(params)
    YAML().dump(params, text)
    return yaml.load(text.getvalue(), Loader=ParamsLoader)


def test_models_resolve_as_their_stages_do(tmp_path):
    params = plain(tiny_params(chain=True))
    row = training_row(params, "warmup")
    assert row == find_training_row(params, "warmup")
    assert (row.table, row.stage, row.recipe, row.start) == ("models", "train@warmup", "source_only", "scratch")
    assert row.raw == params["recipes"]["source_only"]
    row = training_row(params, "kd1")                         # a self-trained row: its set and its start
    assert (row.table, row.stage, row.recipe, row.start, row.pseudo) == (
        "selftrained", "selftrain@kd1", "cpsl_kd", "stage1", "hard_stage1")
    assert row.raw["pseudo_threshold"] == 0.95 and row.target == "synth_cityscapes"
    params["models"]["more_workers"] = {"recipe": "source_only", "from": "warmup",
                                        "overrides": {"data": {"workers": 5}, "train": {"processes": 2}}}
    row = training_row(params, "more_workers")                # overrides laid over the recipe, one process
    assert row.raw["data"] == {**params["recipes"]["source_only"]["data"], "workers": 5}
    assert row.raw["train"]["processes"] == 1 and row.raw["train"]["iters"] == 6
    assert configured_workers(row.raw) == 5
    with pytest.raises(ConfigError, match="no model 'soft_warmup'"):      # a pseudo-label set is not a model
        training_row(params, "soft_warmup")
    with pytest.raises(ConfigError, match="no model 'nope'"):
        training_row(params, "nope")

    stage1 = training_row(params, "stage1")
    changed = with_workers(stage1, 3)
    assert changed.raw["data"]["workers"] == 3 and "target_data" not in changed.raw
    assert dataclasses.replace(changed, raw=stage1.raw) == stage1     # only the recipe changed
    assert stage1.raw["data"]["workers"] == 0                 # the row itself is left as it was
    two = dataclasses.replace(stage1, raw={**stage1.raw, "target_data": {"crop": [16, 32], "workers": 1}})
    assert with_workers(two, 3).raw["target_data"] == {"crop": [16, 32], "workers": 3}
    assert configured_workers({"data": {"workers": 1}, "target_data": {"workers": 3}}) == 3
    assert configured_workers({"data": {"workers": 1}, "target_data": {"crop": [8, 8]}}) == 1

    with contextlib.chdir(tmp_path):                          # the inputs a row's stage reads, named by stage
        with pytest.raises(DataError, match=r"dvc repro scratch"):
            require_inputs(params, training_row(params, "warmup"))
        with pytest.raises(DataError, match=r"dvc repro selftrain@stage1"):
            require_inputs(params, training_row(params, "kd1"))
        with pytest.raises(DataError, match=r"dvc repro train@warmup"):
            require_inputs(params, training_row(params, "stage1"))
        (tmp_path / "data/models/stage1").mkdir(parents=True)
        (tmp_path / "data/models/stage1/model.pt").write_bytes(b"")
        with pytest.raises(DataError, match=r"dvc repro pseudo_label@hard_stage1"):
            require_inputs(params, training_row(params, "kd1"))


def test_pipeline_stages_are_classified_by_kind():
    kinds = {"synthesize": "data", "prepare@synth_gta5": "data", "stylize@synth_gta5_lab": "stylize",
             "translate@gta5_cyclegan": "stylize", "scratch": "weights", "weights@imagenet_r101": "weights",
             "train@warmup": "train", "selftrain@stage1": "train", "cyclegan_train@gta5_cyclegan": "train",
             "pseudo_label@soft_warmup": "pseudo-label", "ensemble@advent_minent": "ensemble",
             "evaluate@warmup-synth_gta5": "evaluate", "summary": "evaluate", "warmup": "other"}
    assert {stage: kind_of(stage) for stage in kinds} == kinds


def test_the_pipeline_table_records_the_arithmetic_it_was_measured_in(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert arithmetic() == {"native_bf16": False, "onednn_isa_cap": "AVX2", "aten_cpu_capability": "avx2"}


@pytest.fixture(scope="module")
def loader_project(tmp_path_factory):
    project = prepare_gta_and_cityscapes(tmp_path_factory.mktemp("bench"))
    ensure_scratch(project)          # the start of the row, as the `scratch` stage writes it
    return project


def no_outputs(project: Path) -> bool:
    """Nothing trained: data/models holds only the start, no checkpoint, no curves."""
    return (sorted(p.name for p in (project / "data/models").iterdir()) == ["scratch"]
            and not (project / "data/checkpoints").exists() and not (project / "metrics").exists())


def run_bench(project, script, args: list[str], workers: int = 0, method: str = "source_only",
              target: str | None = None) -> tuple[dict, str]:
    """``script.main(args + --out)`` in ``project`` with one tiny model row ``warmup`` (recipe ``method``
    from scratch, the tiny source-only blocks): (its JSON, what it printed)."""
    recipe = plain(tiny_params()["recipes"]["source_only"])
    recipe["data"].update(batch_size=2, crop=[32, 64], workers=workers)
    recipe.pop("select")            # the tiny project has no validation split to select on
    if method == "advent":
        recipe["optim"]["discriminator"] = DISCRIMINATOR
    (project / "params.yaml").write_text(yaml.safe_dump(one_row("warmup", method, recipe, source="gta",
                                                                target=target)))
    out = project / f"{script.__name__.rpartition('.')[2]}.json"
    printed = io.StringIO()
    with contextlib.chdir(project), contextlib.redirect_stdout(printed):
        script.main([*args, "--out", str(out)])
    return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def loader_result(loader_project) -> dict:
    r, printed = run_bench(loader_project, loader_throughput,                      # two streams: source and target
                           ["--workers", "0", "2", "--batches", "3", "--steps", "1", "--repeats", "2"],
                           workers=1, method="advent", target="cs")
    assert "ratio loader/model at the configured workers" in printed
    return r


def test_loader_throughput_measures_the_stage_streams(loader_result):
    r = loader_result
    assert r["method"] == "advent" and r["row"] == "warmup" and r["stage"] == "train@warmup"
    assert r["table"] == "models"
    assert r["streams"] == {"source": [2, 3, 32, 64], "target": [2, 3, 32, 64]}
    assert r["images_per_iter"] == 4
    assert [row["workers"] for row in r["loader"]] == [0, 1, 2]
    assert [row["workers"] for row in r["loader"] if row["configured"]] == [1]


def test_loader_throughput_stops_the_stage_before_training(loader_result, loader_project):
    assert no_outputs(loader_project)


def test_loader_throughput_ratios_are_loader_over_model(loader_result):
    r = loader_result
    model = r["model"]["images_per_s"]
    assert model > 0 and len(r["model"]["runs"]) == 2
    for row in r["loader"]:
        assert row["images_per_s"] > 0 and len(row["runs"]) == 2
        assert row["ratio"] == pytest.approx(row["images_per_s"] / model)
    assert r["ratio"] == next(row["ratio"] for row in r["loader"] if row["configured"])
    table = bench_rows({"train_overhead": {"ratio": 1.0}, "eval_speed": {"ratio": 0.5, "images": 1, "agree": True},
                        "precision": {"native_bf16": False, "train": {"ratio": 1.0}, "inference": {"ratio": 1.0}},
                        "optimizer": {"ratio": 0.5, "max_abs_parameter_difference": 0.0},
                        "loader_throughput": {"warmup": r}})
    assert [row[2] for row in table if row[0] == "loader vs model: warmup"] == [row["ratio"] for row in r["loader"]]


def test_precision_bench_compares_the_same_model_in_both_precisions(loader_project):
    project = loader_project
    r, printed = run_bench(project, precision_bench, ["--steps", "1", "--repeats", "2", "--images", "2"])
    assert "bf16/fp32" in printed
    assert r["row"] == "warmup" and r["method"] == "source_only"
    assert r["train"]["images_per_iter"] == 2 and r["inference"]["images"] == 2
    assert r["inference"]["size"] == [12, 16]                        # the prepared images' size (tests.layouts)
    for side in ("train", "inference"):
        runs = r[side]["runs"]
        assert set(runs) == {"fp32", "bf16"} and all(len(v) == 2 and min(v) > 0 for v in runs.values())
        medians = r[side]["seconds_per_iter" if side == "train" else "seconds"]
        assert r[side]["ratio"] == pytest.approx(medians["bf16"] / medians["fp32"])
    assert 0.9 <= r["inference"]["argmax_agreement"] <= 1.0
    assert r["engine_precision"] == ("bf16" if r["native_bf16"] else "fp32")
    assert no_outputs(project)


def test_optimizer_bench_times_the_engine_update_against_the_per_tensor_loop(loader_project):
    project = loader_project
    r, printed = run_bench(project, optimizer_bench, ["--steps", "2", "--repeats", "2"],   # model + discriminator
                           method="advent", target="cs")
    assert "ratio fused/per-tensor" in printed
    assert r["row"] == "warmup" and r["method"] == "advent" and len(r["optimizers"]) == 2 and r["tensors"] > 0
    assert set(r["runs"]) == {"fused", "per_tensor"} and all(len(v) == 2 and min(v) > 0 for v in r["runs"].values())
    assert r["ratio"] == pytest.approx(r["seconds_per_update"]["fused"] / r["seconds_per_update"]["per_tensor"])
    assert 0 < r["max_abs_parameter_difference"] <= 1e-5 or r["max_abs_parameter_difference"] == 0.0
    table = bench_rows({"train_overhead": {"ratio": 1.0}, "eval_speed": {"ratio": 0.5, "images": 1, "agree": True},
                        "precision": {"native_bf16": False, "train": {"ratio": 1.0}, "inference": {"ratio": 1.0}},
                        "optimizer": r, "loader_throughput": {}})
    assert [row[2] for row in table if row[0] == "optimizer update"] == [r["ratio"]]
    assert no_outputs(project)


def test_gpu_bench_refuses_without_cuda_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip().count("\n") == 0 and "no CUDA device" in printed.err


def test_gpu_bench_builds_its_rows_from_the_presets():
    source_only, advent = gpu.deeplabv2_steps(shrink=False)
    assert (source_only.row.where, source_only.row.recipe, source_only.start) == (
        "models.source_only", "source_only", "weights")
    assert (advent.row.where, advent.row.recipe, advent.start) == ("models.advent", "advent", "weights")
    assert source_only.row.raw == advent.row.raw                     # the base's recipe, trained source-only
    assert not source_only.soft_labels and not advent.soft_labels
    cpsl = gpu.cpsl_step(shrink=False)
    assert (cpsl.row.where, cpsl.row.recipe, cpsl.row.pseudo, cpsl.start, cpsl.soft_labels) == (
        "selftrained.stage1", "cpsl_stage1", "soft_warmup", "model", True)
    recipe, method_params = gpu.parse_recipe(cpsl.row)                # the published sizes
    assert (recipe.data.batch_size, recipe.data.crop, recipe.model.depth) == (4, (512, 896), 101)
    assert method_params.queue_length == 65536
    recipe, _ = gpu.parse_recipe(advent.row)
    assert (recipe.data.crop, recipe.stream_data("target").crop) == ((720, 1280), (512, 1024))


def test_gpu_bench_dry_run_exercises_every_measurement(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    presets = ["gta5_cityscapes_cpsl", "gta5_cityscapes_bafft", "cityscapes_acdc_ciss", "gta5_robustnet_isw",
               "gta5_cityscapes_minent", "gta5_cityscapes_advent_minent_ensemble"]
    assert gpu.main(["--dry-run", "--steps", "1", "--warmup-steps", "0", "--repro-target", "synthesize",
                     "--measure", "precision", "presets", "inference", "nccl", "repro", "--preset", *presets,
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"].startswith("CPU") and not r["errors"] and not r["skipped"]
    entries = {e["name"]: e for e in r["precision"]}
    assert entries["gta5_cityscapes_deeplabv2"]["streams"] == {"source": [1, 32, 64]}
    assert entries["gta5_cityscapes_deeplabv2"]["method"] == "source_only"
    assert entries["gta5_cityscapes_advent"]["streams"] == {"source": [1, 32, 64], "target": [1, 32, 64]}
    assert entries["gta5_cityscapes_advent"]["row"] == "models.advent"
    assert entries["gta5_cityscapes_advent"]["method"] == "advent"
    assert entries["cpsl_stage1"]["row"] == "selftrained.stage1"
    assert entries["cpsl_stage1"]["streams"] == {"source": [4, 32, 64], "target": [4, 32, 64]}
    assert entries["cpsl_stage1"]["method"] == "cpsl_stage1" and "cpsl head" in entries["cpsl_stage1"]["model"]
    for entry in entries.values():
        runs = entry["runs"]
        assert set(runs) == {"fp32", "bf16", "bf16+channels_last"}
        for run in runs.values():
            assert run["images_per_s"] > 0 and run["peak_memory_gib"] is None     # no CUDA memory on CPU
            assert run["images_per_s"] == pytest.approx(run["images_per_iter"] / run["seconds_per_iter"])
        for precision, key in (("bf16", "bf16"), ("bf16+channels_last", "bf16_channels_last")):
            assert entry[f"ratio_images_per_s_{key}_over_fp32"] == pytest.approx(
                runs[precision]["images_per_s"] / runs["fp32"]["images_per_s"])
            assert entry[f"ratio_peak_memory_{key}_over_fp32"] is None
    # every training stage of the presets, each distinct step once: the KD rounds (a teacher, hard
    # labels), BAFFT's step 2 (hard labels) and CycleGAN, CISS's paired streams, RobustNet's ISW
    stages = {(e["preset"], e["stage"]): e for e in r["presets"]}
    assert set(stages) == {("gta5_cityscapes_cpsl", s) for s in ("train@warmup", "selftrain@stage1", "selftrain@kd1",
                                                                 "selftrain@kd2")} | {
        ("gta5_cityscapes_bafft", s) for s in ("train@step1", "selftrain@step2", "cyclegan_train@gta5_cyclegan")} | {
        ("cityscapes_acdc_ciss", "train@ciss"), ("gta5_robustnet_isw", "train@robustnet"),
        ("gta5_cityscapes_minent", "train@minent"), ("gta5_cityscapes_advent_minent_ensemble", "train@minent"),
        ("gta5_cityscapes_advent_minent_ensemble", "train@advent")}
    for entry in stages.values():
        assert set(entry["runs"]) == {"fp32", "bf16+channels_last"}
        assert all(run["seconds_per_iter"] > 0 for run in entry["runs"].values())
    again = stages["gta5_cityscapes_advent_minent_ensemble", "train@minent"]     # the same step: measured once
    assert again["runs"] == stages["gta5_cityscapes_minent", "train@minent"]["runs"]
    assert again["first"] == "gta5_cityscapes_minent train@minent"
    kd1, kd2 = stages["gta5_cityscapes_cpsl", "selftrain@kd1"], stages["gta5_cityscapes_cpsl", "selftrain@kd2"]
    assert kd1["first"] != kd2["first"]          # KD-1 starts from weights, KD-2 from a model: two steps
    assert stages["gta5_cityscapes_bafft", "cyclegan_train@gta5_cyclegan"]["method"] == "cyclegan"
    assert stages["gta5_robustnet_isw", "train@robustnet"]["streams"] == {"source": [16, 32, 64]}
    # inference: the 2048x1024 frame's protocols, and every evaluation, pseudo-labelling and translation
    frame = r["inference"]["frame"]
    assert [(f["protocol"], f["precision"]) for f in frame] == [
        (p, q) for p in ("whole", "whole+flip", "slide+flip") for q in ("fp32", "bf16+channels_last")]
    for f in frame:
        assert f["cityscapes_val_s"] == pytest.approx(500 * f["seconds_per_image"])
    inferred = {(s["preset"], s["stage"]): s for s in r["inference"]["stages"]}
    assert {"evaluate@kd2-cityscapes", "pseudo_label@soft_warmup", "pseudo_label@hard_kd1"} <= {
        stage for preset, stage in inferred if preset == "gta5_cityscapes_cpsl"}
    assert ("gta5_cityscapes_bafft", "translate@gta5_cyclegan") in inferred
    assert ("gta5_robustnet_isw", "evaluate@robustnet-mapillary_1536") in inferred
    ensemble = inferred["gta5_cityscapes_advent_minent_ensemble", "evaluate@advent_minent-cityscapes"]
    assert ensemble["seconds_per_image"] > 0
    assert inferred["gta5_cityscapes_cpsl", "pseudo_label@hard_kd1"]["flip"] is True      # hard labels: flip
    assert inferred["gta5_cityscapes_cpsl", "pseudo_label@soft_warmup"]["flip"] is False
    assert all(s["seconds_per_image"] > 0 for s in inferred.values())
    # one process under torchrun (gloo on CPU): it steps and publishes
    nccl = r["nccl"]
    assert nccl["dvc_repro"]["returncode"] == 0 and nccl["torchrun"]["returncode"] == 0
    assert nccl["torchrun"]["model_written"] and nccl["torchrun"]["world_size"] == 1
    # check + synthesize: the params are validated before any data is written
    assert r["repro"]["stages_run"] == 2 and r["repro"]["wall_s"] > 0 and not r["repro"]["chain"]
    printed = capsys.readouterr().out
    assert "Tiny `dvc repro`" in printed and "Every published training stage" in printed


def test_gpu_hours_add_up_the_measured_steps_and_images(tmp_path):
    """--hours: a training stage is its step times its iterations plus its checkpoint selections (and a
    one-off such as ISW's statistics, scaled by the step's speed-up), an inference stage its images;
    a data stage is the host's; each precision is totalled on its own, a missing one named with its reason.
    Every term below is an hour or more, so none hides in the rounding."""
    def row(**given):     # the fields bench/recipes.py's table reads beside the ones the hours use
        return {"seconds": 1.0, "peak_rss_mb": 1, "peak_tree_mb": 1, "out_bytes": 0, "full_out_bytes": 0,
                "full_cpu_h": None, "batch": 1, **given}
    stages = [
        row(stage="prepare@a", unit="image", per_unit_s=0.1, full_units=100, full_cpu_h=2.0),
        row(stage="train@m", unit="iteration", per_unit_s=50.0, full_units=7200, selections=4,
            select_images=900, select_dataset="b", one_off_s=72000.0, batch_factor=2.0),
        row(stage="selftrain@k", unit="iteration", per_unit_s=9.0, full_units=3600),
        row(stage="cyclegan_train@g", unit="iteration", per_unit_s=9.0, full_units=3600),
        row(stage="evaluate@m-b", unit="image", per_unit_s=5.0, full_units=1800),
        row(stage="pseudo_label@s", unit="image", per_unit_s=9.0, full_units=3600),
        row(stage="translate@g", unit="image", per_unit_s=9.0, full_units=7200)]
    recipes = {"cpu": "the 2-core CPU", "presets": [
        {"preset": "p", "stages": stages, "completed": True, "seconds": 1.0, "cpus": 2, "scale": 1.0,
         "full_cpu_h": 1.0, "full_out_bytes": 0, "max_batch": None},
        {"preset": "q", "stages": [row(stage="train@n", unit="iteration", per_unit_s=1.0, full_units=3600)],
         "completed": True, "seconds": 1.0, "cpus": 2, "scale": 1.0, "full_cpu_h": 1.0, "full_out_bytes": 0}]}
    both = {"fp32": {"seconds_per_iter": 1.0, "peak_reserved_gib": 30.0},
            "bf16+channels_last": {"seconds_per_iter": 0.5, "peak_reserved_gib": 15.0}}
    shown = {"streams": {"source": [1, 8, 8]}, "fits": {"fp32": {}, "bf16+channels_last": {}}}      # what gpu.md's table shows beside the step
    measured = {"device": "GPU X, 80 GiB", "commit": "abc", "torch": "2",
                "presets": [{"preset": "p", "stage": s, "runs": both, **shown}
                            for s in ("train@m", "selftrain@k", "cyclegan_train@g")]
                + [{"preset": "q", "stage": "train@n", **shown, "runs": {
                    "fp32": {"error": "out of memory"},
                    "bf16+channels_last": {"seconds_per_iter": 1.0, "peak_reserved_gib": 20.0}}}],
                "inference": {"stages": [{"preset": "p", "stage": s, "seconds_per_image": 2.0, "size": [8, 8]}
                                         for s in ("evaluate@m-b", "pseudo_label@s", "translate@g")]}}
    training = {e["stage"]: e for e in measured["presets"] if e["preset"] == "p"}
    inference = {e["stage"]: e for e in measured["inference"]["stages"]}
    seconds = {st["stage"]: gpu.stage_gpu_seconds(st, training, inference, "fp32")[0] for st in stages}
    one_off = 72000.0 * 1.0 / (50.0 * 2.0)                   # the CPU's one-off at the GPU's speed-up: 720 s
    assert seconds == pytest.approx({"prepare@a": 0.0, "train@m": 7200 + 4 * 900 * 2.0 + one_off,
                                     "selftrain@k": 3600, "cyclegan_train@g": 3600, "evaluate@m-b": 3600,
                                     "pseudo_label@s": 7200, "translate@g": 14400})
    assert gpu.stage_gpu_seconds(stages[1], training, inference, "bf16+channels_last")[0] == pytest.approx(
        3600 + 7200 + 360)
    assert gpu.stage_gpu_seconds(stages[1], training, {}, "fp32") == (None, "selection not measured")
    with pytest.raises(ValueError, match="no kind it knows"):
        gpu.stage_gpu_seconds({"stage": "newkind@x"}, training, inference, "fp32")

    out = gpu.gpu_hours(measured, recipes)
    p, q = out["presets"]
    assert p["full_gpu_h"]["fp32"] == pytest.approx(sum(seconds.values()) / 3600, abs=0.05)
    assert p["host_cpu_h"] == 2.0 and p["gpu_missing"] == {}
    assert q["full_gpu_h"] == {"fp32": None, "bf16+channels_last": 1.0}     # bf16's total stands on its own
    assert q["gpu_missing"] == {"train@n (fp32)": "out of memory"}
    assert out["gpu"]["device"] == "GPU X, 80 GiB" and "full_gpu_h" not in recipes["presets"][0]   # a copy

    # written beside the CPU rows: the CPU's name kept, the GPU named, the .md with its column
    recipes_json, gpu_json = tmp_path / "recipes.json", tmp_path / "gpu.json"
    recipes_json.write_text(json.dumps(recipes))
    gpu_json.write_text(json.dumps({**measured, "dry_run": False, "steps": 5, "warmup_steps": 2, "images": 3}))
    assert gpu.main(["--hours", str(gpu_json), "--recipes", str(recipes_json)]) == 0
    written = json.loads(recipes_json.read_text())
    assert written["cpu"] == "the 2-core CPU" and written["gpu"]["commit"] == "abc"
    table = recipes_json.with_suffix(".md").read_text()
    assert "one GPU: h fp32 / bf16+cl" in table and "| – / 1.0 |" in table
    assert "GPU hours of every published recipe" in gpu_json.with_suffix(".md").read_text()
    # bench/recipes.py rewriting a preset's CPU rows drops the GPU hours computed on the old ones
    stale = recipes_bench.without_gpu_hours(written["presets"][0])
    assert not {"full_gpu_h", "gpu_missing", "host_cpu_h"} & set(stale)
    assert all("gpu_h" not in stage for stage in stale["stages"])


def test_a_step_fits_a_card_with_its_context():
    assert gpu.fits({"peak_reserved_gib": 23.0}) == {"80 GB": True, "24 GB": True}       # 23 + 1 GiB of context
    assert gpu.fits({"peak_reserved_gib": 23.5}) == {"80 GB": True, "24 GB": False}
    assert gpu.fits({"error": "out of memory"}) == {} and gpu.fits({"peak_reserved_gib": None}) == {}


def test_soft_labels_bench_measures_both_ways_of_loading_a_soft_label(tmp_path, capsys):
    """At 512x1024 the full-size map alone is 40 MB; the stored map and its grid are a fraction."""
    soft_labels_bench.main(["--size", "512", "1024", "--draws", "1", "--out", str(tmp_path / "soft.json")])
    r = json.loads((tmp_path / "soft.json").read_text())
    assert r["size"] == [512, 1024] and r["classes"] == 19
    full, stored = r["per_sample_mb"]["full_size"], r["per_sample_mb"]["stored_size"]
    assert full > 40 and stored < 0.5 * full and r["ratio"] == pytest.approx(stored / full)
    assert "stored size + sampling grid" in capsys.readouterr().out


def test_pseudo_storage_bench_keeps_exactly_the_full_precision_mask():
    import argparse

    from bench import pseudo_storage
    args = argparse.Namespace(images=2, size=[128, 256], classes=19, stride=8, logit_scale=24.0, threshold=0.95)
    res = pseudo_storage.measure(args)
    assert res["code_mask_exact"] and 0.2 < res["per_image_bytes"]["kept_share"] < 0.9
    assert res["per_image_bytes"]["float16_npy"] == 128 * 256 * 2 + 128           # header + 2 bytes a pixel
    assert res["code_over_float16"] < 0.5


def test_eval_speed_interleaves_both_sides_and_says_how_the_official_one_counted(tmp_path):
    from bench import eval_speed
    out = tmp_path / "eval.json"
    threads = torch.get_num_threads()
    try:
        code = eval_speed.main(["--images", "3", "--size", "48x96", "--repeat", "3", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)    # the bench pins one thread; the rest of the suite keeps its own
    assert code == 0
    result = json.loads(out.read_text())
    assert result["agree"] is True and len(result["ratios"]) == 3
    assert result["ratio"] == sorted(result["ratios"])[1]
    assert isinstance(result["official_addon"], bool) and result["official_decoder"] == "PIL"


def test_train_overhead_alternates_its_pairs_and_reports_each_ratio(tmp_path):
    from bench import train_overhead
    out = tmp_path / "overhead.json"
    train_overhead.main(["--iters", "2", "--repeats", "2", "--batch", "2", "--crop", "32", "48",
                         "--log-every", "1", "--checkpoint-every", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert len(result["runs"]["bare"]) == len(result["runs"]["engine"]) == len(result["ratios"]) == 2
    pairs = zip(result["runs"]["bare"], result["runs"]["engine"])
    assert result["ratios"] == pytest.approx([e / b for b, e in pairs])
    assert result["ratio"] == pytest.approx(sum(result["ratios"]) / 2)     # the median of two


def test_imports_bench_times_fresh_interpreters_and_no_stage_imports_torchvision(tmp_path):
    from bench import imports
    result = imports.measure([imports.ROOT], ["evaluate", "synthesize"], repeats=1)
    rows = result["roots"][str(imports.ROOT)]
    assert rows["evaluate"]["median_s"] > 0 and rows["evaluate"]["ratio_to_first"] == 1.0
    assert "torch._dynamo" not in rows["evaluate"]["loads"] and "torchvision" not in rows["evaluate"]["loads"]
    assert "torch" not in rows["synthesize"]["loads"] and "cv2" in rows["synthesize"]["loads"]


def test_demo_levers_times_every_variant_each_round_against_stride_8(tmp_path):
    from bench import demo_levers
    result = demo_levers.main(["--batch", "2", "--crop", "32", "48", "--rounds", "2", "--steps", "1",
                               "--out", str(tmp_path / "levers.json")])
    variants = result["variants"]
    assert set(variants) == set(demo_levers.VARIANTS) and variants["stride 8, NCHW"]["ratio"] == 1.0
    assert all(len(v["runs"]) == 2 and v["s_per_step"] > 0 for v in variants.values())
    assert json.loads((tmp_path / "levers.json").read_text())["variants"] == variants


def test_gpu_bench_reads_the_process_group_and_nccl_version_from_the_log():
    log = ("[I1204 ProcessGroupNCCL.cpp:988] [PG ID 0 PG GUID 0 Rank 0] ProcessGroupNCCL initialization options: "
           "size: 1, global rank: 0\n[I1204 ProcessGroupNCCL.cpp:997] NCCL version: 2.28.9, "
           "TORCH_NCCL_ASYNC_ERROR_HANDLING: 1\n")
    assert (gpu.process_group(log), gpu.nccl_version(log)) == ("nccl", "2.28.9")
    assert (gpu.process_group("train@warmup: 100%"), gpu.nccl_version("train@warmup: 100%")) == (None, None)
