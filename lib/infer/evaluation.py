"""evaluate@<model>-<target>: one model (or an ensemble artifact) on one prepared split.

Protocol (ADVENT, Vu et al. CVPR 2019; CPSL; BlindNet): the model in eval mode, the main logits
upsampled (bilinear, align_corners=True) to the label size, argmax, one confusion matrix over the
whole split (ignore 255), IoU per class, mIoU = nanmean.  Inference is the whole image (optionally
resized to ``input_size`` first, ADVENT's 1024x512) or a sliding window, with an optional
horizontal flip.  The per-evaluation reports are gathered by the summary stage (lib.infer.summary).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib import provenance
from lib.data.classes import CITYSCAPES19, CLASS_SETS, subset_lut
from lib.data.dataset import PreparedDataset, inference_loader
from lib.data.prepared import PREPARED_ROOT, load_class_set
from lib.data.transforms import Normalize
from lib.device import effective as effective_precision
from lib.device import select_device
from lib.errors import ConfigError
from lib.infer.inference import inference_layout
from lib.infer.metrics import protocol_subsets, summarize
from lib.infer.params import EvaluateParams, InferenceParams
from lib.infer.report import evaluate_split, headline, percent, write_report
from lib.models.artifact import load_model
from lib.models.ensemble import ENSEMBLE_KIND
from lib.models.files import MODEL_FILE
from lib.table import BEST

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

    A model whose training selected a checkpoint (lib.train.select) is scored twice: the last
    iterate is the report, the selected one (``data/models/<model_name>/best``) its ``best`` entry
    (the headline numbers, per-class IoU and the iteration it was selected at).
    The report folder's ``provenance.json`` holds this evaluation's provenance (lib.provenance)
    and the evaluated model's training provenance from its meta (an ensemble's: each member's).
    """
    device = select_device()
    model, meta = load_model(MODELS_ROOT / model_name, device)
    inference_layout(model, params.inference.channels_last)
    class_set = CLASS_SETS[meta["class_set"]]
    matrix, panels = split_matrix(model, meta, target, params.split, params.inference, params.batch_size,
                                  params.workers, device, panels=params.panels,
                                  desc=f"evaluate {model_name} on {target}", model_name=str(MODELS_ROOT / model_name))
    subsets = protocol_subsets(class_set.name, synthia_source=meta["source_protocol"].startswith("synthia"))
    extra = None
    best_dir = MODELS_ROOT / model_name / BEST
    if (best_dir / MODEL_FILE).is_file():
        best, best_meta = load_model(best_dir, device)
        if same_model(model, meta, best, best_meta):     # selected at the last iteration: the same scores
            best_matrix = matrix
        else:
            inference_layout(best, params.inference.channels_last)
            best_matrix, _ = split_matrix(best, best_meta, target, params.split, params.inference,
                                          params.batch_size, params.workers, device,
                                          desc=f"evaluate {model_name}/{BEST} on {target}", model_name=str(best_dir))
        scores = summarize(best_matrix.numpy(), class_set.names, subsets)
        extra = {BEST: {**headline(scores, subsets, best_matrix.images),
                        "iteration": best_meta["selection"]["best_iteration"],
                        "classes": {c["name"]: percent(c["iou"]) for c in scores["classes"]}}}
    trained = meta.get("members") or {model_name: meta}
    made_with = {"evaluation": provenance.collect(device, effective_precision(params.inference.precision, device)),
                 "models": {name: m.get("provenance") for name, m in trained.items()}}
    return write_report(out_json, out_dir, matrix, class_set, subsets, panels, extra=extra, provenance=made_with)


def same_model(a: nn.Module, a_meta: dict, b: nn.Module, b_meta: dict) -> bool:
    """Whether two artifacts predict alike on every input: the same architecture, class set and input
    normalisation, and equal weights and buffers, tensor for tensor."""
    keys = ("model", "class_set", "normalize")
    if any(a_meta.get(k) != b_meta.get(k) for k in keys) or type(a) is not type(b):
        return False
    if ENSEMBLE_KIND in (a_meta.get("kind"), b_meta.get("kind")):   # its mixing weights are no tensors
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def split_matrix(model, meta: dict, target: str, split: str, inference: InferenceParams, batch_size: int,
                 workers: int, device, *, images: int = 0, panels: int = 0, progress: bool = True,
                 desc: str = "evaluate", model_name: str = "the model"):
    """(confusion matrix, panels) of ``model`` (in eval mode, on ``device``; ``meta`` its artifact's
    meta) on the first ``images`` (0: all) of ``split`` of the prepared dataset ``target``."""
    class_set = CLASS_SETS[meta["class_set"]]
    prepared = PREPARED_ROOT / target
    mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
    dataset = PreparedDataset(prepared, split, Normalize(mean, std), seed=0, labelled=True)
    if images:
        dataset.index = dataset.index.iloc[:images].reset_index(drop=True)
    lut = label_mapping(class_set.name, load_class_set(prepared).name, target)
    loader = inference_loader(dataset, batch_size, workers, torch.device(device))
    if lut is not None:
        loader = _mapped(loader, lut)
    return evaluate_split(model, loader, class_set.num_classes, device, inference_kwargs=_inference_kwargs(inference),
                          panel_ids=panels, progress=progress, mean=mean, std=std, desc=desc, model_name=model_name)


def validation_score(target: str, split: str, images: int, inference: InferenceParams, batch_size: int,
                     workers: int, meta: dict) -> Callable[[nn.Module], float]:
    """mIoU (percent; NaN when undefined) of a model in training on the first ``images`` of a split,
    with the evaluation's protocol: the score of checkpoint selection (lib.train.select).  ``meta``
    describes the model as its artifact will (class set, normalisation)."""
    class_set = CLASS_SETS[meta["class_set"]]

    def score(model: nn.Module) -> float:
        device = next(model.parameters()).device
        matrix, _ = split_matrix(model, meta, target, split, inference, batch_size, workers, device, images=images,
                                 progress=False, model_name=f"the model in training (selection on {target})")
        return float(summarize(matrix.numpy(), class_set.names)["mIoU"])

    return score


def _inference_kwargs(inference: InferenceParams) -> dict:
    kwargs = {"mode": inference.mode, "input_size": inference.input_size, "resize_mode": inference.resize,
              "flip": inference.flip, "precision": inference.precision}
    if inference.mode == "slide":
        kwargs.update(window=inference.window, stride=inference.stride)
    return kwargs


def _mapped(loader, lut: torch.Tensor):
    for batch in loader:
        yield dict(batch, label=lut[batch["label"]])
