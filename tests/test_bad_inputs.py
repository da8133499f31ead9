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


def drop_iend(path: Path) -> None:
    """A PNG cut just before its IEND chunk: PIL decodes it, OpenCV does not."""
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"IEND") - 4])


def duplicate_dataset_key(project: Path) -> None:
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("datasets:\n", "datasets:\n  gta: {layout: gta5, root: raw/gta5}\n", 1))


def every_label_resized(project: Path) -> None:
    for label in sorted((project / "raw/gta5/labels").glob("*.png")):
        label_with(7, 5, 7)(label)
    params(**{"prepare.size_mismatch": "skip"})(project)


def random_bytes(path: Path) -> None:
    path.unlink()       # a new file: the base project's copy is hard-linked
    path.write_bytes(np.random.default_rng(0).bytes(512))


def foreign_model_meta(project: Path) -> None:
    path = project / "data/models/warmup/model.pt"
    payload = torch.load(path, weights_only=True)
    path.unlink()       # a new file: the base project's copy is hard-linked
    torch.save({"state_dict": payload["state_dict"], "meta": {"kind": "model", "made_by": "another tool"}}, path)


def diverged_model(project: Path) -> None:
    path = project / "data/models/warmup/model.pt"
    payload = torch.load(path, weights_only=True)
    path.unlink()
    payload["state_dict"] = {k: torch.full_like(v, float("inf")) if v.is_floating_point() else v
                             for k, v in payload["state_dict"].items()}
    torch.save(payload, path)


def curves_folder_is_a_file(project: Path) -> None:
    (project / "data/checkpoints/warmup").mkdir(parents=True, exist_ok=True)
    (project / "data/checkpoints/warmup/curves").write_text("a file where the curves folder must be\n")


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
TRAINING = ("data/checkpoints/warmup",)     # the resumable state and the run's own curves
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
                 r"version is left as it was", may_write=TRAINING),
    Case("unwritable_output_folder", WARMUP, models_folder_is_a_file,
         r"error: data/models/warmup: could not be written \(data/models is a file, not a folder\); any earlier "
         r"version is left as it was"),      # found before training, not after it
    Case("png_without_its_end", PREPARE, rewrite("raw/gta5/images/00002.png", drop_iend),
         r"error: raw/gta5/images/00002\.png: corrupt image \(OpenCV, the decoder training reads it with, cannot "
         r"decode it\)"),
    Case("duplicate_param_key", PREPARE, duplicate_dataset_key,
         r"error: params\.yaml: not valid YAML \(line \d+: duplicate key 'gta' \(first on line \d+\); expected "
         r"every key once\)"),
    Case("tilde_in_dataset_root", PREPARE, params(**{"datasets.gta.root": "~/gta5"}),
         r"error: params: datasets\.gta\.root = '~/gta5': '~' is not expanded \(DVC takes the root as the stage's "
         r"dependency literally\); write the full path"),
    Case("every_frame_skipped", PREPARE, every_label_resized,
         r"error: raw/gta5: every one of the 6 frames was skipped \(prepare\.size_mismatch: skip; first: "
         r"raw/gta5/labels/00001\.png: label size 7x5 differs .*\); expected labels of their images' size"),
    Case("nan_learning_rate", WARMUP, params(**{"recipes.source_only.optim.model.lr": float("nan")}),
         r"error: params: recipes\.source_only\.optim\.model\.lr must be a finite number, got nan"),
    Case("negative_seed", WARMUP, params(**{"recipes.source_only.train.seed": -1}),
         r"error: params: recipes\.source_only\.train\.seed must be >= 0, got -1"),
    Case("mistake_inside_an_optional_block", WARMUP, params(**{"recipes.source_only.target_data": {"crop": [0, 16]}}),
         r"error: params: recipes\.source_only\.target_data\.crop must be two positive numbers, got \[0, 16\]"),
    Case("mistake_in_a_row_override", WARMUP,
         params(**{"models.warmup.overrides": {"data": {"crops": [8, 16]}}}),
         r"error: params: unknown key 'models\.warmup\.overrides\.data\.crops' \(known keys: .*crop,.*\)"),
    Case("model_with_foreign_metadata", EVALUATE, foreign_model_meta,
         r"error: data/models/warmup/model\.pt: its meta does not describe a model of this pipeline \(missing or bad "
         r"'model'\)"),
    Case("random_bytes_as_a_model", EVALUATE, rewrite("data/models/warmup/model.pt", random_bytes),
         r"error: data/models/warmup/model\.pt: not a readable model checkpoint \(not a PyTorch file: expected one "
         r"written by torch\.save\)"),
    Case("diverged_last_update", WARMUP,
         params(**{"recipes.source_only.optim.model": {"type": "sgd", "lr": 1e300}, "recipes.source_only.train.iters": 1}),
         r"error: iteration 0: model\.\S+ holds non-finite values after the update; training stopped and no "
         r"checkpoint had been written yet \(lower the learning rate or check the data\)", may_write=TRAINING),
    Case("diverged_model_evaluated", EVALUATE, diverged_model,
         r"error: data/models/warmup: its prediction is not finite on a batch starting with sample \S+ \(a diverged "
         r"model: nothing is scored\)"),
    Case("curves_folder_blocked", WARMUP, curves_folder_is_a_file,
         r"error: data/checkpoints/warmup/curves: could not be written \(.*\); any earlier version is left as it was",
         may_write=TRAINING),
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
