"""Provenance: what a result was made with, written beside it.

A training stage keeps ``collect(...)`` in its model artifact's meta (``meta["provenance"]``); an
evaluation writes its own beside its metrics together with the evaluated models' training
provenance (``metrics/<model>/<target>/provenance.json``).  Every value is a plain JSON value, so the
dict also survives ``torch.load(weights_only=True)`` inside a checkpoint.

The git revision is ``HEAD`` of the project.  Under ``dvc exp run`` HEAD is the experiment's
*baseline* commit, not the experiment: the params an experiment changed are recorded by DVC
(``dvc exp show``), and in the workspace they show up as ``params.yaml`` in ``git.changed``
(a queued experiment runs in a temporary copy where they do not).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from lib.device import effective as effective_precision
from lib.device import select_device

LIBRARIES = ("torch", "torchvision", "numpy", "dvc", "dvclive", "cityscapesscripts")
# Files every pipeline run rewrites itself (the lock and the cache: false metrics and plots): their
# changes say nothing about the code or params that ran, so they do not make the work tree dirty.
PIPELINE_RECORDS = ("dvc.lock", "metrics")


def library_versions() -> dict[str, str | None]:
    """Python, the libraries a result depends on (None when not installed), CUDA and cuDNN."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["cudnn"] = None if cudnn is None else str(cudnn)
    return versions


def cpu_name() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_info(device: torch.device | str) -> dict:
    """``{"type", "name", "count"}``: the device a process computes on; count = devices of that type."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": device.type, "name": cpu_name(), "count": os.cpu_count()}


def world_size() -> int:
    """Processes of the run: the process group's size (torch.distributed), else torchrun's
    WORLD_SIZE (a process of a torchrun job that has not joined the group), else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def determinism() -> dict:
    """The switches that decide whether a rerun is bit-identical, as they stand in this process."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "torch_threads": torch.get_num_threads(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def git_revision(root: str | os.PathLike = ".") -> dict | None:
    """``{"revision": HEAD, "dirty": bool, "changed": [paths]}`` of the git work tree at ``root``.

    ``changed`` lists modified and untracked (not ignored) paths, less the pipeline's own records
    (PIPELINE_RECORDS).  None when ``root`` is not in a git work tree or git is not installed.
    """
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # never take index.lock
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout if res.returncode == 0 else None

    revision = git("rev-parse", "--verify", "HEAD")
    status = git("status", "--porcelain=v1", "-z", "--", ".",
                 *(f":(exclude){path}" for path in PIPELINE_RECORDS))
    if revision is None or status is None:
        return None
    changed = []
    entries = iter(status.split("\0"))
    for entry in entries:
        if not entry:
            continue
        changed.append(entry[3:])
        if entry[0] in "RC":     # a rename or copy is followed by its source path
            next(entries, None)
    return {"revision": revision.strip(), "dirty": bool(changed), "changed": sorted(changed)}


def collect(device: torch.device | str, precision: str, seed: int | None = None,
            world: int | None = None, root: str | os.PathLike = ".", with_git: bool = True) -> dict:
    """The provenance of a run in this process: versions, device, world size, precision, determinism
    flags, seed and (``with_git``) the git revision.  ``world`` overrides the detected world size."""
    made_with = {
        "versions": library_versions(),
        "device": device_info(device),
        "world_size": world_size() if world is None else int(world),
        "precision": precision,
        "determinism": determinism(),
        "seed": seed,
    }
    if with_git:
        made_with["git"] = git_revision(root)
    return made_with


def training(precision: str, seed: int, world: int | None = None) -> dict:
    """The provenance of a training stage in this process (its model artifact's ``meta["provenance"]``).

    Without the git revision: the artifact's bytes must depend on what it was trained from and on,
    not on unrelated commits, so that a stage re-run that reproduces the same weights (after an
    edit elsewhere in a dependency) leaves an identical file and DVC skips everything downstream.
    The code a model was trained with is pinned by the hashes of its stage's dependencies in
    ``dvc.lock``; the revision of the run is in every evaluation's provenance."""
    device = select_device()
    return collect(device, effective_precision(precision, device), seed=seed, world=world,
                   with_git=False)
