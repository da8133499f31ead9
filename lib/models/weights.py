"""Pretrained weights as pipeline inputs: ``weights@<name>`` turns a published file into
``data/models/<name>/``, and a model whose ``from`` names it starts from those tensors.

An imported artifact is ``model.pt`` = ``{"state_dict": the backbone's tensors in this project's
names, "meta": {...}}`` with ``meta.kind = "weights"``, the format, the source file and its sha256,
and which keys were taken and which left out; ``meta.json`` repeats the meta.  ``scratch`` is the
artifact of no file at all: a model that starts from it keeps the random initialisation its own
seed draws (torchvision's ResNet initialisers and each head's own).

Formats:
- ``torchvision``: a torchvision ResNet state dict (ImageNet ``resnet101-63fe2227.pth`` (V1) or
  ``resnet101-cd907fc2.pth`` (V2), the same names; any backbone saved under torchvision's names); the
  ImageNet classifier ``fc.*`` is left out.  Its tensors fit either ResNet layout (``model.style``):
  CPSL's released code loads them, by name, into its Caffe-layout DeepLab.
- ``deeplab_caffe``: the DeepLab-v2 initialisation of AdaptSegNet, ADVENT, SIM and BAFFT
  (``DeepLab_resnet_pretrained_init-f81d91e8.pth``, ImageNet + MS-COCO, converted from DeepLab's Caffe
  model; ADVENT's ``DeepLab_resnet_pretrained_imagenet.pth``).  Its keys carry a one-component prefix
  (``Scale.``), stripped as the released code strips it; the checkpoint's own classifier ``layer5`` is
  left out, so both heads start random.  It was trained in the Caffe layout (``model.style: caffe``:
  the stride on a block's first 1×1 conv) on BGR images with the mean (104.00698793, 116.66876762,
  122.67891434) subtracted and no division (``normalize: caffe``).  The first convolution's input
  channels are stored here in RGB order, so the pipeline keeps feeding RGB: conv1 of an RGB image
  equals the file's conv1 of the same image in BGR.
- ``simclr``: SimCLRv2's ResNet-101 (``r101_1x_sk0.pth``, width 1×, no selective kernels) as CPSL
  uses it: a ``state_dict`` under torchvision's names, matched by name; every other key (the
  projection head, ``fc``) is reported and left out.
"""
from __future__ import annotations

import hashlib
import re
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
BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")      # a torchvision ResNet backbone's tensors
# What a format's tensors were trained for: the layout a model must have and the normalisation its
# inputs must get (None: any).
EXPECTS = {"torchvision": {"style": None, "normalize": None},
           "simclr": {"style": None, "normalize": None},
           "deeplab_caffe": {"style": "caffe", "normalize": "caffe"}}


@dataclass(frozen=True)
class WeightsParams:
    """An entry of the ``weights`` table: a published file, the layout it was saved in, and where its
    authors publish it (shown when the file is missing)."""

    format: Literal["torchvision", "deeplab_caffe", "simclr"]
    file: str                        # a path (project-relative or absolute): a dependency of weights@<name>
    published: str = ""              # where to obtain the file

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
    """(the backbone tensors in this project's names, what the conversion did: mapped / skipped)."""
    state = read_state_dict(path)
    if params.format == "deeplab_caffe":
        state = {k.split(".", 1)[1]: v for k, v in state.items() if "." in k}      # the `Scale.` prefix
        skipped = sorted(k for k in state if k.split(".")[0] == "layer5")           # its own classifier
        if "conv1.weight" in state:
            state["conv1.weight"] = state["conv1.weight"].flip(1)                      # BGR -> RGB inputs
    else:
        skipped = sorted(k for k in state if not BACKBONE_KEY.match(k))
    kept = {k: v for k, v in state.items() if k not in skipped}
    if not any(k.startswith("layer4.") for k in kept):
        raise DataError(f"{path}: not a ResNet state dict of the {params.format} format (no layer4.* tensors "
                        f"after the conversion; found e.g. {next(iter(state), 'nothing')})")
    return kept, {"mapped": len(kept), "skipped": skipped, "missing": [], **EXPECTS[params.format]}


def missing_file(name: str, params: WeightsParams, needed_by: list[str]) -> DataError:
    """One line: the file, the rows that start from it, where its authors publish it (or the copy
    of the same name in the torch hub cache, where torchvision keeps what it downloaded)."""
    rows = f", the start of {', '.join(needed_by)}" if needed_by else ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(params.file).name
    if cached.is_file():
        where = f"; the torch hub cache holds {cached}: set weights.{name}.file to it"
    else:
        where = f"; obtain it from {params.published}" if params.published else ""
    return DataError(f"{params.file}: weights file not found (weights.{name}{rows}; nothing is downloaded{where})")


def import_weights(name: str, params: WeightsParams, out: Path, needed_by: list[str] = ()) -> dict:
    """Write ``out`` (data/models/<name>) atomically from ``params.file``; returns its meta."""
    path = Path(params.file)
    if not path.is_file():
        raise missing_file(name, params, list(needed_by))
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
    """Lay an imported artifact's tensors on ``model`` (its backbone); ``scratch`` changes nothing.
    Weights trained in the Caffe layout go into a Caffe-layout backbone only."""
    if meta["format"] == "none":
        return
    style = meta.get("style")
    if style is not None and style != model.backbone.style:
        raise ConfigError(f"{Path(directory) / MODEL_FILE}: {meta['format']} weights were trained in the {style} ResNet "
                          f"layout, {described_as} is {model.backbone.style} (set the recipe's model.style: {style})")
    load_backbone_state(model.backbone, state, f"{Path(directory) / MODEL_FILE} ({meta['format']} weights of "
                                                  f"{meta['file']}) does not fit {described_as}")
