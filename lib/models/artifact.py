"""Model artifacts: the ``data/models/<name>/`` folder a stage hands downstream (``model.pt`` =
state dict + the meta that made it, and a readable ``meta.json``), written and read through
lib.models.files."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lib.config import parse
from lib.data.classes import CLASS_SETS
from lib.errors import DataError
from lib.io import atomic_dir, write_json_atomic
from lib.models.ensemble import ENSEMBLE_KIND, Ensemble
from lib.models.factory import build_model
from lib.models.files import MODEL_FILE, load_checked, save_atomic
from lib.models.params import ModelParams


def save_model(directory: Path, model, meta: dict, state: dict | None = None) -> None:
    """``model.pt`` (state_dict + meta) and a human-readable ``meta.json`` beside it; ``state``: other
    weights of the same architecture (a selected checkpoint) instead of the model's own."""
    state = {k: v.detach().cpu() for k, v in (model.state_dict() if state is None else state).items()}
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
