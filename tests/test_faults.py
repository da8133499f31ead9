"""SIGKILL at a random point of each training stage of the chain: the next `dvc repro` resumes from the
last checkpoint and ends with the model (bit for bit) and every metric and curve of an uninterrupted run.

The warm-up's case is tests/test_pipeline.py::test_killed_warmup_resumes_to_the_same_model; here CPSL's
stage 1, a distillation round and the CycleGAN are killed.  One tiny project (real DVC, a
temporary git repository, CPU, fixed seeds, one torch thread per process) is run once uninterrupted;
each test then forces its stage to run again, kills it, and lets `dvc repro` finish it.
"""
from __future__ import annotations

import json

import pytest
from ruamel.yaml import YAML

from tests.test_pipeline import ROOT, lock_hash, make_project, sh, sigkill_while_training, tiny_params

CYCLEGAN = "synth_gta5_cyclegan"
# dvc stage -> (the name of its model and checkpoint folders, its metrics folder)
STAGES = {"selftrain@stage1": ("stage1", "metrics/train/stage1"), "selftrain@kd1": ("kd1", "metrics/train/kd1"),
          f"cyclegan_train@{CYCLEGAN}": (f"cyclegan_{CYCLEGAN}", f"metrics/cyclegan_{CYCLEGAN}")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The chain up to KD-1 and a CycleGAN, trained uninterrupted: 8 iterations each, a checkpoint
    every 2 (the curves are logged at the same steps)."""
    params = tiny_params(chain=True)
    params["source"] = "synth_gta5"          # no stylized copy to make
    params["blocks"]["chain_train"].update(iters=8, checkpoint_every=2, log_every=2, seed=3)
    params["cyclegan"] = json.loads(json.dumps(YAML().load((ROOT / "presets/synthetic_cyclegan.yaml").read_text())["cyclegan"]))
    cyclegan = params["cyclegan"]
    cyclegan["data"].update(scale_width=64, crop=[32, 32], workers=0)
    cyclegan["train"].update(iters=8, checkpoint_every=2, log_every=2)
    cyclegan["schedule"]["constant_iters"] = 4
    project = make_project(tmp_path_factory.mktemp("faults"), params)
    sh(project, "dvc", "repro", "selftrain@kd1", f"cyclegan_train@{CYCLEGAN}")
    return project


def recorded(project, folder: str) -> dict[str, object]:
    """Everything the stage wrote under its metrics folder (summaries, curves, sample images), less
    its throughput, which is wall-clock."""
    files = {}
    for path in sorted((project / folder).rglob("*")):
        rel = str(path.relative_to(project))
        if not path.is_file() or path.stem == "images_per_s":
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.get("train", {}).pop("images_per_s", None)
            files[rel] = data
        else:
            files[rel] = path.read_bytes()
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_resumes_to_the_uninterrupted_result(chain, stage):
    name, folder = STAGES[stage]
    model, checkpoints = f"data/models/{name}", chain / "data/checkpoints" / name
    uninterrupted = lock_hash(chain, stage, model), recorded(chain, folder)
    assert uninterrupted[1], f"{folder} is empty"

    sigkill_while_training(chain, ("repro", "-f", "-s", stage), checkpoint=checkpoints / "last.pt", seed=stage)
    assert not (chain / model).exists()                  # no output that looks finished

    # DVC would check the unchanged stage's model out of its cache (as it should for a user): forget
    # the cached copy and the run cache so that the stage really runs, and resumes
    digest = uninterrupted[0]
    (chain / ".dvc/cache/files/md5" / digest[:2] / digest[2:]).unlink()
    out = sh(chain, "dvc", "repro", "--no-run-cache", stage)
    assert f"resuming from data/checkpoints/{name}/last.pt at iteration" in out
    assert lock_hash(chain, stage, model) == uninterrupted[0]
    assert recorded(chain, folder) == uninterrupted[1]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["finished.json"]   # no stale state or temporaries
