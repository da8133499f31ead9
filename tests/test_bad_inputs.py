"""Bad input at the command line: the real stage entry point stops with one line naming the file or
key and what was expected (exit code 2), leaves no output that looks finished and loses nothing
that was there before.

One row per bad input; README "Bad input" cites the row ids.  Each row runs ``python -m stages.<x>``
in its own copy of a tiny project: raw GTA5 (6 frames) and Cityscapes (3) prepared as ``gta`` and
``cs``, a 2-iteration warm-up in data/models/warmup, evaluated on ``cs``.  The rows' subprocesses
run a few at a time, the first time any row asks for its outcome (a stage starts in ~5 s, mostly
imports).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lib.errors import exit_on_user_error
from tests import layouts as L

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
PARALLEL = 3
# Runs the rest of argv with writes limited to argv[1] bytes: a write past it fails with EFBIG,
# as a full disk fails with ENOSPC (SIGXFSZ, which would kill the process instead, is ignored).
FILE_SIZE_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                     "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
                     "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
PARAMS = {
    "prepare": {"workers": 1, "centroid_tile": 1024},
    "datasets": {"gta": {"layout": "gta5", "root": "raw/gta5"},
                 "cs": {"layout": "cityscapes", "root": "raw/cs", "splits": ["train"]}},
    "source": "gta", "target": "cs",
    "recipes": {"source_only": {
        "model": {"arch": "deeplabv2", "depth": 18, "bn": "batch", "aux": True},
        "data": {"batch_size": 2, "crop": [8, 16], "workers": 0},
        "optim": {"model": {"type": "adamw", "lr": 0.001}},
        "train": {"iters": 2, "checkpoint_every": 1, "log_every": 1, "precision": "fp32"}}},
    "models": {"warmup": {"recipe": "source_only", "from": "scratch"}},
    "evaluate": {"models": {"warmup": {}}, "targets": ["cs"], "split": "train", "batch_size": 2, "workers": 0,
                 "panels": 1},
}


# ---------------------------------------------------------------------------------------------- mutations

def params(**changes) -> Callable[[Path], None]:
    """Set dotted keys of the project's params.yaml, e.g. ``params(**{"recipes.source_only.train.iters": -5})``."""
    def mutate(project: Path) -> None:
        data = yaml.safe_load((project / "params.yaml").read_text())
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[key] = value
        (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return mutate


def empty_root(project: Path) -> None:
    (project / "raw/empty").mkdir()
    params(**{"datasets.gta.root": "raw/empty"})(project)


def rewrite(relative: str, write: Callable[[Path], object]) -> Callable[[Path], None]:
    return lambda project: write(project / relative)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def label_with(value: int, h: int = L.H, w: int = L.W) -> Callable[[Path], object]:
    ids = np.full((h, w), 7, np.uint8)
    ids[0, 0] = value
    return lambda path: L.save_palette(path, ids)


def remove(relative: str) -> Callable[[Path], None]:
    return lambda project: (project / relative).unlink()


def index_row_outside(project: Path) -> None:
    """Row 2 of gta's index points at a readable image outside the project."""
    shutil.copy(project / "raw/gta5/images/00002.png", project.parent / "outside.png")
    index_path = project / "data/prepared/gta/index.csv"
    index = pd.read_csv(index_path, dtype=str, keep_default_na=False)
    index.loc[1, "image"] = "../outside.png"
    index.to_csv(index_path, index=False)


def models_folder_is_a_file(project: Path) -> None:
    shutil.rmtree(project / "data/models")
    (project / "data/models").write_text("a file where the models folder must be\n")


class OpensAFile:
    """Unpickled without weights_only, this would create the file ``pwned``."""

    def __reduce__(self):
        return (open, ("pwned", "w"))


def pickled_payload(project: Path) -> None:
    torch.save({"format": 1, "fingerprint": "x", "iteration": 1, "rng": OpensAFile()},
               project / "data/checkpoints/warmup/last.pt")


# ---------------------------------------------------------------------------------------------- checks

def resumable_state_kept(project: Path) -> None:
    assert (project / "data/checkpoints/warmup/last.pt").is_file()


def payload_not_run(project: Path) -> None:
    assert not (project / "pwned").exists()


@dataclass(frozen=True)
class Case:
    id: str
    stage: tuple[str, ...]                       # python -m <stage...>
    mutate: Callable[[Path], None]
    message: str                                 # regular expression the whole last stderr line matches
    may_write: tuple[str, ...] = ()              # what the failed stage may leave: curves, resumable state
    check: Callable[[Path], None] | None = None
    file_size_limit: int | None = None


PREPARE, WARMUP, EVALUATE = ("stages.prepare", "gta"), ("stages.train", "warmup"), ("stages.evaluate", "warmup", "cs")
GTA5 = r"\(expected the GTA5 layout: images/NNNNN\.png and labels/NNNNN\.png, optional split\.mat\)"
TRAINING = ("data/checkpoints/warmup", "metrics/train/warmup")
CASES = [
    Case("missing_dataset_root", PREPARE, params(**{"datasets.gta.root": "raw/nowhere"}),
         rf"error: raw/nowhere: dataset folder not found {GTA5}"),
    Case("empty_dataset_root", PREPARE, empty_root, rf"error: raw/empty: dataset folder is empty {GTA5}"),
    Case("corrupt_image", PREPARE, rewrite("raw/gta5/images/00002.png", lambda p: p.write_bytes(b"\0" * 100)),
         r"error: raw/gta5/images/00002\.png: unreadable image \(UnidentifiedImageError; expected an image "
         r"file, e\.g\. PNG or JPEG\)"),
    Case("truncated_png", PREPARE, rewrite("raw/gta5/images/00002.png", truncate),
         r"error: raw/gta5/images/00002\.png: corrupt or truncated image \(OSError: image file is truncated.*\)"),
    Case("rgb_label", PREPARE,
         rewrite("raw/gta5/labels/00002.png", lambda p: L.save_rgb(p, np.zeros((L.H, L.W, 3), np.uint8))),
         r"error: raw/gta5/labels/00002\.png: an RGB label where single-channel 8-bit label IDs are expected "
         r"\(Cityscapes label IDs 0\.\.33\)"),
    Case("unknown_label_id", PREPARE, rewrite("raw/gta5/labels/00002.png", label_with(77)),
         r"error: raw/gta5/labels/00002\.png: unknown label ID\(s\) \[77\] \(expected Cityscapes label IDs 0\.\.33\)"),
    Case("label_size_mismatch", PREPARE, rewrite("raw/gta5/labels/00002.png", label_with(7, 5, 7)),
         r"error: raw/gta5/labels/00002\.png: label size 7x5 differs from its image raw/gta5/images/00002\.png "
         r"\(16x12\); set prepare\.size_mismatch: skip to drop such frames"),
    Case("image_without_label", PREPARE, remove("raw/gta5/labels/00002.png"),
         r"error: raw/gta5/images/00002\.png: image without its label \(expected raw/gta5/labels/00002\.png\)"),
    Case("unknown_layout", PREPARE, params(**{"datasets.gta.layout": "kitti"}),
         r"error: params: datasets\.gta\.layout = 'kitti' is not a known layout \(expected one of gta5, .*\)"),
    Case("unknown_method_name", WARMUP, params(**{"models.warmup.recipe": "nope"}),
         r"error: params: models\.warmup\.recipe 'nope' is not a key of `recipes` \(known: source_only\)"),
    Case("recipe_of_no_method", WARMUP, params(**{"models.warmup.recipe": "nope", "recipes.nope": {}}),
         r"error: params: recipe 'nope' names no method: a recipe is named after its method file "
         r"lib/methods/<name>\.py \(known: .*source_only.*\)"),
    Case("unknown_param_key", WARMUP, params(**{"recipes.source_only.data.crops": [8, 16]}),
         r"error: params: unknown key 'recipes\.source_only\.data\.crops' \(known keys: .*crop,.*\)"),
    Case("wrong_param_type", WARMUP, params(**{"recipes.source_only.train.iters": "ten"}),
         r"error: params: recipes\.source_only\.train\.iters must be of type int, got 'ten'"),
    Case("negative_iterations", WARMUP, params(**{"recipes.source_only.train.iters": -5}),
         r"error: params: recipes\.source_only\.train\.iters must be > 0, got -5"),
    Case("unknown_start", WARMUP, params(**{"models.warmup.from": "elsewhere"}),
         r"error: params: models\.warmup\.from 'elsewhere' is neither scratch, a weights entry nor another "
         r"model \(weights: none\)"),
    Case("missing_prepared_dataset", WARMUP, params(**{"source": "nope"}),
         r"error: data/prepared/nope: prepared dataset not found \(is 'nope' under 'datasets'\?\)"),
    Case("index_row_outside_dataset", WARMUP, index_row_outside,
         r"error: data/prepared/gta/index\.csv line 3 \(id 00002\): image \.\./outside\.png is outside the "
         r"dataset \(expected a path under raw/gta5 or data/prepared\)"),
    Case("missing_checkpoint", EVALUATE, remove("data/models/warmup/model.pt"),
         r"error: data/models/warmup/model\.pt: model checkpoint not found"),
    Case("checkpoint_of_another_architecture", ("stages.train", "wide"),
         params(**{"models.wide": {"recipe": "source_only", "from": "warmup",
                                   "overrides": {"model": {"depth": 50}}}}),
         r"error: data/models/warmup/model\.pt: weights do not fit a deeplabv2-50 \(models\.wide: "
         r"recipes\.source_only\.model\) \(tensors: \d+ missing, e\.g\. backbone\.\S+; \d+ of another shape, "
         r"e\.g\. backbone\.\S+ \[.*\] instead of \[.*\]\)"),
    Case("pickled_checkpoint_payload", WARMUP, pickled_payload,
         r"error: data/checkpoints/warmup/last\.pt: not a readable training checkpoint \(it contains pickled "
         r"Python objects, which are refused \(weights_only=True\)\)", check=payload_not_run),
    Case("nan_loss", WARMUP, params(**{"recipes.source_only.optim.model.lr": 1e30, "recipes.source_only.train.iters": 5}),
         r"error: iteration \d: loss '\w+' is (nan|inf|-inf); training stopped before the update and the last "
         r"good checkpoint is kept in data/checkpoints/warmup/last\.pt \(lower the learning rate or check the data\)",
         may_write=TRAINING, check=resumable_state_kept),
    Case("disk_full_during_checkpoint_write", WARMUP, params(), file_size_limit=8_000_000,
         message=r"error: data/checkpoints/warmup/last\.pt: could not be written \(File too large\); any earlier "
                 r"version is left as it was", may_write=("metrics/train/warmup",)),
    Case("unwritable_output_folder", WARMUP, models_folder_is_a_file,
         r"error: data/models/warmup: could not be written \(data/models is a file, not a folder\); any earlier "
         r"version is left as it was"),      # found before training, not after it
]


# ---------------------------------------------------------------------------------------------- running

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny project every row copies: prepared gta and cs, a trained and evaluated warm-up."""
    from stages.evaluate import main as evaluate
    from tests.tables import train
    root = L.prepare_gta_and_cityscapes(tmp_path_factory.mktemp("base"))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    with contextlib.chdir(root):
        train(PARAMS, "warmup")
        evaluate(["warmup", "cs"])
    return root


def snapshot(project: Path) -> dict[str, tuple[int, int, int]]:
    """Every file (and empty folder) with what changes when it is rewritten or replaced."""
    files = {}
    for path in [project, *project.rglob("*")]:
        if path.is_file() or (path.is_dir() and not any(path.iterdir())):
            st = path.stat()
            files[str(path.relative_to(project))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return files


@dataclass
class Outcome:
    project: Path
    result: subprocess.CompletedProcess
    before: dict
    after: dict


def link_or_copy(source: str, dest: str) -> None:
    """Model files are hard-linked (no writer rewrites a file in place: each renames a new one over it)."""
    os.link(source, dest) if source.endswith(".pt") else shutil.copy2(source, dest)


def run_case(case: Case, base: Path, workdir: Path) -> Outcome:
    project = workdir / "project"
    shutil.copytree(base, project, copy_function=link_or_copy)
    case.mutate(project)
    before = snapshot(project)
    command = [sys.executable, "-m", *case.stage]
    if case.file_size_limit is not None:
        command = [sys.executable, "-c", FILE_SIZE_LIMITED, str(case.file_size_limit), *command[1:]]
    result = subprocess.run(command, cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    return Outcome(project, result, before, snapshot(project))


@pytest.fixture(scope="module")
def outcomes(request, base, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected row's outcome, run ``PARALLEL`` at a time."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        runs = {c.id: pool.submit(run_case, c, base, tmp_path_factory.mktemp(c.id)) for c in wanted}
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_no_finished_output(case, outcomes):
    outcome = outcomes[case.id]
    res = outcome.result
    context = f"stdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-3000:]}"
    assert res.returncode == 2, context
    assert "Traceback" not in res.stderr, context
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], context
    assert re.fullmatch(case.message, lines[-1]), f"{lines[-1]!r} does not match {case.message!r}"

    def may_write(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in case.may_write)

    changed = [rel for rel, key in outcome.before.items() if outcome.after.get(rel) != key and not may_write(rel)]
    assert not changed, f"an earlier file was lost or rewritten: {sorted(changed)}"
    new = [rel for rel in set(outcome.after) - set(outcome.before) if not may_write(rel)]
    assert not new, f"the failed stage left outputs: {sorted(new)}"
    leftovers = [rel for rel in outcome.after if ".tmp-" in rel or ".old-" in rel]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if case.check is not None:
        case.check(outcome.project)


def test_enough_distinct_bad_inputs():
    assert len({c.id for c in CASES}) == len(CASES) >= 15


def test_a_full_disk_anywhere_else_is_one_line_too(capsys):
    """Writes outside lib.io's atomic writers (DVCLive's curves) meet a full disk through the entry
    point's decorator; other OS errors keep their traceback."""
    @exit_on_user_error
    def stage(error: OSError) -> None:
        raise error

    with pytest.raises(SystemExit) as exit_:
        stage(OSError(errno.ENOSPC, "No space left on device", "metrics/train/warmup/metrics.json"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: metrics/train/warmup/metrics.json: could not be written "
                                      "(No space left on device)\n")
    with pytest.raises(FileNotFoundError):
        stage(FileNotFoundError(errno.ENOENT, "No such file or directory", "x"))
