"""The resumable state of a training run: ``data/checkpoints/<model>/last.pt``.

Every module, optimizer and scheduler a method trains, the iteration reached, every process's
global RNG state and the fingerprint of the configuration that wrote it.  A run resumes only from
a checkpoint with its own fingerprint; any other is set aside and training starts from scratch.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lib.errors import UserError
from lib.models.artifact import load_checked, save_atomic
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
