"""The resumable state of a training run, ``data/checkpoints/<model>/last.pt``, and the hand-over
of its finished model.

The state holds every module, optimizer and scheduler a method trains, the iteration reached, every
process's global RNG state and the fingerprint of the configuration that wrote it.  A run resumes
only from a checkpoint with its own fingerprint; any other is set aside and training starts from
scratch.  ``publish_model`` writes the model artifact and retires the state.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.data.prepared import PREPARED_ROOT
from lib.errors import UserError
from lib.io import atomic_dir, write_json_atomic
from lib.models.artifact import save_model
from lib.models.files import load_checked, save_atomic
from lib.table import BEST
from lib.train import distributed

STATE_FILE = "last.pt"
CURVES = "curves"            # the run's DVCLive curves, published with the model
SET_ASIDE = "set_aside"      # a checkpoint of another configuration
LOCK = ".lock"
CHECKPOINT_FORMAT = 1
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TrainingDiverged(UserError):
    """A loss or the weights became NaN or infinite; the last good checkpoint is kept."""


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode for a measurement; afterwards every submodule is back in the mode it
    was in (a frozen BatchNorm stays in eval mode)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


def rng_state() -> dict:
    """Every global generator a training step may touch (dropout, library code)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(path: Path, fingerprint: str, done: int, modules, optimizers, schedulers, stateful=None) -> None:
    """Rank 0 writes; every rank hands it its RNG state (``rng`` is rank 0's, ``rng_ranks`` the others').
    ``stateful``: other objects with a ``state_dict`` the run resumes (the checkpoint selection)."""
    states = distributed.gather_to_main(rng_state())
    if not distributed.is_main():
        return
    save_atomic({
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "iteration": done,
        "modules": {n: m.state_dict() for n, m in modules.items()},
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
        "stateful": {n: s.state_dict() for n, s in (stateful or {}).items()},
        "rng": states[0],
        "rng_ranks": states[1:],
        "world_size": len(states),
    }, path)


def resume(path: Path, fingerprint: str, modules, optimizers, schedulers, stateful=None) -> int:
    """Load the checkpoint if it belongs to this configuration; return the iteration to start at.

    A checkpoint of another configuration is set aside, not deleted (``set_aside/<its fingerprint>.pt``,
    the latest one only), so going back to that configuration resumes it; a set-aside checkpoint of
    this configuration is taken back.  Every rank reads the same file.  Rank r > 0 takes its own RNG
    state if the checkpoint has one (it was written by at least r + 1 processes), else it keeps its
    fresh per-rank seed."""
    kept = path.parent / SET_ASIDE / f"{fingerprint[:16]}.pt"
    if not path.is_file() and not kept.is_file():
        return 0
    if path.is_file():
        state = load_checked(path, "training checkpoint")
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
            distributed.barrier()   # every rank has read it before it moves
            if distributed.is_main():
                set_aside(path, str(state.get("fingerprint")), keep=kept)
            distributed.barrier()
            print(f"note: {path} was written by another configuration (params, inputs or code); set aside in "
                  f"{path.parent / SET_ASIDE}, and "
                  + ("this configuration's own is taken back" if kept.is_file() else "training starts from scratch"))
            if not kept.is_file():
                return 0
    if not path.is_file():
        state = load_checked(kept, "training checkpoint")
        distributed.barrier()
        if distributed.is_main():
            kept.replace(path)
        distributed.barrier()
    for kind, targets in (("modules", modules), ("optimizers", optimizers), ("schedulers", schedulers),
                          ("stateful", stateful or {})):
        if set(state.get(kind, {})) != set(targets):
            raise UserError(f"{path}: holds {kind} {sorted(state.get(kind, {}))}, this method has {sorted(targets)}")
        for name, target in targets.items():
            target.load_state_dict(state[kind][name])
    rank, others = distributed.rank(), state.get("rng_ranks", [])
    if rank == 0 or rank <= len(others):
        set_rng_state(state["rng"] if rank == 0 else others[rank - 1])
    print(f"resuming from {path} at iteration {state['iteration']} "
          f"(written by {state.get('world_size', 1)} process(es), resumed by {distributed.world_size()})")
    return int(state["iteration"])


def set_aside(path: Path, its_fingerprint: str, keep: Path) -> None:
    """Move the checkpoint ``path`` to ``set_aside/<fingerprint>.pt``; of the others set aside before,
    only ``keep`` (the one about to be taken back) stays."""
    folder = path.parent / SET_ASIDE
    for old in folder.glob("*.pt"):
        if old != keep:
            old.unlink()
    folder.mkdir(exist_ok=True)
    path.replace(folder / f"{its_fingerprint[:16]}.pt")


# Keys that change how a run is launched or reported, never the weights it ends with.
NOT_TRAINING = {"train": ("processes", "backend", "checkpoint_every", "log_every"), "data": ("workers",),
                "target_data": ("workers",), "select": ("workers", "batch_size")}


def training_identity(raw: dict, data, train) -> dict:
    """``raw`` as a checkpoint's fingerprint sees it: without the keys that do not change the weights
    (loader workers, checkpoint and log periods, the launch keys processes and backend, the selection's
    loader and batch), and with the global batch (processes x per-process batch) in place of each
    per-process one.  A run can so be resumed with other loader workers or by another number of
    processes with the same global batch; a run whose global batch changed is another configuration."""
    out = {k: ({kk: vv for kk, vv in v.items() if kk not in NOT_TRAINING.get(k, ())} if isinstance(v, dict) else v)
           for k, v in raw.items()}
    out["data"] = dict(out.get("data") or {}, batch_size=data.batch_size * train.processes)
    if isinstance(raw.get("target_data"), dict) and "batch_size" in raw["target_data"]:
        out["target_data"] = dict(out["target_data"], batch_size=raw["target_data"]["batch_size"] * train.processes)
    return out


def code_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 of the project's modules loaded in this process (lib/ and stages/): the code a run
    trains with.  A checkpoint written by other code is another configuration, as in dvc.lock."""
    digest = hashlib.sha256()
    files = sorted({Path(m.__file__).resolve() for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(root)
                    and Path(m.__file__).resolve().relative_to(root).parts[0] in ("lib", "stages")})
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(raw_params: Any, datasets: list[str], files: list[Path] = ()) -> str:
    """Identity of a training configuration: its params, the prepared data, the input artifacts
    (start, teacher, pseudo-labels) it reads and the code it runs (:func:`code_digest`)."""
    digest = hashlib.sha256(json.dumps(raw_params, sort_keys=True, default=str).encode())
    digest.update(code_digest().encode())
    for name in datasets:
        for part in ("meta.json", "index.csv", "class_counts.csv", "centroids.csv"):
            digest.update((PREPARED_ROOT / name / part).read_bytes())
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_finite(modules: dict, path: Path, iteration: int) -> None:
    """Every parameter and floating buffer is finite: a diverged update is never checkpointed or published."""
    for name, module in modules.items():
        for key, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                kept = f"the last good checkpoint is kept in {path}" if path.is_file() else "no checkpoint had been written yet"
                raise TrainingDiverged(f"iteration {iteration}: {name}.{key} holds non-finite values after the update; "
                                       f"training stopped and {kept} (lower the learning rate or check the data)")


def publish_model(out: Path, model, meta: dict, checkpoint_dir: Path, iters: int, curves: Path | None = None,
                  best: tuple[dict, dict] | None = None) -> None:
    """Write the model artifact ``out`` atomically (with ``best`` = (weights, meta), the selected
    checkpoint, in ``out/best``) and its training curves to ``curves`` (the run keeps them in
    ``checkpoint_dir/curves`` until it ends), then retire the resumable state.  Only the model
    is a cached output and the curves are plots, so DVC's run cache keeps every finished training:
    a model deleted by hand, or a configuration run again, is restored instead of retrained."""
    with atomic_dir(out) as tmp:
        save_model(tmp, model, meta)
        if best is not None:
            (tmp / BEST).mkdir()
            save_model(tmp / BEST, model, best[1], state=best[0])
    if curves is not None:       # the curves (DVCLive's plots/), not its summary of the last values
        with atomic_dir(curves) as tmp:
            shutil.copytree(checkpoint_dir / CURVES / "plots", tmp / "plots")
    # The resumable state only serves an interrupted run; left behind, it would let a re-run after
    # a code change "resume" at the last iteration and skip training.  A small note replaces it.
    (checkpoint_dir / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir / CURVES, ignore_errors=True)
    shutil.rmtree(checkpoint_dir / SET_ASIDE, ignore_errors=True)
    write_json_atomic(checkpoint_dir / "finished.json",
                      {"iterations": iters, "note": "training finished; the model is in " + str(out)})


@contextlib.contextmanager
def training_lock(checkpoint_dir: Path, name: str):
    """One training per checkpoint folder at a time: a second one is a one-line error, not two runs
    writing the same checkpoint."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{checkpoint_dir}: {name} is already being trained ({holder}); wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            (checkpoint_dir / LOCK).unlink(missing_ok=True)     # a finished or failed run leaves no lock behind
            fcntl.flock(handle, fcntl.LOCK_UN)
