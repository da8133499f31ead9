"""Multi-seed aggregation (lib/seeds.py): the maths on constructed inputs, then a real DVC queue."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lib import seeds
from lib.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=6))
def test_mean_and_std_match_numpy(table):
    runs = {f"run{i}": {"a.mIoU": row[0], "a.images": row[1], "b.targets.x": row[2]} for i, row in enumerate(table)}
    result = seeds.aggregate(runs)
    assert list(result) == ["a.mIoU", "a.images", "b.targets.x"]
    for j, key in enumerate(result):
        column = np.array([row[j] for row in table])
        assert result[key]["n"] == len(table) and result[key]["values"] == list(column)
        assert result[key]["mean"] == pytest.approx(np.mean(column), rel=1e-9, abs=1e-6)
        assert result[key]["std"] == pytest.approx(np.std(column, ddof=1), rel=1e-9, abs=1e-6)


def test_nulls_are_left_out_of_the_statistics():
    result = seeds.aggregate({"a": {"m": 10.0, "u": None}, "b": {"m": None, "u": None}, "c": {"m": 14.0, "u": None}})
    assert result["m"] == {"mean": 12.0, "std": pytest.approx(np.std([10, 14], ddof=1)), "n": 2,
                           "values": [10.0, None, 14.0]}
    assert result["u"] == {"mean": None, "std": None, "n": 0, "values": [None, None, None]}
    one = seeds.aggregate({"a": {"m": 3.0}, "b": {"m": None}})["m"]
    assert one["mean"] == 3.0 and one["std"] is None and one["n"] == 1


def test_runs_must_report_the_same_metrics():
    with pytest.raises(ConfigError, match="b lacks f.json:mIoU that a reports"):
        seeds.aggregate({"a": {("f.json", "mIoU"): 1.0, ("f.json", "images"): 2}, "b": {("f.json", "images"): 2}})
    with pytest.raises(ConfigError, match="a lacks f.json:extra that b reports"):
        seeds.aggregate({"a": {("f.json", "m"): 1.0}, "b": {("f.json", "m"): 1.0, ("f.json", "extra"): 2.0}})
    with pytest.raises(ConfigError, match="at least two experiments"):
        seeds.aggregate({"a": {"m": 1.0}})


def test_flatten_keeps_numbers_and_nulls():
    assert seeds.flatten({"mIoU": 26.1, "images": 200, "targets": {"c": 1.5, "b": None}, "ok": True,
                          "note": "text", "curve": [1, 2]}) == {"mIoU": 26.1, "images": 200, "targets.c": 1.5,
                                                               "targets.b": None}


def row(name, rev, state="success", metrics=None, params=None, error=None):
    return {"name": name, "rev": rev, "state": state, "error": error,
            "data": {"metrics": {f: {"data": d} for f, d in (metrics or {}).items()},
                     "params": {"params.yaml": {"data": params or {}}}}}


def test_find_runs_names_what_is_wrong():
    rows = [row(None, "workspace", state=None), row("main", "a" * 40, state=None),
            row("s-1", "1234567" + "0" * 33), row("s-2", "1234567" + "f" * 33), row("q", "b" * 40, state="queued")]
    assert [r["name"] for r in seeds.find_runs(rows, ["s-1", "main"])] == ["s-1", "main"]
    assert seeds.find_runs(rows, ["12345670"])[0]["name"] == "s-1"            # a commit prefix
    with pytest.raises(ConfigError, match=r"'nope' is not an experiment of baseline HEAD \(known: main, q, s-1, s-2"):
        seeds.find_runs(rows, ["nope"])
    with pytest.raises(ConfigError, match="'1234567' is ambiguous"):
        seeds.find_runs(rows, ["1234567"])
    with pytest.raises(DataError, match=r"'q' has not finished successfully \(state queued\)"):
        seeds.find_runs(rows, ["s-1", "q"])
    failed = row("f", "c" * 40, state="failed", error={"type": "ReproductionError", "msg": "stage 'train' failed"})
    with pytest.raises(DataError, match=r"'f' has not finished successfully \(stage 'train' failed\)"):
        seeds.find_runs([*rows, failed], ["f"])
    with pytest.raises(ConfigError, match="named twice"):
        seeds.find_runs(rows, ["s-1", "s-1"])


def test_summary_and_table():
    rows = [row(f"s-{i}", f"{i}" * 40, metrics={"m/t.json": {"mIoU": v, "images": 2}},
                params={"train": {"seed": i, "iters": 10}}) for i, v in ((1, 20.0), (2, 22.5), (3, 30.25))]
    summary = seeds.summarize(rows)
    assert summary["experiments"] == {"s-1": "1" * 40, "s-2": "2" * 40, "s-3": "3" * 40}
    assert summary["params"] == {"train.seed": [1, 2, 3]}
    miou = summary["metrics"]["m/t.json"]["mIoU"]
    assert miou["mean"] == pytest.approx(np.mean([20, 22.5, 30.25]))
    table = seeds.markdown(summary).splitlines()
    assert table[0] == "| metric | mean ± std | n | s-1 | s-2 | s-3 |"
    assert table[2] == f"| m/t.json: mIoU | 24.25 ± {np.std([20, 22.5, 30.25], ddof=1):.2f} | 3 | 20 | 22.50 | 30.25 |"
    assert table[3] == "| m/t.json: images | 2 ± 0 | 3 | 2 | 2 | 2 |"


# ---------------------------------------------------------------- with real DVC
SCRIPT = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
s = p["train"]["seed"]
os.makedirs("metrics/eval/model", exist_ok=True)
json.dump({"mIoU": round(20 + 3.5 * s + 0.75 * s * s, 2), "images": 2}, open("metrics/eval/model/target.json", "w"))
summary = {"model": {"a": {"mIoU": s + 0.5, "mAcc": 40.0}, "avg": {"mIoU": 5.0 * s}}}   # as the summary stage writes
json.dump(summary, open("metrics/summary.json", "w"))
"""

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train.seed]
    metrics:
      - metrics/eval/model/target.json: {cache: false}
      - metrics/summary.json: {cache: false}
"""


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def expected_miou(seed: int) -> float:
    return round(20 + 3.5 * seed + 0.75 * seed * seed, 2)


def test_three_queued_seeds_aggregated(tmp_path, monkeypatch):
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"seed": 0, "iters": 3}}))
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "tiny project")

    queued = sh(tmp_path, "dvc", "exp", "run", "--queue", "-n", "seed", "-S", "train.seed=1,2,5").stdout
    assert "Queued experiment 'seed-3' for future execution." in queued
    sh(tmp_path, "dvc", "queue", "start", "-j", "2")
    monkeypatch.chdir(tmp_path)
    deadline = time.time() + 90
    try:
        while True:
            rows = seeds.experiments_table()
            states = {r["name"]: r["state"] for r in rows if r["name"] and r["name"].startswith("seed-")}
            done = all(state not in ("queued", "running") for state in states.values())
            if set(states) == {"seed-1", "seed-2", "seed-3"} and done:
                break
            assert time.time() < deadline, f"the queue did not finish: {states}"
            time.sleep(1)
    finally:
        sh(tmp_path, "dvc", "queue", "stop", check=False)
    assert set(states.values()) == {"success"}, sh(tmp_path, "dvc", "queue", "status").stdout

    res = sh(tmp_path, sys.executable, "-m", "lib.seeds", "seed-1", "seed-2", "seed-3", "--name", "three")
    assert "5 metrics over 3 experiments" in res.stderr
    summary = json.loads((tmp_path / "metrics/seeds/three.json").read_text())
    assert list(summary["experiments"]) == ["seed-1", "seed-2", "seed-3"]
    seeds_run = summary["params"]["train.seed"]
    assert seeds_run == [1, 2, 5] and set(summary["params"]) == {"train.seed"}
    miou = np.array([expected_miou(s) for s in seeds_run])
    target = summary["metrics"]["metrics/eval/model/target.json"]
    assert target["mIoU"]["values"] == list(miou) and target["mIoU"]["n"] == 3
    assert target["mIoU"]["mean"] == pytest.approx(np.mean(miou))
    assert target["mIoU"]["std"] == pytest.approx(np.std(miou, ddof=1))
    assert target["images"] == {"mean": 2.0, "std": 0.0, "n": 3, "values": [2, 2, 2]}
    nested = summary["metrics"]["metrics/summary.json"]
    assert nested["model.a.mIoU"]["mean"] == pytest.approx(np.mean(np.array(seeds_run) + 0.5))
    assert nested["model.avg.mIoU"]["values"] == [5.0 * s for s in seeds_run]
    assert nested["model.a.mAcc"] == {"mean": 40.0, "std": 0.0, "n": 3, "values": [40.0, 40.0, 40.0]}
    table = (tmp_path / "metrics/seeds/three.md").read_text()
    assert "| metrics/eval/model/target.json: mIoU |" in table and "| metrics/summary.json: model.a.mIoU |" in table

    # the errors, on DVC's own table: an unknown name; the baseline commit, whose metrics files DVC
    # cannot read (never committed), against an experiment
    with pytest.raises(ConfigError, match="'seed-9' is not an experiment of baseline HEAD"):
        seeds.find_runs(rows, ["seed-1", "seed-9"])
    head = sh(tmp_path, "git", "rev-parse", "HEAD").stdout.strip()
    branch = sh(tmp_path, "git", "branch", "--show-current").stdout.strip()
    with pytest.raises(ConfigError, match=f"^experiments differ in their metrics: {branch} lacks "
                                          r"metrics/eval/model/target.json:mIoU, .* \(\+2 more\) "
                                          "that seed-1 reports$"):
        seeds.summarize(seeds.find_runs(rows, ["seed-1", head]))
