"""evaluate@<model>-<target>: one model (or an ensemble artifact) on one prepared split.

Protocol (ADVENT, Vu et al. CVPR 2019; CPSL; BlindNet): the model in eval mode, the main logits
upsampled (bilinear, align_corners=True) to the label size, argmax, one confusion matrix over the
whole split (ignore 255), IoU per class, mIoU = nanmean.  Inference is the whole image (optionally
resized to ``input_size`` first, ADVENT's 1024x512) or a sliding window, with an optional
horizontal flip.  The per-evaluation reports are gathered by the summary stage (lib.infer.summary).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib import provenance
from lib.data.classes import CITYSCAPES19, CLASS_SETS, subset_lut
from lib.data.dataset import PreparedDataset, inference_loader
from lib.data.prepared import PREPARED_ROOT, load_class_set
from lib.data.transforms import Normalize
from lib.device import effective as effective_precision
from lib.device import select_device
from lib.errors import ConfigError
from lib.infer.inference import inference_layout
from lib.infer.metrics import protocol_subsets
from lib.infer.params import EvaluateParams, InferenceParams
from lib.infer.report import evaluate_split, write_report
from lib.models.artifact import load_model

MODELS_ROOT = Path("data/models")


def label_mapping(model_classes: str, target_classes: str, target: str) -> torch.Tensor | None:
    """A LUT taking the target's train IDs to the model's, when the model uses a SYNTHIA subset."""
    if model_classes == target_classes:
        return None
    if target_classes != CITYSCAPES19.name:
        raise ConfigError(f"cannot evaluate a {model_classes} model on {target} ({target_classes} labels)")
    return torch.from_numpy(subset_lut(CLASS_SETS[model_classes]).astype(np.int64))


def run_evaluation(model_name: str, target: str, params: EvaluateParams, out_json: Path, out_dir: Path) -> dict:
    """Evaluate ``data/models/<model_name>`` on ``target``; write the report.

    The report folder's ``provenance.json`` holds this evaluation's provenance (lib.provenance)
    and the evaluated model's training provenance from its meta (an ensemble's: each member's).
    """
    device = select_device()
    model, meta = load_model(MODELS_ROOT / model_name, device)
    inference_layout(model, params.inference.channels_last)
    class_set = CLASS_SETS[meta["class_set"]]
    prepared = PREPARED_ROOT / target
    mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
    dataset = PreparedDataset(prepared, params.split, Normalize(mean, std), seed=0, labelled=True)
    lut = label_mapping(class_set.name, load_class_set(prepared).name, target)
    loader = inference_loader(dataset, params.batch_size, params.workers, device)
    if lut is not None:
        loader = _mapped(loader, lut)
    matrix, panels = evaluate_split(
        model, loader, class_set.num_classes, device, inference_kwargs=_inference_kwargs(params.inference),
        panel_ids=params.panels, mean=mean, std=std, desc=f"evaluate {model_name} on {target}",
        model_name=str(MODELS_ROOT / model_name))
    subsets = protocol_subsets(class_set.name, synthia_source=meta["source_protocol"].startswith("synthia"))
    trained = meta.get("members") or {model_name: meta}
    made_with = {"evaluation": provenance.collect(device, effective_precision(params.inference.precision, device)),
                 "models": {name: m.get("provenance") for name, m in trained.items()}}
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
