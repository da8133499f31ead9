"""Provenance: the pure collectors, and an evaluation writing it beside its metrics."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from lib import device, provenance
from lib.infer.metrics import HEADLINE_KEYS
from stages.evaluate import main as evaluate_stage
from tests import layouts as L
from tests.tables import one_row, train

KEYS = {"versions", "device", "world_size", "precision", "determinism", "seed", "git"}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def commit_all(repo: Path) -> str:
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "snapshot")
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(autouse=True)
def no_enclosing_repo(tmp_path, monkeypatch):
    """git never looks above the test's folder, so "not in a git work tree" holds under any checkout."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


def test_library_versions(monkeypatch):
    versions = provenance.library_versions()
    assert set(versions) == {"python", *provenance.LIBRARIES, "cuda", "cudnn"}
    assert versions["python"] == platform.python_version()
    assert torch.__version__.startswith(versions["torch"])
    assert all(isinstance(versions[name], str) for name in ("torch", "torchvision", "numpy", "dvc", "dvclive"))
    monkeypatch.setattr(provenance, "LIBRARIES", ("torch", "surely-not-an-installed-package"))
    assert provenance.library_versions()["surely-not-an-installed-package"] is None


def test_device_and_precision():
    cpu = provenance.device_info("cpu")
    assert cpu["type"] == "cpu" and isinstance(cpu["name"], str) and cpu["name"]
    assert cpu["count"] == os.cpu_count()
    # what a run records is the arithmetic it used (tests/test_precision.py covers the rule)
    assert provenance.effective_precision("fp32", "cpu") == "fp32"
    assert provenance.effective_precision("bf16", "cpu") == ("bf16" if device.cpu_has_native_bf16() else "fp32")


def test_world_size(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert provenance.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")       # torchrun's variable, before the group is up
    assert provenance.world_size() == 4
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    try:
        assert provenance.world_size() == 1    # the initialised group wins over the environment
    finally:
        torch.distributed.destroy_process_group()


def test_determinism_reports_the_switches_as_set():
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        flags = provenance.determinism()
        assert flags["cudnn_benchmark"] is True and flags["deterministic_algorithms"] is True
        assert flags["deterministic_warn_only"] is True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(False)
        flags = provenance.determinism()
        assert flags["cudnn_benchmark"] is False and flags["deterministic_algorithms"] is False
        assert flags["torch_threads"] == torch.get_num_threads()
        assert set(flags) == {"deterministic_algorithms", "deterministic_warn_only", "cudnn_benchmark",
                              "cudnn_deterministic", "torch_threads", "cublas_workspace_config"}
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.use_deterministic_algorithms(deterministic)


def test_git_revision(tmp_path, monkeypatch):
    assert provenance.git_revision(tmp_path) is None                  # not a work tree
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m.json").write_text("{}\n")
    head = commit_all(tmp_path)
    assert provenance.git_revision(tmp_path) == {"revision": head, "dirty": False, "changed": []}
    # the pipeline's own records change on every run and do not count
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (tmp_path / "metrics" / "m.json").write_text('{"mIoU": 1}\n')
    (tmp_path / "metrics" / "new.json").write_text("{}\n")
    assert provenance.git_revision(tmp_path)["dirty"] is False
    (tmp_path / "lib" / "a.py").write_text("x = 2\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert provenance.git_revision(tmp_path) == {"revision": head, "dirty": True,
                                                 "changed": ["lib/a.py", "notes.txt"]}
    git(tmp_path, "mv", "lib/a.py", "lib/b.py")                        # a rename lists the new path
    assert provenance.git_revision(tmp_path)["changed"] == ["lib/b.py", "notes.txt"]
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))    # no git at all: None, no crash
    assert provenance.git_revision(tmp_path) is None


def test_collect_is_plain_data_that_a_checkpoint_keeps(tmp_path):
    made = provenance.collect("cpu", "fp32", seed=3, world=2, root=tmp_path)
    assert set(made) == KEYS
    assert made["seed"] == 3 and made["world_size"] == 2 and made["precision"] == "fp32" and made["git"] is None
    assert json.loads(json.dumps(made)) == made
    torch.save({"meta": made}, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"] == made


# ---------------------------------------------------------------- a training and its evaluation
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Prepared datasets gta (train 6, labelled) and cs under a fresh git repository."""
    return L.prepare_gta_and_cityscapes(tmp_path_factory.mktemp("project"))


def warmup_params(seed: int) -> dict:
    """One row, ``warmup``: a source-only model trained from scratch on gta."""
    return one_row("warmup", "source_only", {
        "model": {"arch": "deeplabv2", "depth": 18, "bn": "batch", "aux": True},
        "data": {"batch_size": 2, "crop": [8, 16], "workers": 0},
        "optim": {"model": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "head_lr_mult": 1.0}},
        "train": {"iters": 2, "seed": seed, "checkpoint_every": 2, "log_every": 1, "precision": "bf16"},
    }, source="gta")


def test_evaluation_writes_provenance_beside_its_metrics(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    head = commit_all(project)
    train(warmup_params(seed=5), "warmup")
    trained = json.loads(Path("data/models/warmup/meta.json").read_text())["provenance"]
    assert set(trained) == KEYS - {"git"} and trained["seed"] == 5 and trained["world_size"] == 1
    assert trained["precision"] == provenance.effective_precision("bf16", "cuda" if torch.cuda.is_available()
                                                                  else "cpu")
    # no revision in the model: the same weights after an unrelated commit must be the same file
    bytes_before = Path("data/models/warmup/model.pt").read_bytes()
    Path("notes.txt").write_text("an unrelated change")
    head = commit_all(project)
    shutil.rmtree("data/checkpoints/warmup")
    train(warmup_params(seed=5), "warmup")
    assert Path("data/models/warmup/model.pt").read_bytes() == bytes_before

    params = warmup_params(seed=5)
    params["evaluate"] = {"models": params["models"], "targets": ["gta"], "split": "train", "batch_size": 2,
                          "workers": 0, "panels": 1}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    evaluate_stage(["warmup", "gta"])
    made = json.loads(Path("metrics/eval/warmup/gta/provenance.json").read_text())
    assert set(made) == {"evaluation", "models"}
    assert set(made["evaluation"]) == KEYS and made["evaluation"]["precision"] == "fp32"
    assert made["evaluation"]["seed"] is None and made["evaluation"]["git"]["revision"] == head
    assert set(made["evaluation"]["versions"]) >= {"python", "torch", "torchvision", "numpy", "dvc", "dvclive"}
    assert made["models"] == {"warmup": trained}
    # the metrics JSON keeps numbers only: `dvc metrics diff` stays free of provenance
    metrics = json.loads(Path("metrics/eval/warmup/gta.json").read_text())
    assert set(metrics) == {*HEADLINE_KEYS, "images"}
