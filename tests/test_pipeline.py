"""End to end: the committed dvc.yaml run by real DVC in a temporary git repository on tiny params."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ruamel.yaml import YAML

from lib.preset import tidy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# One torch thread per stage: a resumed run is bit-identical to an uninterrupted one by construction
# (the SIGKILL tests), and stages never oversubscribe the cores.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}
TARGETS = ("synth_gta5", "synth_cityscapes", "synth_acdc_night")


def sh(cwd: Path, *cmd: str) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout + res.stderr


def tiny_params(chain: bool = False):
    """The committed params shrunk to seconds (their anchors and merges kept, as DVC reads them);
    ``chain=False`` leaves out the self-training part of the table (tests/test_chain.py runs it)."""
    params = YAML().load((ROOT / "params.yaml").read_text())
    params["synthesize"].update(height=32, width=64, workers=1,
                                counts={d: {"train": 4, "val": 2} for d in ("source", "target", "night")})
    params["prepare"]["workers"] = 1
    warmup = params["recipes"]["source_only"]
    warmup["data"].update(batch_size=2, crop=[32, 64], workers=0)
    warmup["train"].update(iters=6, checkpoint_every=2, log_every=2)
    warmup["select"]["every"] = 250     # the default selects nothing; these tests score a recipe that does
    params["blocks"]["chain_data"].update(batch_size=2, crop=[32, 64], workers=0)
    params["blocks"]["chain_train"].update(iters=4, checkpoint_every=2, log_every=2)
    params["recipes"]["cpsl_kd"]["train"].pop("iters")   # the KD rounds follow chain_train, as the tests set it
    params["recipes"]["cpsl_stage1"]["method"].update(queue_length=64, samples_per_image=16)
    for row in params["pseudo_labels"].values():
        row["options"].update(batch_size=2, workers=0)
    params["evaluate"].update(batch_size=2, workers=0, panels=1)
    if not chain:
        params["selftrained"].clear()
        params["pseudo_labels"].clear()
    return params


def write_params(path: Path, params) -> None:
    """Write params keeping anchors and merges (a round-trip ruamel document or a plain dict)."""
    yaml_rt = YAML()
    yaml_rt.width = 120
    tidy(params)
    with open(path, "w") as f:
        yaml_rt.dump(params, f)


def make_project(dest: Path, params: dict) -> Path:
    """A copy of the committed project (git-tracked files) in a fresh git repository."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    write_params(dest / "params.yaml", params)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "tiny project")
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the committed project (git-tracked files) in a fresh git repository."""
    dest = make_project(tmp_path_factory.mktemp("project"), tiny_params())
    sh(dest, "dvc", "repro")
    # committed, so that every test can return to this state on its own (the copied dvc.lock is the
    # real pipeline's, whose outputs are not in this project's cache)
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "reproduced")
    return dest


def test_repro_writes_every_prepared_dataset(project):
    for name, layout, counts in [("synth_gta5", "gta5", {"train": 4, "val": 2}),
                                 ("synth_cityscapes", "cityscapes", {"train": 4, "val": 2}),
                                 ("synth_acdc_night", "acdc", {"val": 2})]:    # night is scored only
        out = project / "data" / "prepared" / name
        meta = json.loads((out / "meta.json").read_text())
        assert meta["layout"] == layout and meta["counts"] == counts
        index = pd.read_csv(out / "index.csv", keep_default_na=False)
        assert list(index.columns[:4]) == ["id", "split", "image", "label"]
        assert all((project / p).is_file() for p in index["image"])
        assert all((project / p).is_file() for p in index["label"])
        assert (out / "class_counts.csv").is_file() and (out / "centroids.csv").is_file()
    assert (project / "data" / "raw" / "synthetic" / "gta5" / "split.mat").is_file()


def test_second_repro_is_up_to_date(project):
    out = sh(project, "dvc", "repro")
    assert "didn't change, skipping" in out or "up to date" in out
    assert "Running stage" not in out
    assert "up to date" in sh(project, "dvc", "status")


def test_prepare_param_change_reruns_only_prepare(project):
    out = sh(project, "dvc", "exp", "run", "-S", "prepare.centroid_tile=16")
    assert "Running stage 'prepare@synth_gta5'" in out
    assert "Running stage 'synthesize'" not in out
    meta = json.loads((project / "data/prepared/synth_gta5/meta.json").read_text())
    assert meta["centroid_tile"] == 16


def test_dataset_param_change_reruns_only_that_dataset(project):
    out = sh(project, "dvc", "exp", "run", "-S", "datasets.synth_acdc_night.splits=[train, val]")
    assert "Running stage 'prepare@synth_acdc_night'" in out
    assert "Running stage 'prepare@synth_gta5'" not in out and "Running stage 'stylize" not in out
    assert "Running stage 'synthesize'" not in out


# ----------------------------------------------------------------------------------------------
# training and evaluation stages


def metrics_of(project: Path, model: str = "warmup") -> dict:
    return {t: json.loads((project / "metrics/eval" / model / f"{t}.json").read_text()) for t in TARGETS}


def edit_params(project: Path, change) -> None:
    """Change params.yaml in place, keeping its anchors and merges (``change`` gets the document)."""
    yaml_rt = YAML()
    params = yaml_rt.load((project / "params.yaml").read_text())
    change(params)
    write_params(project / "params.yaml", params)


def restore(project: Path) -> None:
    """Back to the committed run: params, lock, the git-tracked reports and curves, the DVC outputs."""
    sh(project, "git", "checkout", "params.yaml", "dvc.lock", "metrics")
    sh(project, "git", "clean", "-fdq", "metrics")
    sh(project, "dvc", "checkout", "-f")


def test_repro_trains_and_evaluates(project):
    assert (project / "data/models/warmup/model.pt").is_file()
    meta = json.loads((project / "data/models/warmup/meta.json").read_text())
    assert meta["method"] == "source_only" and meta["num_classes"] == 19 and meta["from"] == "scratch"
    assert meta["stage"] == "train@warmup" and meta["kind"] == "model"
    for target, result in metrics_of(project).items():
        assert set(result) >= {"mIoU", "mAcc", "pixel_acc", "images"}
        assert result["images"] == 2
        report = project / "metrics/eval/warmup" / target
        assert len(pd.read_csv(report / "classes.csv")) == 19
        assert (report / "confusion.png").is_file() and (report / "provenance.json").is_file()
        assert len(list((report / "panels").glob("*.png"))) == 1
    curve = pd.read_csv(project / "metrics/train/warmup/plots/metrics/train/loss/seg.tsv", sep="\t")
    assert list(curve["step"]) == [2, 4, 6]
    # the finished run leaves no resumable state behind: a later code change must retrain
    assert [p.name for p in (project / "data/checkpoints/warmup").iterdir()] == ["finished.json"]
    summary = json.loads((project / "metrics/summary.json").read_text())
    # the recipe selects (every 250 iterations and at the last one): with 6 iterations the best is the last
    assert summary == {"warmup": {**{t: {"mIoU": r["mIoU"], "mAcc": r["mAcc"], "best_mIoU": r["best"]["mIoU"]}
                                     for t, r in metrics_of(project).items()}, "selected": {"iteration": 6}}}
    assert all(r["best"]["mIoU"] == r["mIoU"] for r in metrics_of(project).values())
    shown = sh(project, "dvc", "metrics", "show")
    assert "metrics/summary.json" in shown and "warmup.synth_cityscapes.mIoU" in shown
    assert "metrics/eval" not in shown and "metrics/train" not in shown    # reports and curves are no metrics
    classes = pd.read_csv(project / "metrics/classes/synth_cityscapes.csv")
    assert list(classes.columns) == ["class", "model", "iou"] and set(classes["model"]) == {"warmup"}


def test_evaluate_param_reruns_only_evaluation(project):
    out = sh(project, "dvc", "exp", "run", "-S", "evaluate.inference.flip=true",
             "-S", "+evaluate.averages.unseen=[synth_cityscapes, synth_acdc_night]")
    for target in TARGETS:
        assert f"Running stage 'evaluate@warmup-{target}'" in out
    assert "Running stage 'summary'" in out
    assert "Running stage 'train@warmup'" not in out and "Running stage 'prepare" not in out
    summary = json.loads((project / "metrics/summary.json").read_text())["warmup"]
    unseen = [m for t, m in metrics_of(project).items() if t != "synth_gta5"]
    # the average of the last iterates, and of the selected checkpoints (the recipe selects)
    assert summary["unseen"] == {"mIoU": round(sum(m["mIoU"] for m in unseen) / 2, 2),
                                 "best_mIoU": round(sum(m["best"]["mIoU"] for m in unseen) / 2, 2)}
    diff = sh(project, "dvc", "metrics", "diff", "HEAD", "--all")
    assert "metrics/summary.json" in diff and "warmup.synth_cityscapes.mIoU" in diff and "warmup.unseen.mIoU" in diff
    table = sh(project, "dvc", "exp", "show", "--no-pager", "--md")
    assert "warmup.synth_cityscapes.mIoU" in table and "evaluate.inference.flip" in table
    restore(project)


def test_recipe_param_reruns_its_rows_and_their_evaluations(project):
    out = sh(project, "dvc", "exp", "run", "-S", "recipes.source_only.train.seed=1")
    assert "Running stage 'train@warmup'" in out
    assert "Running stage 'evaluate@warmup-synth_gta5'" in out and "Running stage 'summary'" in out
    assert "Running stage 'prepare" not in out and "Running stage 'synthesize'" not in out
    assert "Running stage 'stylize" not in out
    restore(project)


def test_fda_beta_reruns_stylize_and_what_reads_it_only(project):
    sh(project, "dvc", "exp", "run", "-S", "+stylize.outputs.synth_gta5_fda=fda", "-S", "source=synth_gta5_fda")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "warm-up on the FDA source")
    out = sh(project, "dvc", "exp", "run", "-S", "stylize.fda_beta=0.05")
    assert "Running stage 'stylize@synth_gta5_fda'" in out
    assert "Running stage 'train@warmup'" in out and "Running stage 'evaluate@warmup-synth_cityscapes'" in out
    assert "Running stage 'prepare" not in out and "Running stage 'synthesize'" not in out
    meta = json.loads((project / "data/prepared/synth_gta5_fda/meta.json").read_text())
    assert "0.05" in json.dumps(meta["stylization"])
    sh(project, "git", "reset", "-q", "--hard", "HEAD~1")
    sh(project, "dvc", "checkout", "-f")


def test_adversarial_models_and_their_ensemble(project):
    """Two more rows (AdvEnt and MinEnt recipes) and an ensemble of them: one evaluation matrix
    scores all three, and nothing of the existing row re-runs."""
    def add(params):
        for method in ("advent", "minent"):
            recipe = json.loads(json.dumps(params["recipes"]["source_only"]))
            recipe["optim"]["discriminator"] = {"type": "adam", "lr": 0.0001, "betas": [0.9, 0.99]}
            params["recipes"][method] = recipe
            params["models"][method] = {"recipe": method, "from": "scratch"}
        params["ensembles"]["advent_minent"] = {"models": ["advent", "minent"], "weights": [0.5, 0.5]}
    edit_params(project, add)
    out = sh(project, "dvc", "exp", "run")
    for stage in ("train@advent", "train@minent", "ensemble@advent_minent",
                  "evaluate@advent_minent-synth_cityscapes", "summary"):
        assert f"Running stage '{stage}'" in out, stage
    assert "Running stage 'train@warmup'" not in out and "Running stage 'evaluate@warmup-" not in out
    assert json.loads((project / "data/models/minent/meta.json").read_text())["method"] == "minent"
    curves = project / "metrics/train/advent/plots/metrics/train/loss"
    assert (curves / "adv_main.tsv").is_file() and (curves / "d_main.tsv").is_file()
    ensemble = json.loads((project / "data/models/advent_minent/meta.json").read_text())
    assert ensemble["kind"] == "ensemble" and ensemble["weights"] == [0.5, 0.5]
    assert list(ensemble["members"]) == ["advent", "minent"]
    scores = json.loads((project / "metrics/summary.json").read_text())
    assert set(scores) == {"warmup", "advent", "minent", "advent_minent"}
    assert scores["advent_minent"]["synth_cityscapes"]["mIoU"] is not None
    restore(project)


def test_a_row_starts_from_another_model(project):
    """`from: warmup`: its weights and architecture, trained on; only the new row and its evaluations
    run, and dvc.lock records the start model as a dependency."""
    sh(project, "dvc", "repro")          # whatever earlier tests left: an up-to-date workspace
    out = sh(project, "dvc", "exp", "run", "-S",
             "+models.more={recipe: source_only, from: warmup, overrides: {train: {iters: 2}}}")
    assert "Running stage 'train@more'" in out and "Running stage 'train@warmup'" not in out
    assert "Running stage 'evaluate@warmup-" not in out and "Running stage 'evaluate@more-synth_cityscapes'" in out
    meta = json.loads((project / "data/models/more/meta.json").read_text())
    assert meta["from"] == "warmup" and meta["params"]["train"]["iters"] == 2
    assert meta["model"] == json.loads((project / "data/models/warmup/meta.json").read_text())["model"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train@more"]
    assert "data/models/warmup" in [d["path"] for d in lock["deps"]]
    assert "lib/methods/source_only.py" in [d["path"] for d in lock["deps"]]
    assert set(lock["params"]["params.yaml"]) == {"models.more", "recipes.source_only", "source", "target"}
    status = sh(project, "dvc", "status", "train@more")
    assert "up to date" in status or "Data and pipelines are up to date" in status
    restore(project)


def test_bad_param_is_one_clear_line(project):
    edit_params(project, lambda params: params["models"]["warmup"].update(recipe="nope"))
    res = subprocess.run([sys.executable, "-m", "stages.train", "warmup"], cwd=project, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(
        "error: params: models.warmup.recipe 'nope' is not a key of `recipes`")
    sh(project, "git", "checkout", "params.yaml")


def test_a_params_typo_costs_no_output_and_the_fix_retrains_nothing(project):
    """DVC removes a stage's outputs just before it runs it: the check stage, upstream of every stage,
    stops `dvc repro` at the typo before anything is removed.  A model deleted by hand comes back
    from DVC's run cache (the training outputs keep it working), not from a retraining."""
    sh(project, "dvc", "repro")
    trained = lock_hash(project, "train@warmup", "data/models/warmup")
    edit_params(project, lambda params: params["recipes"]["source_only"]["data"].update(crops=[8, 16]))
    res = subprocess.run(["dvc", "repro"], cwd=project, env=ENV, capture_output=True, text=True)
    assert res.returncode != 0
    assert "error: params: unknown key 'recipes.source_only.data.crops'" in res.stderr
    assert "Running stage 'train@warmup'" not in res.stdout
    assert (project / "data/models/warmup/model.pt").is_file()           # nothing was removed
    sh(project, "git", "checkout", "params.yaml")                        # the fix
    out = sh(project, "dvc", "repro")
    assert "Running stage 'train@warmup'" not in out
    assert lock_hash(project, "train@warmup", "data/models/warmup") == trained
    shutil.rmtree(project / "data/models/warmup")
    out = sh(project, "dvc", "repro")
    assert "Stage 'train@warmup' is cached - skipping run" in out and "Running stage 'train@warmup'" not in out
    assert lock_hash(project, "train@warmup", "data/models/warmup") == trained
    assert "up to date" in sh(project, "dvc", "status")


def lock_hash(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def sigkill_while_training(project: Path, dvc_args: tuple[str, ...], checkpoint: Path, seed: str) -> None:
    """Run ``dvc <dvc_args>`` in its own process group and SIGKILL the whole group (DVC and the stage)
    at a random moment, seeded by ``seed``, in the second after ``checkpoint`` first appears."""
    proc = subprocess.Popen(["dvc", *dvc_args], cwd=project, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.is_file() and proc.poll() is None, "training ended before a checkpoint appeared"
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    assert proc.poll() is None, "training ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_warmup_resumes_to_the_same_model(project):
    """SIGKILL the whole `dvc repro` mid-training; the next repro resumes and ends bit-identical.
    tests/test_faults.py does the same to the other training stages."""
    edit_params(project, lambda params: params["recipes"]["source_only"]["train"].update(
        iters=40, checkpoint_every=4, seed=7))
    sigkill_while_training(project, ("repro", "train@warmup"), project / "data/checkpoints/warmup/last.pt", "warmup")
    assert not (project / "data/models/warmup").exists()     # no output that looks finished

    out = sh(project, "dvc", "repro")
    assert "resuming from data/checkpoints/warmup/last.pt at iteration" in out
    resumed = lock_hash(project, "train@warmup", "data/models/warmup")
    resumed_metrics = metrics_of(project)

    sh(project, "dvc", "repro", "-f", "-s", "train@warmup")      # uninterrupted, from scratch
    assert lock_hash(project, "train@warmup", "data/models/warmup") == resumed
    assert "up to date" in sh(project, "dvc", "status")   # so no evaluation needs re-running
    assert metrics_of(project) == resumed_metrics
