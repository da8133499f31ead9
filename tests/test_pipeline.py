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
    blocks = params["blocks"]
    for name in ("data", "chain_data"):
        blocks[name].update(batch_size=2, crop=[32, 64], workers=0)
    blocks["train"].update(iters=6, checkpoint_every=2, log_every=2)
    blocks["chain_train"].update(iters=4, checkpoint_every=2, log_every=2)
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
    for name, layout in [("synth_gta5", "gta5"), ("synth_cityscapes", "cityscapes"),
                         ("synth_acdc_night", "acdc")]:
        out = project / "data" / "prepared" / name
        meta = json.loads((out / "meta.json").read_text())
        assert meta["layout"] == layout and meta["counts"] == {"train": 4, "val": 2}
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
    out = sh(project, "dvc", "exp", "run", "-S", "datasets.synth_acdc_night.splits=[val]")
    assert "Running stage 'prepare@synth_acdc_night'" in out
    assert "Running stage 'prepare@synth_gta5'" not in out and "Running stage 'stylize" not in out
    assert "Running stage 'synthesize'" not in out


# ----------------------------------------------------------------------------------------------
# training and evaluation stages


def metrics_of(project: Path) -> dict:
    return {t: json.loads((project / "metrics/warmup" / f"{t}.json").read_text()) for t in TARGETS}


def test_repro_trains_and_evaluates(project):
    assert (project / "data/models/warmup/model.pt").is_file()
    meta = json.loads((project / "data/models/warmup/meta.json").read_text())
    assert meta["method"] == "source_only" and meta["num_classes"] == 19
    for target, result in metrics_of(project).items():
        assert set(result) >= {"mIoU", "mAcc", "pixel_acc", "images"}
        assert result["images"] == 2
        classes = pd.read_csv(project / "metrics/warmup" / target / "classes.csv")
        assert len(classes) == 19
        assert (project / "metrics/warmup" / target / "confusion.png").is_file()
        assert len(list((project / "metrics/warmup" / target / "panels").glob("*.png"))) == 1
    curve = pd.read_csv(project / "metrics/warmup/train/plots/metrics/train/loss/seg.tsv", sep="\t")
    assert list(curve["step"]) == [2, 4, 6]
    # the finished run leaves no resumable state behind: a later code change must retrain
    assert [p.name for p in (project / "data/checkpoints/warmup").iterdir()] == ["finished.json"]
    shown = sh(project, "dvc", "metrics", "show")
    assert "metrics/warmup/synth_cityscapes.json" in shown and "mIoU" in shown


def test_evaluate_param_reruns_only_evaluation(project):
    out = sh(project, "dvc", "exp", "run", "-S", "evaluate.inference.flip=true",
             "-S", "+evaluate.averages.unseen=[synth_cityscapes, synth_acdc_night]")
    for target in TARGETS:
        assert f"Running stage 'evaluate@warmup-{target}'" in out
    assert "Running stage 'average@warmup-unseen'" in out
    assert "Running stage 'warmup'" not in out and "Running stage 'prepare" not in out
    average = json.loads((project / "metrics/warmup-unseen.json").read_text())
    unseen = {t: m["mIoU"] for t, m in metrics_of(project).items() if t != "synth_gta5"}
    assert average == {"mIoU": round(sum(unseen.values()) / 2, 2), "targets": unseen}
    diff = sh(project, "dvc", "metrics", "diff", "HEAD", "--all")
    assert "metrics/warmup/synth_cityscapes.json" in diff and "mIoU" in diff
    assert "metrics/warmup-unseen.json" in diff and "targets.synth_acdc_night" in diff
    table = sh(project, "dvc", "exp", "show", "--no-pager", "--md")
    assert "mIoU" in table and "evaluate.inference.flip" in table and "targets.synth_cityscapes" in table


def test_warmup_param_reruns_warmup_and_its_evaluations(project):
    out = sh(project, "dvc", "exp", "run", "-S", "warmup.train.seed=1",
             "-S", "++evaluate.averages.unseen=[synth_cityscapes, synth_acdc_night]")
    assert "Running stage 'warmup'" in out
    assert "Running stage 'evaluate@warmup-synth_gta5'" in out
    assert "Running stage 'average@warmup-unseen'" in out
    assert "Running stage 'prepare" not in out and "Running stage 'synthesize'" not in out


def test_fda_beta_reruns_stylize_and_what_reads_it_only(project):
    sh(project, "dvc", "exp", "run", "-S", "warmup.source=synth_gta5_fda")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "warm-up on the FDA source")
    out = sh(project, "dvc", "exp", "run", "-S", "warmup.source=synth_gta5_fda", "-S", "stylize.fda_beta=0.05")
    assert "Running stage 'stylize@synth_gta5_fda'" in out
    assert "Running stage 'warmup'" in out and "Running stage 'evaluate@warmup-synth_cityscapes'" in out
    assert "Running stage 'prepare" not in out and "Running stage 'synthesize'" not in out
    meta = json.loads((project / "data/prepared/synth_gta5_fda/meta.json").read_text())
    assert "0.05" in json.dumps(meta["stylization"])
    sh(project, "git", "reset", "-q", "--hard", "HEAD~1")
    sh(project, "dvc", "checkout", "-f")


def test_adversarial_warmup_with_an_ensembled_variant(project):
    out = sh(project, "dvc", "exp", "run", "-S", "warmup.method=advent",
             "-S", "+variants.minent={method: minent}", "-S", "evaluate.models=[warmup, minent]",
             "-S", "+evaluate.ensembles.advent_minent={warmup: 0.5, minent: 0.5}")
    assert "Running stage 'variant@minent'" in out
    assert "Running stage 'ensemble@advent_minent-synth_cityscapes'" in out
    assert json.loads((project / "data/models/minent/meta.json").read_text())["method"] == "minent"
    assert json.loads((project / "data/models/warmup/meta.json").read_text())["method"] == "advent"
    curves = project / "metrics/warmup/train/plots/metrics/train/loss"
    assert (curves / "adv_main.tsv").is_file() and (curves / "d_main.tsv").is_file()
    ensemble = json.loads((project / "metrics/advent_minent/synth_cityscapes.json").read_text())
    assert ensemble["images"] == 2 and 0 <= ensemble["mIoU"] <= 100
    sh(project, "git", "checkout", "params.yaml", "dvc.lock")
    sh(project, "dvc", "checkout", "-f")


def test_finetune_trains_on_from_its_init_model(project):
    """finetune@<name>: the warm-up's weights and architecture, trained on with another method; only
    the new run and its evaluations execute, and a new warm-up re-runs it."""
    warmup = project / "data/models/warmup"
    sh(project, "dvc", "repro")          # whatever earlier tests left: an up-to-date workspace
    out = sh(project, "dvc", "exp", "run", "-S", "+finetune.dacs={init: warmup, method: ciss, train: {iters: 2}, "
             "ciss: {source_weight: 0.0, target_weight: 0.0}, source: synth_gta5}",
             "-S", "evaluate.models=[warmup, dacs]")
    assert "Running stage 'finetune@dacs'" in out and "Running stage 'warmup'" not in out
    assert "Running stage 'evaluate@warmup-" not in out and "Running stage 'evaluate@dacs-synth_cityscapes'" in out
    meta = json.loads((project / "data/models/dacs/meta.json").read_text())
    assert meta["method"] == "ciss" and meta["params"]["init"] == "warmup"
    assert meta["model"] == {**json.loads((warmup / "meta.json").read_text())["model"], "weights": "none"}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["finetune@dacs"]
    assert "data/models/warmup" in [d["path"] for d in lock["deps"]]
    status = sh(project, "dvc", "status", "finetune@dacs")
    assert "up to date" in status or "Data and pipelines are up to date" in status
    sh(project, "git", "checkout", "params.yaml", "dvc.lock")
    sh(project, "dvc", "checkout", "-f")


def test_bad_param_is_one_clear_line(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["warmup"]["method"] = "nope"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "stages.warmup"], cwd=project, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: params: method 'nope' does not exist")
    sh(project, "git", "checkout", "params.yaml")


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
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["warmup"]["train"].update(iters=40, checkpoint_every=4, seed=7)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sigkill_while_training(project, ("repro", "warmup"), project / "data/checkpoints/warmup/last.pt", "warmup")
    assert not (project / "data/models/warmup").exists()     # no output that looks finished

    out = sh(project, "dvc", "repro")
    assert "resuming from data/checkpoints/warmup/last.pt at iteration" in out
    resumed = lock_hash(project, "warmup", "data/models/warmup")
    resumed_metrics = metrics_of(project)

    sh(project, "dvc", "repro", "-f", "-s", "warmup")      # uninterrupted, from scratch
    assert lock_hash(project, "warmup", "data/models/warmup") == resumed
    assert "up to date" in sh(project, "dvc", "status")   # so no evaluation needs re-running
    assert metrics_of(project) == resumed_metrics
