"""The multi-target average and the summary of every evaluation (lib.infer.summary, the `summary`
stage): aggregation, params checks, the stage."""
from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from lib.config import parse
from lib.errors import ConfigError, DataError
from lib.infer.params import EvaluateParams
from lib.infer.summary import (
    average_over_targets,
    class_table,
    markdown,
    summarize,
    write_summary,
)
from stages.summary import main as summary_stage


def test_mean_of_the_reported_values():
    # BlindNet (Ahn et al., CVPR 2024), GTAV -> Cityscapes / BDD100K / Mapillary and their published average 44.71
    reports = {"cityscapes": {"mIoU": 45.72, "mAcc": 60.0}, "bdd100k": {"mIoU": 41.32},
               "mapillary": {"mIoU": 47.08}}
    assert average_over_targets(reports) == {
        "mIoU": 44.71, "targets": {"cityscapes": 45.72, "bdd100k": 41.32, "mapillary": 47.08}}
    # ISW (Choi et al., CVPR 2021): 36.58 / 35.20 / 40.33 -> 37.37
    assert average_over_targets({"c": {"mIoU": 36.58}, "b": {"mIoU": 35.2}, "m": {"mIoU": 40.33}})["mIoU"] == 37.37
    assert average_over_targets({"only": {"mIoU": 12.5}})["mIoU"] == 12.5


def test_an_undefined_target_makes_the_mean_undefined():
    assert average_over_targets({"a": {"mIoU": 10.0}, "b": {"mIoU": None}}) == {
        "mIoU": None, "targets": {"a": 10.0, "b": None}}
    with pytest.raises(ValueError):
        average_over_targets({})


def evaluate_params(averages, models=None) -> dict:
    return {"models": models if models is not None else {"warmup": {}}, "targets": ["a", "b", "c"],
            "averages": averages}


def test_averages_are_checked_against_the_targets():
    params = parse(EvaluateParams, evaluate_params({"unseen": ["b", "c"]}), "evaluate")
    assert params.averages == {"unseen": ["b", "c"]}
    assert parse(EvaluateParams, {"models": {}, "targets": ["a"]}, "evaluate").averages == {}
    with pytest.raises(ConfigError, match="evaluate.averages.x: d not in evaluate.targets"):
        parse(EvaluateParams, evaluate_params({"x": ["a", "d"]}), "evaluate")
    for bad in ([], ["a", "a"]):
        with pytest.raises(ConfigError, match="evaluate.averages.x must list distinct targets"):
            parse(EvaluateParams, evaluate_params({"x": bad}), "evaluate")
    # the targets themselves: at least one, each once
    for bad in ([], ["a", "a"]):
        with pytest.raises(ConfigError, match="evaluate.targets must list distinct prepared datasets"):
            parse(EvaluateParams, {"models": {}, "targets": bad}, "evaluate")


BLINDNET = {"cityscapes": {"mIoU": 45.72, "mAcc": 60.0, "images": 500},
            "bdd100k": {"mIoU": 41.32, "mAcc": 55.5}, "mapillary": {"mIoU": 47.08, "mAcc": 62.25}}


def test_summary_holds_each_target_and_each_average():
    reports = {"blindnet": BLINDNET,
               "warmup": {"cityscapes": {"mIoU": 10.0, "mAcc": 20.0}, "bdd100k": {"mIoU": None, "mAcc": None},
                          "mapillary": {"mIoU": 30.0, "mAcc": 40.0}}}
    averages = {"unseen": ["cityscapes", "bdd100k", "mapillary"], "pair": ["cityscapes", "mapillary"]}
    summary = summarize(reports, averages)
    assert summary == {
        "blindnet": {"cityscapes": {"mIoU": 45.72, "mAcc": 60.0}, "bdd100k": {"mIoU": 41.32, "mAcc": 55.5},
                     "mapillary": {"mIoU": 47.08, "mAcc": 62.25}, "unseen": {"mIoU": 44.71},
                     "pair": {"mIoU": 46.4}},
        "warmup": {"cityscapes": {"mIoU": 10.0, "mAcc": 20.0}, "bdd100k": {"mIoU": None, "mAcc": None},
                   "mapillary": {"mIoU": 30.0, "mAcc": 40.0}, "unseen": {"mIoU": None}, "pair": {"mIoU": 20.0}}}
    # only mIoU and mAcc of each report are kept (the rest stays in the evaluation's own file)
    assert summarize({"m": {"a": {"mIoU": 1.0, "mAcc": 2.0, "images": 3}}}, {}) == {
        "m": {"a": {"mIoU": 1.0, "mAcc": 2.0}}}
    # an average may not be named like a target: the summary would hold two values under one key
    with pytest.raises(ConfigError, match="evaluate.averages.bdd100k has the name of a target"):
        summarize(reports, {"bdd100k": ["cityscapes", "mapillary"]})

    table = markdown(summary)
    lines = table.splitlines()
    assert lines[0] == "| model | cityscapes | bdd100k | mapillary | unseen | pair |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| blindnet | 45.72 | 41.32 | 47.08 | 44.71 | 46.40 |"
    assert lines[3] == "| warmup | 10.00 | – | 30.00 | – | 20.00 |"
    assert len(lines) == 4 and table.endswith("\n")


def test_class_table_lists_every_model_per_class(tmp_path):
    for model, ious in (("a", ("50.0000", "")), ("b", ("12.5000", "7.2500"))):
        (tmp_path / model).mkdir()
        (tmp_path / model / "classes.csv").write_text(
            "class,iou,acc,gt_pixels,pred_pixels\n"
            f"road,{ious[0]},1,10,10\nsky,{ious[1]},2,0,3\n")
    table = class_table({"a": tmp_path / "a/classes.csv", "b": tmp_path / "b/classes.csv"})
    rows = list(csv.reader(io.StringIO(table)))
    assert rows == [["class", "model", "iou"], ["road", "a", "50.0000"], ["sky", "a", ""],
                    ["road", "b", "12.5000"], ["sky", "b", "7.2500"]]
    with pytest.raises(DataError, match="missing"):
        class_table({"c": tmp_path / "c/classes.csv"})


def write_evaluation(root, model: str, target: str, miou, macc=None) -> None:
    """What the evaluate stage writes: metrics/eval/<model>/<target>.json and <target>/classes.csv."""
    (root / model / target).mkdir(parents=True, exist_ok=True)
    (root / model / f"{target}.json").write_text(json.dumps({"mIoU": miou, "mAcc": macc, "images": 2}))
    (root / model / target / "classes.csv").write_text(
        f"class,iou,acc,gt_pixels,pred_pixels\nroad,{'' if miou is None else miou},{macc},4,4\n")


def test_write_summary_reads_every_model_and_target(tmp_path):
    root = tmp_path / "eval"
    for model, values in (("m1", (90.0, 20.25, 30.5)), ("m2", (1.0, 2.0, 3.0))):
        for target, miou in zip("abc", values):
            write_evaluation(root, model, target, miou, miou + 1)
    out = tmp_path / "out"
    out.mkdir()
    summary = write_summary(root, ["m1", "m2"], ["a", "b", "c"], {"unseen": ["b", "c"]}, out / "summary.json",
                            out / "summary.md", out / "classes")
    assert summary["m1"]["unseen"] == {"mIoU": 25.38} and summary["m2"]["unseen"] == {"mIoU": 2.5}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "summary.md").read_text() == markdown(summary)
    assert sorted(p.name for p in (out / "classes").iterdir()) == ["a.csv", "b.csv", "c.csv"]
    assert (out / "classes/b.csv").read_text() == "class,model,iou\nroad,m1,20.25\nroad,m2,2.0\n"
    (root / "m2/c.json").unlink()
    with pytest.raises(DataError, match="m2/c.json: missing"):
        write_summary(root, ["m1", "m2"], ["a", "b", "c"], {}, out / "summary.json", out / "summary.md",
                      out / "classes")


def test_stage_writes_the_summary_of_every_model_of_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    models = {"warmup": {"recipe": "source_only", "from": "scratch"}}
    selftrained = {"stage1": {"recipe": "cpsl_stage1", "from": "warmup", "pseudo": "soft"}}
    ensembles = {"both": {"models": ["warmup", "stage1"], "weights": [0.5, 0.5]}}
    params = {"source": "a", "target": "b", "models": models, "selftrained": selftrained, "ensembles": ensembles,
              "evaluate": evaluate_params({"unseen": ["b", "c"]}, {**models, **selftrained, **ensembles})}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    root = tmp_path / "metrics/eval"
    values = {"warmup": (90.0, 20.25, 30.5), "stage1": (91.0, 22.0, 33.0), "both": (92.0, 23.0, None)}
    for model, per_target in values.items():
        for target, miou in zip("abc", per_target):
            write_evaluation(root, model, target, miou, 50.0)
    summary_stage()
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert list(summary) == ["warmup", "stage1", "both"]
    assert summary["warmup"] == {"a": {"mIoU": 90.0, "mAcc": 50.0}, "b": {"mIoU": 20.25, "mAcc": 50.0},
                                 "c": {"mIoU": 30.5, "mAcc": 50.0}, "unseen": {"mIoU": 25.38}}
    assert summary["stage1"]["unseen"] == {"mIoU": 27.5}
    assert summary["both"]["unseen"] == {"mIoU": None} and summary["both"]["c"] == {"mIoU": None, "mAcc": 50.0}
    assert (tmp_path / "metrics/summary.md").read_text() == markdown(summary)
    assert [p.name for p in sorted((tmp_path / "metrics/classes").iterdir())] == ["a.csv", "b.csv", "c.csv"]
    assert (tmp_path / "metrics/classes/a.csv").read_text() == (
        "class,model,iou\nroad,warmup,90.0\nroad,stage1,91.0\nroad,both,92.0\n")
    out = capsys.readouterr().out
    assert "| warmup | 90.00 | 20.25 | 30.50 | 25.38 |" in out and "(3 models x 3 targets)" in out

    # an average named like a target is an error, reported as one line
    params["evaluate"]["averages"] = {"c": ["a", "b"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):
        summary_stage()
    assert "evaluate.averages.c has the name of a target" in capsys.readouterr().err

    # an evaluation not run yet: the stage names the missing file
    params["evaluate"]["averages"] = {"unseen": ["b", "c"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "stage1/c.json").unlink()
    with pytest.raises(SystemExit):
        summary_stage()
    assert "metrics/eval/stage1/c.json: missing" in capsys.readouterr().err
