"""End to end: the self-training chain (CPSL by default, BAFFT as a preset) under real DVC, tiny params."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from lib.preset import main as apply_preset
from tests.test_pipeline import ROOT, make_project, sh, tiny_params

CHAIN = ("warmup", "selftrain", "distill_1", "distill_2")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    params = tiny_params(chain=True)
    params["evaluate"]["targets"] = ["synth_cityscapes"]
    project = make_project(tmp_path_factory.mktemp("chain"), params)
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "chain")
    return project


def test_default_params_run_the_cpsl_chain_and_evaluate_every_stage(chain):
    methods = {m: json.loads((chain / "data/models" / m / "meta.json").read_text())["method"] for m in CHAIN}
    assert methods == {"warmup": "source_only", "selftrain": "cpsl_stage1",
                       "distill_1": "cpsl_kd", "distill_2": "cpsl_kd"}
    for model in CHAIN:
        result = json.loads((chain / "metrics" / model / "synth_cityscapes.json").read_text())
        assert result["images"] == 2 and 0 <= result["mIoU"] <= 100
    shown = sh(chain, "dvc", "metrics", "show")
    assert all(f"metrics/{m}/synth_cityscapes.json" in shown for m in CHAIN)


def test_pseudo_label_artifacts_of_the_chain(chain):
    soft = chain / "data/pseudo/soft_warmup"
    meta = json.loads((soft / "meta.json").read_text())
    assert meta["form"] == "soft" and meta["dataset"] == "synth_cityscapes"
    prototypes, prior = np.load(soft / "prototypes.npy"), np.load(soft / "prior.npy")
    assert prototypes.shape == (19, 512) and prior.shape == (19,)   # ASPP model: layer4 of a ResNet-18
    assert prior.sum() == pytest.approx(1.0, abs=1e-5)
    for name in ("hard_selftrain", "hard_distill_1"):
        hard = json.loads((chain / "data/pseudo" / name / "meta.json").read_text())
        assert hard["form"] == "hard_threshold"
        kept = pd.read_csv(chain / "metrics/pseudo" / name / "classes.csv")
        assert len(kept) == 19


def test_chain_stages_log_their_own_losses(chain):
    curves = chain / "metrics/selftrain/train/plots/metrics/train/loss"
    assert {p.stem for p in curves.glob("*.tsv")} >= {"src", "sce", "cons", "sl"}
    kd = pd.read_csv(chain / "metrics/distill_1/train/plots/metrics/train/loss/kd.tsv", sep="\t")
    assert (kd["kd"] < 0).all()          # the released KD form is negative (cpsl.md §7)


def test_distill_params_rerun_only_the_distillation_rounds(chain):
    out = sh(chain, "dvc", "exp", "run", "-S", "distill.cpsl_kd.kd_form=kl")
    for stage in ("distill@1", "distill@2", "pseudo_label@hard_distill_1",
                  "evaluate@distill_1-synth_cityscapes", "evaluate@distill_2-synth_cityscapes"):
        assert f"Running stage '{stage}'" in out, stage
    for stage in ("warmup", "selftrain@selftrain", "pseudo_label@soft_warmup", "pseudo_label@hard_selftrain",
                  "evaluate@warmup-synth_cityscapes", "evaluate@selftrain-synth_cityscapes"):
        assert f"Running stage '{stage}'" not in out, stage
    kd = pd.read_csv(chain / "metrics/distill_1/train/plots/metrics/train/loss/kd.tsv", sep="\t")
    assert (kd["kd"] >= 0).all()         # the true KL is not
    sh(chain, "git", "checkout", "params.yaml", "dvc.lock")
    sh(chain, "dvc", "checkout", "-f")


def test_an_iteration_matched_control_is_one_more_run(chain):
    out = sh(chain, "dvc", "exp", "run",
             "-S", "+selftrain.runs.control={init: warmup, pseudo: soft_warmup, method: advent, "
                   "advent: {adv_main: 0.0, adv_aux: 0.0}}",
             "-S", "evaluate.models=[warmup, selftrain, distill_1, distill_2, control]")
    assert "Running stage 'selftrain@control'" in out
    assert "Running stage 'selftrain@selftrain'" not in out and "Running stage 'warmup'" not in out
    meta = json.loads((chain / "data/models/control/meta.json").read_text())
    assert meta["method"] == "advent" and meta["params"]["train"]["iters"] == 4
    assert (chain / "metrics/control/synth_cityscapes.json").is_file()
    sh(chain, "git", "checkout", "params.yaml", "dvc.lock")
    sh(chain, "dvc", "checkout", "-f")


def test_bafft_preset_runs_step1_class_median_labels_and_step2(chain):
    tiny_iters = yaml.safe_load((chain / "params.yaml").read_text())["warmup"]["train"]["iters"]
    apply_preset([str(ROOT / "presets/synthetic_bafft.yaml"), "--params", str(chain / "params.yaml")])
    params = yaml.safe_load((chain / "params.yaml").read_text())
    assert params["selftrain"]["method"] == "bafft_step2" and params["distill"]["rounds"] == {}
    assert params["warmup"]["train"]["iters"] == 1000      # the preset's step-1 budget; the test keeps its tiny one
    params["warmup"]["train"]["iters"] = tiny_iters
    (chain / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(chain, "dvc", "exp", "run")
    for stage in ("warmup", "pseudo_label@median_warmup", "selftrain@selftrain"):
        assert f"Running stage '{stage}'" in out, stage
    assert "distill@" not in out
    median = json.loads((chain / "data/pseudo/median_warmup/meta.json").read_text())
    assert median["form"] == "class_median"
    assert all(t <= 0.9 for t in median["thresholds"])
    assert json.loads((chain / "data/models/selftrain/meta.json").read_text())["method"] == "bafft_step2"
    curves = chain / "metrics/selftrain/train/plots/metrics/train/loss"
    assert (curves / "seg_target.tsv").is_file()
    sh(chain, "git", "checkout", "params.yaml", "dvc.lock")
    sh(chain, "dvc", "checkout", "-f")
