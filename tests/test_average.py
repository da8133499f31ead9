"""The multi-target average (average@<model>-<name>): aggregation, params checks, the stage."""
from __future__ import annotations

import json

import pytest
import yaml

from lib.config import parse
from lib.infer.evaluation import EvaluateParams
from lib.infer.report import average_over_targets
from lib.errors import ConfigError
from stages.average import main as average_stage


def test_mean_of_the_reported_values():
    # blindnet.md §8: BlindNet GTAV -> C / B / M and their published average 44.71
    reports = {"cityscapes": {"mIoU": 45.72, "mAcc": 60.0}, "bdd100k": {"mIoU": 41.32},
               "mapillary": {"mIoU": 47.08}}
    assert average_over_targets(reports) == {
        "mIoU": 44.71, "targets": {"cityscapes": 45.72, "bdd100k": 41.32, "mapillary": 47.08}}
    # ISW: 36.58 / 35.20 / 40.33 -> 37.37
    assert average_over_targets({"c": {"mIoU": 36.58}, "b": {"mIoU": 35.2}, "m": {"mIoU": 40.33}})["mIoU"] == 37.37
    assert average_over_targets({"only": {"mIoU": 12.5}})["mIoU"] == 12.5


def test_an_undefined_target_makes_the_mean_undefined():
    assert average_over_targets({"a": {"mIoU": 10.0}, "b": {"mIoU": None}}) == {
        "mIoU": None, "targets": {"a": 10.0, "b": None}}
    with pytest.raises(ValueError):
        average_over_targets({})


def evaluate_params(averages) -> dict:
    return {"models": ["warmup"], "targets": ["a", "b", "c"], "averages": averages}


def test_averages_are_checked_against_the_targets():
    params = parse(EvaluateParams, evaluate_params({"unseen": ["b", "c"]}), "evaluate")
    assert params.averages == {"unseen": ["b", "c"]}
    assert parse(EvaluateParams, {"models": [], "targets": []}, "evaluate").averages == {}
    with pytest.raises(ConfigError, match="evaluate.averages.x: d not in evaluate.targets"):
        parse(EvaluateParams, evaluate_params({"x": ["a", "d"]}), "evaluate")
    for bad in ([], ["a", "a"]):
        with pytest.raises(ConfigError, match="evaluate.averages.x must list distinct targets"):
            parse(EvaluateParams, evaluate_params({"x": bad}), "evaluate")


def test_stage_writes_the_average_of_the_evaluation_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": evaluate_params({"unseen": ["b", "c"]})}))
    (tmp_path / "metrics/warmup").mkdir(parents=True)
    for target, miou in (("a", 90.0), ("b", 20.25), ("c", 30.5)):
        (tmp_path / "metrics/warmup" / f"{target}.json").write_text(json.dumps({"mIoU": miou, "images": 2}))
    average_stage(["warmup", "unseen"])
    assert json.loads((tmp_path / "metrics/warmup-unseen.json").read_text()) == {
        "mIoU": 25.38, "targets": {"b": 20.25, "c": 30.5}}
    with pytest.raises(SystemExit):
        average_stage(["warmup", "nope"])
    (tmp_path / "metrics/warmup/c.json").unlink()
    with pytest.raises(SystemExit):
        average_stage(["warmup", "unseen"])
    err = capsys.readouterr().err
    assert "no average 'nope' under evaluate.averages" in err and "metrics/warmup/c.json: missing" in err
