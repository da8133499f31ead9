"""Model artifacts: the ``data/models/<name>/`` folder a stage hands downstream, and the checked
torch file I/O every checkpoint of the project goes through.

Files are plain dicts of tensors, numbers and strings, written to a temporary file and renamed,
and read back with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling (a
pickled object smuggled into a checkpoint) is refused with a clear error instead of executed.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from lib.config import parse
from lib.data.classes import CLASS_SETS
from lib.errors import DataError
from lib.io import atomic_dir, output_error, remove_stale_temporaries, temporary_sibling, write_json_atomic
from lib.models import ModelParams, build_model
from lib.models.ensemble import ENSEMBLE_KIND, Ensemble

MODEL_FILE = "model.pt"


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


def save_model(directory: Path, model, meta: dict) -> None:
    """``model.pt`` (state_dict + meta) and a human-readable ``meta.json`` beside it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"state_dict": state, "meta": meta}, directory / MODEL_FILE)
    write_json_atomic(directory / "meta.json", meta)


def load_model(directory: str | Path, device="cpu"):
    """(model in eval mode on ``device``, meta) from a model artifact written by ``save_model``, or
    an ensemble of them (lib.models.ensemble)."""
    path = Path(directory) / MODEL_FILE
    payload = load_checked(path, "model checkpoint")
    if "state_dict" not in payload or "meta" not in payload:
        raise DataError(f"{path}: not a model artifact of this pipeline (expected keys state_dict, meta)")
    meta = payload["meta"]
    kind = meta.get("kind", "model")
    if kind == ENSEMBLE_KIND:
        members = [model_from_payload(member, path) for member in payload["state_dict"]["members"]]
        return Ensemble(members, payload["state_dict"]["weights"]).to(device).eval(), meta
    if kind != "model":
        raise DataError(f"{path}: a {kind} artifact, not a segmentation model (it can only be a model's `from`)")
    return model_from_payload(payload, path).to(device).eval(), meta


def model_from_payload(payload: dict, path: Path) -> nn.Module:
    """The segmenter a model artifact's meta describes, with its weights."""
    meta = payload["meta"]
    try:
        described = {k: v for k, v in meta["model"].items() if k != "weights"}   # artifacts that still name weights
        model_params = parse(ModelParams, described, f"{path}:model")
        num_classes, class_set = int(meta["num_classes"]), meta["class_set"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: its meta does not describe a model of this pipeline (missing or bad {err})") from None
    if class_set not in CLASS_SETS:
        raise DataError(f"{path}: unknown class set {class_set!r}")
    model = build_model(model_params, num_classes)
    load_weights(model, payload["state_dict"], path, f"a {model_params.arch}-{model_params.depth}")
    return model


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


def write_ensemble(out: Path, members: list[Path], weights: list[float]) -> dict:
    """``out`` (data/models/<name>): the model artifacts ``members`` with their weights as one
    ensemble artifact (lib.models.ensemble); members must share the class set and input
    normalisation.  Returns its meta."""
    payloads = [load_checked(m / MODEL_FILE, "model checkpoint") for m in members]
    metas = [p.get("meta") or {} for p in payloads]
    for member, meta in zip(members, metas):
        if meta.get("kind", "model") != "model":
            raise DataError(f"{member / MODEL_FILE}: an ensemble member must be a trained model, not a {meta.get('kind')}")
        if (meta.get("class_set"), meta.get("normalize")) != (metas[0].get("class_set"), metas[0].get("normalize")):
            raise DataError(f"{member}: its classes or input normalisation differ from {members[0]}'s "
                            "(ensemble members must see and predict alike)")
    meta = {"kind": ENSEMBLE_KIND, "class_set": metas[0]["class_set"], "num_classes": metas[0]["num_classes"],
            "normalize": metas[0]["normalize"], "source_protocol": metas[0]["source_protocol"],
            "weights": [float(w) for w in weights], "members": {m.name: meta for m, meta in zip(members, metas)}}
    state = {"members": [{"state_dict": p["state_dict"], "meta": p["meta"]} for p in payloads],
             "weights": [float(w) for w in weights]}
    with atomic_dir(out) as tmp:
        save_atomic({"state_dict": state, "meta": meta}, tmp / MODEL_FILE)
        write_json_atomic(tmp / "meta.json", meta)
    return meta
