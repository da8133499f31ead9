"""The resumable state of a training run, ``data/checkpoints/<model>/last.pt``, and the hand-over
of its finished model.

The state holds every module, optimizer and scheduler a method trains, the iteration reached, every
process's global RNG state and the fingerprint of the configuration that wrote it.  A run resumes
only from a checkpoint with its own fingerprint; any other is set aside and training starts from
scratch.  ``publish_model`` writes the model artifact and retires the state.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.data.prepared import PREPARED_ROOT
from lib.errors import UserError
from lib.io import atomic_dir, write_json_atomic
from lib.models.artifact import save_model
from lib.models.files import load_checked, save_atomic
from lib.train import distributed

STATE_FILE = "last.pt"
CHECKPOINT_FORMAT = 1


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


def save(path: Path, fingerprint: str, done: int, modules, optimizers, schedulers) -> None:
    """Rank 0 writes; every rank hands it its RNG state (``rng`` is rank 0's, ``rng_ranks`` the others')."""
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
        "rng": states[0],
        "rng_ranks": states[1:],
        "world_size": len(states),
    }, path)


def resume(path: Path, fingerprint: str, modules, optimizers, schedulers) -> int:
    """Load the checkpoint if it belongs to this configuration; return the iteration to start at.

    Every rank reads the same file.  Rank r > 0 takes its own RNG state if the checkpoint has one
    (it was written by at least r + 1 processes), else it keeps its fresh per-rank seed."""
    if not path.is_file():
        return 0
    state = load_checked(path, "training checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        print(f"note: {path} was written by another configuration; training from scratch")
        distributed.barrier()   # every rank has read it before it goes
        if distributed.is_main():
            path.unlink()
        return 0
    for kind, targets in (("modules", modules), ("optimizers", optimizers), ("schedulers", schedulers)):
        if set(state[kind]) != set(targets):
            raise UserError(f"{path}: holds {kind} {sorted(state[kind])}, this method has {sorted(targets)}")
        for name, target in targets.items():
            target.load_state_dict(state[kind][name])
    rank, others = distributed.rank(), state.get("rng_ranks", [])
    if rank == 0 or rank <= len(others):
        set_rng_state(state["rng"] if rank == 0 else others[rank - 1])
    print(f"resuming from {path} at iteration {state['iteration']} "
          f"(written by {state.get('world_size', 1)} process(es), resumed by {distributed.world_size()})")
    return int(state["iteration"])


def across_world_sizes(raw: dict, data, train) -> dict:
    """``raw`` as a checkpoint's fingerprint sees it: without the launch keys (processes, backend)
    and with the global batch (processes x per-process batch) in place of each per-process one.  A
    run can so be resumed by another number of processes with the same global batch; a run whose
    global batch changed is another configuration and trains from scratch."""
    out = dict(raw, train={k: v for k, v in (raw.get("train") or {}).items() if k not in ("processes", "backend")},
               data=dict(raw.get("data") or {}, batch_size=data.batch_size * train.processes))
    if isinstance(raw.get("target_data"), dict) and "batch_size" in raw["target_data"]:
        out["target_data"] = dict(raw["target_data"], batch_size=raw["target_data"]["batch_size"] * train.processes)
    return out


def fingerprint(raw_params: Any, datasets: list[str], files: list[Path] = ()) -> str:
    """Identity of a training configuration: its params, the prepared data and the input artifacts
    (start, teacher, pseudo-labels) it reads."""
    digest = hashlib.sha256(json.dumps(raw_params, sort_keys=True, default=str).encode())
    for name in datasets:
        for part in ("meta.json", "index.csv", "class_counts.csv", "centroids.csv"):
            digest.update((PREPARED_ROOT / name / part).read_bytes())
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def publish_model(out: Path, model, meta: dict, checkpoint_dir: Path, iters: int) -> None:
    """Write the model artifact ``out`` atomically, then retire the resumable state of its training."""
    with atomic_dir(out) as tmp:
        save_model(tmp, model, meta)
    # The resumable state only serves an interrupted run; left behind, it would let a re-run after
    # a code change "resume" at the last iteration and skip training.  A small note replaces it.
    (checkpoint_dir / STATE_FILE).unlink(missing_ok=True)
    write_json_atomic(checkpoint_dir / "finished.json",
                      {"iterations": iters, "note": "training finished; the model is in " + str(out)})
