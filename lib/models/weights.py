"""Pretrained weights as pipeline inputs: ``weights@<name>`` turns a published file into
``data/models/<name>/``, and a model whose ``from`` names it starts from those tensors.

An imported artifact is ``model.pt`` = ``{"state_dict": the backbone's tensors in this project's
names, "meta": {...}}`` with ``meta.kind = "weights"``, the format, the source file and its sha256,
and which keys were taken and which left out; ``meta.json`` repeats the meta.  ``scratch`` is the
artifact of no file at all: a model that starts from it keeps the random initialisation its own
seed draws (torchvision's ResNet initialisers and each head's own).

Formats:
- ``torchvision``: a torchvision ResNet state dict (ImageNet ``resnet101-63fe2227.pth`` and its
  kin, or any backbone saved under torchvision's names); the ImageNet classifier ``fc.*`` is left out.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lib.errors import ConfigError, DataError
from lib.io import atomic_dir, write_json_atomic
from lib.models.backbone import load_backbone_state, read_state_dict
from lib.models.files import MODEL_FILE, load_checked, save_atomic
from lib.table import SCRATCH

WEIGHTS_KIND = "weights"
FORMATS = ("torchvision",)


@dataclass(frozen=True)
class WeightsParams:
    """An entry of the ``weights`` table: a published file and the layout it was saved in."""

    format: Literal["torchvision"]
    file: str                        # a path (project-relative or absolute): a dependency of weights@<name>

    def validate(self, where: str) -> None:
        if not self.file:
            raise ConfigError(f"params: {where}.file must name the weights file")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(params: WeightsParams, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the backbone tensors in this project's names, what the conversion did)."""
    state = read_state_dict(path)
    skipped = sorted(k for k in state if k.startswith("fc."))
    kept = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not any(k.startswith("layer4.") for k in kept):
        raise DataError(f"{path}: not a ResNet state dict in torchvision's names (no layer4.* tensors)")
    return kept, {"mapped": len(kept), "skipped": skipped, "missing": []}


def import_weights(name: str, params: WeightsParams, out: Path) -> dict:
    """Write ``out`` (data/models/<name>) atomically from ``params.file``; returns its meta."""
    path = Path(params.file)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found (weights.{name}.file; nothing is downloaded: "
                        "put the published file there)")
    state, conversion = convert(params, path)
    meta = {"kind": WEIGHTS_KIND, "name": name, "format": params.format, "file": str(path),
            "sha256": sha256(path), **conversion}
    with atomic_dir(out) as tmp:
        save_atomic({"state_dict": state, "meta": meta}, tmp / MODEL_FILE)
        write_json_atomic(tmp / "meta.json", meta)
    return meta


def write_scratch(out: Path) -> dict:
    """``data/models/scratch``: the start of a model trained from random initialisation."""
    meta = {"kind": WEIGHTS_KIND, "name": SCRATCH, "format": "none",
            "note": "no weights: a model starting here keeps the random initialisation of its own seed"}
    with atomic_dir(out) as tmp:
        save_atomic({"state_dict": {}, "meta": meta}, tmp / MODEL_FILE)
        write_json_atomic(tmp / "meta.json", meta)
    return meta


def load_imported(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a weights artifact; anything else is a one-line DataError."""
    payload = load_checked(Path(directory) / MODEL_FILE, "weights artifact")
    meta = payload.get("meta")
    if not isinstance(meta, dict) or meta.get("kind") != WEIGHTS_KIND or not isinstance(payload.get("state_dict"), dict):
        raise DataError(f"{Path(directory) / MODEL_FILE}: not a weights artifact of this pipeline (run its weights stage)")
    return payload["state_dict"], meta


def initialise(model: nn.Module, directory: Path, state: dict[str, torch.Tensor], meta: dict,
               described_as: str = "the model's backbone") -> None:
    """Lay an imported artifact's tensors on ``model`` (its backbone); ``scratch`` changes nothing."""
    if meta["format"] == "none":
        return
    load_backbone_state(model.backbone, state, f"{Path(directory) / MODEL_FILE} ({meta['format']} weights of "
                                                  f"{meta['file']}) does not fit {described_as}")
