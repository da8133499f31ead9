"""The benchmark scripts run and report consistent numbers (never absolute timings): the loader
against model throughput on a tiny prepared project, and bench/gpu.py's CPU dry run.  The scripts'
``main`` run in this process: a fresh interpreter per script would double the time on 2 cores."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml

from bench import gpu, loader_throughput
from bench import optimizer as optimizer_bench
from bench import precision as precision_bench
from bench.run_all import rows as bench_rows
from bench.loader_throughput import configured_workers, stage_section
from lib.errors import ConfigError
from tests.layouts import prepare_gta_and_cityscapes
from tests.test_pipeline import tiny_params


def test_sections_resolve_as_their_stages_do():
    params = tiny_params(chain=True)
    params["variants"] = {"minent": {"method": "minent"}}
    assert stage_section(params, "warmup") == ("warmup", params["warmup"])
    name, raw = stage_section(params, "selftrain")               # the first run
    assert name == "selftrain" and raw["init"] == "warmup" and "runs" not in raw
    name, raw = stage_section(params, "distill.2")
    assert name == "distill_2" and raw["teacher"] == "distill_1"
    params["finetune"] = {"dacs": {"init": "warmup", "method": "ciss"}}
    name, raw = stage_section(params, "finetune.dacs")
    assert name == "dacs" and raw["init"] == "warmup" and raw["method"] == "ciss" and "model" not in raw
    name, raw = stage_section(params, "variants.minent")
    assert name == "minent" and raw["method"] == "minent" and raw["data"] == params["warmup"]["data"]
    with pytest.raises(ConfigError, match="expected warmup"):
        stage_section(params, "evaluate")
    with pytest.raises(ConfigError, match="selftrain.runs.nope"):
        stage_section(params, "selftrain.nope")
    assert configured_workers({"data": {"workers": 1}, "target_data": {"workers": 3}}) == 3
    assert configured_workers({"data": {"workers": 1}, "target_data": {"crop": [8, 8]}}) == 1


@pytest.fixture(scope="module")
def loader_project(tmp_path_factory):
    return prepare_gta_and_cityscapes(tmp_path_factory.mktemp("bench"))


def run_bench(project, script, args: list[str], workers: int = 0, **warmup_keys) -> tuple[dict, str]:
    """``script.main(args + --out)`` in ``project`` with a tiny warm-up section (``warmup_keys`` replaced):
    (its JSON, what it printed)."""
    warmup = tiny_params()["warmup"]
    warmup.update(source="gta", **warmup_keys)
    warmup["data"].update(batch_size=2, crop=[32, 64], workers=workers)
    (project / "params.yaml").write_text(yaml.safe_dump({"warmup": warmup}))
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
    assert r["method"] == "advent" and r["stage"] == "warmup"
    assert r["streams"] == {"source": [2, 3, 32, 64], "target": [2, 3, 32, 64]}
    assert r["images_per_iter"] == 4
    assert [row["workers"] for row in r["loader"]] == [0, 1, 2]
    assert [row["workers"] for row in r["loader"] if row["configured"]] == [1]


def test_loader_throughput_stops_the_stage_before_training(loader_result, loader_project):
    assert not (loader_project / "data/models").exists() and not (loader_project / "data/checkpoints").exists()
    assert not (loader_project / "metrics").exists()


def test_loader_throughput_ratios_are_loader_over_model(loader_result):
    r = loader_result
    model = r["model"]["images_per_s"]
    assert model > 0 and len(r["model"]["runs"]) == 2
    for row in r["loader"]:
        assert row["images_per_s"] > 0 and len(row["runs"]) == 2
        assert row["ratio"] == pytest.approx(row["images_per_s"] / model)
    assert r["ratio"] == next(row["ratio"] for row in r["loader"] if row["configured"])


def test_precision_bench_compares_the_same_model_in_both_precisions(loader_project):
    project = loader_project
    r, printed = run_bench(project, precision_bench, ["--steps", "1", "--repeats", "2", "--images", "2"])
    assert "bf16/fp32" in printed
    assert r["train"]["images_per_iter"] == 2 and r["inference"]["images"] == 2
    assert r["inference"]["size"] == [12, 16]                        # the prepared images' size (tests.layouts)
    for side in ("train", "inference"):
        runs = r[side]["runs"]
        assert set(runs) == {"fp32", "bf16"} and all(len(v) == 2 and min(v) > 0 for v in runs.values())
        medians = r[side]["seconds_per_iter" if side == "train" else "seconds"]
        assert r[side]["ratio"] == pytest.approx(medians["bf16"] / medians["fp32"])
    assert 0.9 <= r["inference"]["argmax_agreement"] <= 1.0
    assert r["engine_precision"] == ("bf16" if r["native_bf16"] else "fp32")
    assert not (project / "data/models").exists() and not (project / "metrics").exists()


def test_optimizer_bench_times_the_engine_update_against_the_per_tensor_loop(loader_project):
    project = loader_project
    r, printed = run_bench(project, optimizer_bench, ["--steps", "2", "--repeats", "2"],   # model + discriminator
                           method="advent", target="cs")
    assert "ratio fused/per-tensor" in printed
    assert r["method"] == "advent" and len(r["optimizers"]) == 2 and r["tensors"] > 0
    assert set(r["runs"]) == {"fused", "per_tensor"} and all(len(v) == 2 and min(v) > 0 for v in r["runs"].values())
    assert r["ratio"] == pytest.approx(r["seconds_per_update"]["fused"] / r["seconds_per_update"]["per_tensor"])
    assert 0 < r["max_abs_parameter_difference"] <= 1e-5 or r["max_abs_parameter_difference"] == 0.0
    table = bench_rows({"train_overhead": {"ratio": 1.0}, "eval_speed": {"ratio": 0.5, "images": 1, "agree": True},
                        "precision": {"native_bf16": False, "train": {"ratio": 1.0}, "inference": {"ratio": 1.0}},
                        "optimizer": r, "loader_throughput": {}})
    assert [row[2] for row in table if row[0] == "optimizer update"] == [r["ratio"]]
    assert not (project / "data/models").exists() and not (project / "metrics").exists()


def test_gpu_bench_refuses_without_cuda_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip().count("\n") == 0 and "no CUDA device" in printed.err


def test_gpu_bench_dry_run_exercises_every_measurement(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--steps", "1", "--warmup-steps", "0", "--repro-target", "synthesize",
                     "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"].startswith("CPU")
    entries = {e["name"]: e for e in [*r["deeplabv2"], r["cpsl"]]}
    assert entries["gta5_cityscapes_deeplabv2"]["streams"] == {"source": [1, 32, 64]}
    assert entries["gta5_cityscapes_advent"]["streams"] == {"source": [1, 32, 64], "target": [1, 32, 64]}
    assert entries["cpsl_stage1"]["streams"] == {"source": [4, 32, 64], "target": [4, 32, 64]}
    assert entries["cpsl_stage1"]["method"] == "cpsl_stage1" and "cpsl head" in entries["cpsl_stage1"]["model"]
    for entry in entries.values():
        runs = entry["runs"]
        assert set(runs) == {"fp32", "bf16+channels_last"}
        for run in runs.values():
            assert run["images_per_s"] > 0 and run["peak_memory_gib"] is None     # no CUDA memory on CPU
            assert run["images_per_s"] == pytest.approx(run["images_per_iter"] / run["seconds_per_iter"])
        assert entry["ratio_images_per_s_bf16_over_fp32"] == pytest.approx(
            runs["bf16+channels_last"]["images_per_s"] / runs["fp32"]["images_per_s"])
        assert entry["ratio_peak_memory_bf16_over_fp32"] is None
    assert r["repro"]["stages_run"] == 1 and r["repro"]["wall_s"] > 0 and not r["repro"]["chain"]
    assert "tiny dvc repro" in capsys.readouterr().out
