"""Checkpoints: the resumable training state and the model artifact a stage hands downstream.

Both are plain dicts of tensors, numbers and strings, written to a temporary file and renamed,
and read back with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling (a
pickled object smuggled into a checkpoint) is refused with a clear error instead of executed.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.config import parse
from lib.data.classes import CLASS_SETS
from lib.errors import DataError
from lib.io import output_error, remove_stale_temporaries, temporary_sibling, write_json_atomic
from lib.models import ModelParams, build_model

MODEL_FILE = "model.pt"
STATE_FILE = "last.pt"


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary sibling renamed over ``path``; a failed write (disk full, a file
    where the folder should be) is a one-line OutputError and leaves ``path`` as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)     # a SIGKILLed run's half-written copy
        # through a Python file object: torch's own file writer hides the OS error behind a RuntimeError
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        raise output_error(path, cause) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load_checked(path: str | os.PathLike, what: str) -> dict:
    """``torch.load`` with weights_only=True; every failure is a one-line DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it contains pickled Python objects, which are refused (weights_only=True)"
        raise DataError(f"{path}: not a readable {what} ({first})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a {what} (expected a dict, found {type(obj).__name__})")
    return obj


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


def save_model(directory: Path, model, meta: dict) -> None:
    """``model.pt`` (state_dict + meta) and a human-readable ``meta.json`` beside it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"state_dict": state, "meta": meta}, directory / MODEL_FILE)
    write_json_atomic(directory / "meta.json", meta)


def load_model(directory: str | Path, device="cpu"):
    """(model in eval mode on ``device``, meta) from a model artifact written by ``save_model``."""
    path = Path(directory) / MODEL_FILE
    payload = load_checked(path, "model checkpoint")
    if "state_dict" not in payload or "meta" not in payload:
        raise DataError(f"{path}: not a model artifact of this pipeline (expected keys state_dict, meta)")
    meta = payload["meta"]
    model_params = parse(ModelParams, dict(meta["model"], weights="none"), f"{path}:model")
    if meta["class_set"] not in CLASS_SETS:
        raise DataError(f"{path}: unknown class set {meta['class_set']!r}")
    model = build_model(model_params, meta["num_classes"])
    load_weights(model, payload["state_dict"], path, f"a {model_params.arch}-{model_params.depth}")
    return model.to(device).eval(), meta


def load_weights(module: nn.Module, state_dict: dict, path: Path, described_as: str) -> None:
    """Strict ``load_state_dict``; a mismatch is a DataError naming the file, what it should fit and
    the first differing tensor of each kind (torch's own message spans many lines)."""
    own = {k: list(v.shape) for k, v in module.state_dict().items()}
    given = {k: list(getattr(v, "shape", [])) for k, v in state_dict.items()}
    missing, unexpected = [k for k in own if k not in given], [k for k in given if k not in own]
    resized = [k for k in own if k in given and own[k] != given[k]]
    found = []
    if missing:
        found.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if resized:
        found.append(f"{len(resized)} of another shape, e.g. {resized[0]} {given[resized[0]]} "
                     f"instead of {own[resized[0]]}")
    if found:
        raise DataError(f"{path}: weights do not fit {described_as} (tensors: {'; '.join(found)})")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit {described_as} ({str(err).splitlines()[0]})") from None
