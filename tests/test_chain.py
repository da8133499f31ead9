"""End to end: the self-training chain (CPSL by default, BAFFT as a preset) under real DVC, tiny params,
and what a change re-runs: exactly the rows that grow from it."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ruamel.yaml import YAML

from lib.preset import main as apply_preset
from tests.test_pipeline import ROOT, edit_params, make_project, restore, sh, tiny_params

CHAIN = ("warmup", "stage1", "kd1", "kd2")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    params = tiny_params(chain=True)
    params["evaluate"]["targets"] = ["synth_cityscapes"]
    project = make_project(tmp_path_factory.mktemp("chain"), params)
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "chain")
    return project


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def test_default_params_run_the_cpsl_chain_and_evaluate_every_stage(chain):
    methods = {m: json.loads((chain / "data/models" / m / "meta.json").read_text())["method"] for m in CHAIN}
    assert methods == {"warmup": "source_only", "stage1": "cpsl_stage1", "kd1": "cpsl_kd", "kd2": "cpsl_kd"}
    for model in CHAIN:
        result = json.loads((chain / "metrics/eval" / model / "synth_cityscapes.json").read_text())
        assert result["images"] == 2 and 0 <= result["mIoU"] <= 100
    summary = json.loads((chain / "metrics/summary.json").read_text())
    assert list(summary) == list(CHAIN)
    assert "kd2.synth_cityscapes.mIoU" in sh(chain, "dvc", "metrics", "show")


def test_pseudo_label_sets_of_the_chain(chain):
    soft = chain / "data/pseudo/soft_warmup"
    meta = json.loads((soft / "meta.json").read_text())
    assert meta["form"] == "soft" and meta["dataset"] == "synth_cityscapes"
    prototypes, prior = np.load(soft / "prototypes.npy"), np.load(soft / "prior.npy")
    assert prototypes.shape == (19, 512) and prior.shape == (19,)   # ASPP model: layer4 of a ResNet-18
    assert prior.sum() == pytest.approx(1.0, abs=1e-5)
    for name, labeller in (("hard_stage1", "stage1"), ("hard_kd1", "kd1")):
        hard = json.loads((chain / "data/pseudo" / name / "meta.json").read_text())
        assert hard["form"] == "hard_threshold" and hard["model"] == labeller
        kept = pd.read_csv(chain / "metrics/pseudo" / name / "classes.csv")
        assert len(kept) == 19
        # the labeller travels with its labels: the teacher the next round distils
        copy = chain / "data/pseudo" / name / "labeller/model.pt"
        assert copy.read_bytes() == (chain / "data/models" / labeller / "model.pt").read_bytes()


def test_chain_stages_log_their_own_losses(chain):
    curves = chain / "metrics/train/stage1/plots/metrics/train/loss"
    assert {p.stem for p in curves.glob("*.tsv")} >= {"src", "sce", "cons", "sl"}
    kd = pd.read_csv(chain / "metrics/train/kd1/plots/metrics/train/loss/kd.tsv", sep="\t")
    assert (kd["kd"] < 0).all()          # the released KD form is negative (CPSL's released code)


def test_an_edit_to_a_method_the_chain_does_not_use_reruns_only_the_params_check(chain):
    """Its recipe's params and its file: the default chain has nothing to re-run but the params check
    (which reads every entry of params.yaml, in seconds, before any stage could lose an output)."""
    def add_recipe(params):
        params["recipes"]["blindnet"] = {"model": {"arch": "deeplabv3plus", "depth": 18}, "data": {"batch_size": 2},
                                         "optim": {"model": {"type": "adamw", "lr": 0.001}}, "train": {"iters": 2}}
    edit_params(chain, add_recipe)
    method = chain / "lib/methods/blindnet.py"
    method.write_text(method.read_text() + "\n# an edit\n")
    try:
        status = sh(chain, "dvc", "status")
        assert {line.rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")} == {"check"}
        assert ran(sh(chain, "dvc", "repro")) == {"check"}
        assert "Data and pipelines are up to date" in sh(chain, "dvc", "status")
    finally:
        sh(chain, "git", "checkout", "lib/methods/blindnet.py")
        restore(chain)


def test_an_edit_to_a_method_the_chain_uses_reruns_exactly_its_rows_and_what_grows_from_them(chain):
    method = chain / "lib/methods/cpsl_kd.py"
    method.write_text(method.read_text() + "\n# an edit\n")
    try:
        status = sh(chain, "dvc", "status")
        changed = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
        assert changed == {"selftrain@kd1", "selftrain@kd2"}
        out = sh(chain, "dvc", "repro")
        # a comment changes no weight: both rows reproduce their models bit for bit, so nothing downstream
        # (labels, evaluations) runs again; a real change re-runs them (the recipe test below)
        assert ran(out) == {"selftrain@kd1", "selftrain@kd2"}
        assert "Data and pipelines are up to date" in sh(chain, "dvc", "status")
    finally:
        sh(chain, "git", "checkout", "lib/methods/cpsl_kd.py")
        restore(chain)


def test_recipe_params_rerun_only_the_rows_of_that_recipe(chain):
    try:
        out = sh(chain, "dvc", "exp", "run", "-S", "+recipes.cpsl_kd.method={kd_form: kl}")
        assert ran(out) == {"check", "selftrain@kd1", "pseudo_label@hard_kd1", "selftrain@kd2",
                            "evaluate@kd1-synth_cityscapes", "evaluate@kd2-synth_cityscapes", "summary"}
        kd = pd.read_csv(chain / "metrics/train/kd1/plots/metrics/train/loss/kd.tsv", sep="\t")
        assert (kd["kd"] >= 0).all()         # the true KL is not negative
    finally:
        restore(chain)


def test_an_iteration_matched_control_is_one_more_row(chain):
    try:
        out = sh(chain, "dvc", "exp", "run", "-S",
                 "+selftrained.ctl_kd1={recipe: cpsl_stage1, from: stage1, pseudo: soft_warmup}")
        assert ran(out) == {"check", "selftrain@ctl_kd1", "evaluate@ctl_kd1-synth_cityscapes", "summary"}
        meta = json.loads((chain / "data/models/ctl_kd1/meta.json").read_text())
        assert meta["method"] == "cpsl_stage1" and meta["from"] == "stage1" and meta["params"]["train"]["iters"] == 4
        assert "ctl_kd1" in json.loads((chain / "metrics/summary.json").read_text())
    finally:
        restore(chain)


def own_layer(preset: str, folder) -> str:
    """A synthetic preset without its `base` (the research size, presets/synthetic_full.yaml), so that it
    is laid over the tiny params as they are."""
    text = (ROOT / "presets" / preset).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("base:")]
    assert len(lines) == len(text.splitlines()) - 1, f"{preset} has no base line"
    (folder / preset).write_text("\n".join(lines) + "\n")
    return str(folder / preset)


def test_bafft_preset_runs_step1_class_median_labels_and_step2(chain, tmp_path):
    try:
        apply_preset([own_layer("synthetic_bafft.yaml", tmp_path), "--params", str(chain / "params.yaml")])
        params = YAML().load((chain / "params.yaml").read_text())
        assert params["recipes"]["bafft_step1"]["train"]["iters"] == 6    # a copy of the (tiny) source-only recipe
        assert set(params["selftrained"]) == {"step2"} and set(params["pseudo_labels"]) == {"median_step1"}
        assert set(params["models"]) == {"step1", "step1_source_only", "step1_more"}   # with step 1's and step 2's controls
        edit_params(chain, lambda doc: doc["pseudo_labels"]["median_step1"]["options"].update(batch_size=2, workers=0))
        out = sh(chain, "dvc", "exp", "run")
        assert {"train@step1", "pseudo_label@median_step1", "selftrain@step2", "train@step1_source_only",
                "train@step1_more"} <= ran(out)
        assert not any(stage.startswith(("selftrain@kd", "train@warmup")) for stage in ran(out))
        median = json.loads((chain / "data/pseudo/median_step1/meta.json").read_text())
        assert median["form"] == "class_median"
        assert all(t <= 0.9 for t in median["thresholds"])
        assert json.loads((chain / "data/models/step2/meta.json").read_text())["method"] == "bafft_step2"
        curves = chain / "metrics/train/step2/plots/metrics/train/loss"
        assert (curves / "seg_target.tsv").is_file()
        assert set(json.loads((chain / "metrics/summary.json").read_text())) == {"step1", "step1_source_only",
                                                                                 "step1_more", "step2"}
    finally:
        restore(chain)
