"""The evaluate@<model>-<target> stages: one model (or a weighted ensemble) on one prepared split.

Protocol (globallocal_advent.md §2.7, cpsl.md §8, blindnet.md §7): the model in eval mode, the
main logits upsampled (bilinear, align_corners=True) to the label size, argmax, one confusion
matrix over the whole split (ignore 255), IoU per class, mIoU = nanmean.  Inference is the whole
image (optionally resized to ``input_size`` first, ADVENT's 1024x512) or a sliding window, with an
optional horizontal flip.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lib.config import positive, positive_pair
from lib.data.classes import CITYSCAPES19, CLASS_SETS, subset_lut
from lib.data.dataset import PreparedDataset, inference_loader
from lib.data.prepared import PREPARED_ROOT, load_class_set
from lib.data.transforms import Normalize
from lib.engine import provenance
from lib.engine.loop import select_device
from lib.engine.metrics import protocol_subsets
from lib.engine.precision import PRECISIONS, effective as effective_precision
from lib.engine.report import evaluate_split, write_report
from lib.engine.checkpoint import load_model
from lib.engine.inference import inference_layout
from lib.errors import ConfigError


@dataclass(frozen=True)
class InferenceParams:
    mode: Literal["whole", "slide"] = "whole"
    input_size: tuple[int, int] | None = None     # (h, w) the image is resized to; null = as stored
    window: tuple[int, int] | None = None         # slide only: (h, w) window
    stride: tuple[int, int] | None = None         # slide only: (h, w) step
    flip: bool = False                            # average with the mirrored prediction
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast where native (lib.engine.precision)
    channels_last: bool = False                   # the model's memory layout for the forward (speed only)

    def validate(self, where: str) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"params: {where}.precision must be one of {', '.join(PRECISIONS)}, "
                              f"got '{self.precision}'")
        if self.mode == "slide" and (self.window is None or self.stride is None):
            raise ConfigError(f"params: {where}.mode 'slide' needs {where}.window and {where}.stride")
        for name in ("input_size", "window", "stride"):
            positive_pair(getattr(self, name), f"{where}.{name}")


@dataclass(frozen=True)
class EvaluateParams:
    models: list[str]                 # model-producing stages to evaluate (data/models/<name>)
    targets: list[str]                # prepared datasets to evaluate them on
    split: str = "val"
    inference: InferenceParams = InferenceParams()
    batch_size: int = 8               # images per forward; mixed image sizes fall back to 1
    workers: int = 2
    panels: int = 4                   # image | label | prediction panels saved per evaluation
    ensembles: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # name -> {model: weight}: logits summed with these weights (ADVENT's AdvEnt+MinEnt is 0.5/0.5)
    averages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # name -> targets: average@<model>-<name> writes each model's mean mIoU over them (BlindNet's C/B/M)

    def validate(self, where: str) -> None:
        for name, members in self.ensembles.items():
            if name in self.models or not members:
                raise ConfigError(f"params: {where}.ensembles.{name} must be a new name with at least one member")
        for name, targets in self.averages.items():
            if not targets or len(set(targets)) != len(targets):
                raise ConfigError(f"params: {where}.averages.{name} must list distinct targets, got {targets}")
            missing = [t for t in targets if t not in self.targets]
            if missing:
                raise ConfigError(f"params: {where}.averages.{name}: {', '.join(missing)} not in {where}.targets "
                                  "(only evaluated targets can be averaged)")
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        positive(self.panels, f"{where}.panels", allow_zero=True)


def label_mapping(model_classes: str, target_classes: str, target: str) -> torch.Tensor | None:
    """A LUT taking the target's train IDs to the model's, when the model uses a SYNTHIA subset."""
    if model_classes == target_classes:
        return None
    if target_classes != CITYSCAPES19.name:
        raise ConfigError(f"cannot evaluate a {model_classes} model on {target} ({target_classes} labels)")
    return torch.from_numpy(subset_lut(CLASS_SETS[model_classes]).astype(np.int64))


def run_evaluation(models: list[tuple[str, float]], target: str, params: EvaluateParams,
                   out_json: Path, out_dir: Path) -> dict:
    """Evaluate the weighted ensemble of ``data/models/<name>`` on ``target``; write the report.

    The report folder's ``provenance.json`` holds this evaluation's provenance (lib.engine.provenance)
    and each model's training provenance from its meta (null for a model trained before it was kept).
    """
    device = select_device()
    loaded = [(load_model(Path("data/models") / name, device), weight) for name, weight in models]
    for (model, _), _ in loaded:
        inference_layout(model, params.inference.channels_last)
    metas = [meta for (_, meta), _ in loaded]
    for meta in metas[1:]:
        if (meta["class_set"], meta["normalize"]) != (metas[0]["class_set"], metas[0]["normalize"]):
            raise ConfigError(f"ensemble members differ in classes or input normalisation: {models}")
    meta = metas[0]
    class_set = CLASS_SETS[meta["class_set"]]
    prepared = PREPARED_ROOT / target
    mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
    dataset = PreparedDataset(prepared, params.split, Normalize(mean, std), seed=0, labelled=True)
    lut = label_mapping(class_set.name, load_class_set(prepared).name, target)
    loader = inference_loader(dataset, params.batch_size, params.workers, device)
    if lut is not None:
        loader = _mapped(loader, lut)
    matrix, panels = evaluate_split(
        [(model, weight) for (model, _), weight in loaded], loader, class_set.num_classes, device,
        inference_kwargs=_inference_kwargs(params.inference), panel_ids=params.panels,
        mean=mean, std=std, desc=f"evaluate {'+'.join(n for n, _ in models)} on {target}")
    subsets = protocol_subsets(class_set.name, synthia_source=meta["source_protocol"].startswith("synthia"))
    made_with = {"evaluation": provenance.collect(device, effective_precision(params.inference.precision, device)),
                 "models": {name: m.get("provenance") for (name, _), m in zip(models, metas)}}
    return write_report(out_json, out_dir, matrix, class_set, subsets, panels, provenance=made_with)


def _inference_kwargs(inference: InferenceParams) -> dict:
    kwargs = {"mode": inference.mode, "input_size": inference.input_size, "flip": inference.flip,
              "precision": inference.precision}
    if inference.mode == "slide":
        kwargs.update(window=inference.window, stride=inference.stride)
    return kwargs


def _mapped(loader, lut: torch.Tensor):
    for batch in loader:
        yield dict(batch, label=lut[batch["label"]])
