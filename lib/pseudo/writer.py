"""``pseudo_label@<name>``: a trained model labels the target's training split (lib.pseudo.artifact
describes the set it writes).

The model runs in eval mode, without augmentation; the set is written atomically to
``data/pseudo/<name>/``, streaming image by image (nothing holds the split's maps in memory), with
``metrics/pseudo/<name>/classes.csv`` (class, predicted, kept fractions) for a DVC bar plot.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib.config import parse, positive
from lib.data.classes import CLASS_SETS, IGNORE
from lib.data.dataset import ImagesOnly, inference_loader
from lib.data.prepared import PREPARED_ROOT, require_prepared
from lib.data.transforms import Normalize
from lib.device import autocast, select_device
from lib.errors import ConfigError, DataError
from lib.infer.inference import inference_layout, predict_logits
from lib.infer.params import InferenceParams
from lib.io import atomic_dir, read_label_png, write_json_atomic, write_label_png
from lib.models.artifact import load_model
from lib.models.files import MODEL_FILE
from lib.pseudo.artifact import (
    CLASS_THRESHOLD_FORMS,
    CLASSES_CSV,
    FLIP_DEFAULT,
    FORMS,
    INDEX,
    LABELLER,
    META,
    PRIOR,
    PROTOTYPES,
    Form,
    confident,
    encode_confidence,
    read_confidence,
)
from lib.table import check_model_reference, model_reference, table

FLOAT16_PATTERNS = 1 << 16    # every uint16 bit pattern of a float16


@dataclass(frozen=True)
class PseudoParams:
    """How a model labels a split (the ``pseudo_label`` section, per output overridable).

    - ``flip``: average with the mirrored prediction; null = the form's default (hard_threshold
      yes, as CPSL's hard labels; class_median no, as SIM; soft never, as CPSL's soft labels).
    - ``inference``: whole image or sliding window, optional input resize (hard forms only; its
      own ``flip`` must stay false: pseudo-labels average softmax, not logits).
    - ``threshold``: hard_threshold's threshold (CPSL's released code: 0.95), recorded in the meta
      and used for the kept fractions.  The stored confidence code is exact at this threshold only,
      so it is the only load-time threshold the set accepts (a reader asking another is refused).
    - ``median_cap``: class_median's cap on the class thresholds (SIM's and BAFFT's released code:
      0.9).
    - ``class_portion``: class_balanced's share of each class's pixels kept (capped by ``threshold``).
    - ``min_pixels``, ``count_cap``, ``passes``: the soft form's prototypes (as ProDA's
      released code computes them, microsoft/ProDA).
    """

    batch_size: int = 8
    workers: int = 2
    flip: bool | None = None
    inference: InferenceParams = InferenceParams()
    threshold: float = 0.95
    median_cap: float = 0.9
    class_portion: float = 0.2
    min_pixels: int = 10
    count_cap: int = 3000
    passes: int = 4

    def validate(self, where: str) -> None:
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        positive(self.min_pixels, f"{where}.min_pixels")
        positive(self.count_cap, f"{where}.count_cap")
        positive(self.passes, f"{where}.passes")
        if self.inference.flip:
            raise ConfigError(f"params: {where}.inference.flip: use {where}.flip (pseudo-labels "
                              "average the softmax of the two views, not their logits)")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"params: {where}.threshold must be in [0, 1), got {self.threshold}")
        if not 0.0 < self.median_cap <= 1.0:
            raise ConfigError(f"params: {where}.median_cap must be in (0, 1], got {self.median_cap}")
        if not 0.0 < self.class_portion <= 1.0:
            raise ConfigError(f"params: {where}.class_portion must be in (0, 1], got {self.class_portion}")

    def flip_for(self, form: str) -> bool:
        return FLIP_DEFAULT[form] if self.flip is None else self.flip


@dataclass(frozen=True)
class PseudoJob:
    """What one set labels: ``model`` (a data/models folder) on ``dataset``/``split``, in ``form``."""

    model: str
    form: Form
    dataset: str
    split: str = "train"


def pseudo_row(params: dict, name: str) -> tuple[PseudoJob, PseudoParams]:
    """``pseudo_labels.<name>`` = {model, form, options}: the target's ``options.split`` (train)
    labelled by ``model`` in ``form``, with the writer's ``options``."""
    rows = table(params, "pseudo_labels")
    where = f"pseudo_labels.{name}"
    if name not in rows:
        raise ConfigError(f"params: no pseudo-label set {name!r} under pseudo_labels (known: {', '.join(rows) or 'none'})")
    row = rows[name]
    if not isinstance(row, dict):
        raise ConfigError(f"params: {where} must be a mapping with keys model, form, options, got {row!r}")
    unknown = sorted(set(row) - {"model", "form", "options"})
    if unknown:
        raise ConfigError(f"params: unknown key '{where}.{unknown[0]}' (known keys: form, model, options)")
    options = dict(row.get("options") or {})
    target = params.get("target")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"params: 'target' must name the prepared dataset pseudo-labels label (used by {where})")
    job = parse(PseudoJob, {"model": row.get("model"), "form": row.get("form"), "dataset": target,
                            "split": options.pop("split", "train")}, where)
    model, checkpoint = model_reference(job.model)
    if model not in {k for t in ("models", "selftrained", "ensembles") for k in table(params, t)}:
        raise ConfigError(f"params: {where}.model {job.model!r} is not a model of the table "
                          "(a key of models, selftrained or ensembles, or `<model>/best`)")
    if model != job.model:
        check_model_reference(params, job.model, f"{where}.model")
    return job, parse(PseudoParams, options, f"{where}.options")


def check_form(form: str, params: PseudoParams) -> None:
    if form not in FORMS:
        raise ConfigError(f"params: pseudo-label form {form!r} is not one of {', '.join(FORMS)}")
    if form == "soft" and (params.flip or params.inference.mode != "whole"):
        raise ConfigError("params: the soft form is the plain whole-image forward (as CPSL's released code "
                          "makes it); flip and sliding windows apply to the hard forms only "
                          "(inference.input_size is allowed)")


# ------------------------------------------------------------------------------------------------
# Pure pieces


def softmax_average(probabilities: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
    """CPSL's hard labels (the released code, lslrh/CPSL):
    p = 1/2 [softmax(x) + flip(softmax(flip x))].

    ``mirrored`` is the softmax of the mirrored image, still mirrored; None means no flip.
    """
    if mirrored is None:
        return probabilities
    return 0.5 * (probabilities + mirrored.flip(-1))


def class_feature_means(embedding: torch.Tensor, pred: torch.Tensor, num_classes: int,
                        min_pixels: int) -> list[list[tuple[int, np.ndarray]]]:
    """Per image, (k, v) for every class k with >= ``min_pixels`` argmax pixels (as ProDA's
    released code).

    ``embedding`` (N, D, h, w), ``pred`` (N, h, w) argmax on the same grid; v (D,) float64 is
    the mean embedding over the image's pixels predicted k.  Classes come in ascending order.
    """
    n, dim = embedding.shape[:2]
    flat = embedding.reshape(n, dim, -1).double()                                       # N, D, P
    onehot = torch.nn.functional.one_hot(pred.reshape(n, -1), num_classes).double()     # N, P, C
    sums = torch.bmm(flat, onehot).transpose(1, 2).cpu().numpy()                        # N, C, D
    counts = onehot.sum(1).cpu().numpy()                                                # N, C
    return [[(k, sums[i, k] / counts[i, k]) for k in range(num_classes) if counts[i, k] >= min_pixels]
            for i in range(n)]


def replay_prototypes(observations: Sequence[tuple[int, np.ndarray]], num_classes: int, dim: int,
                      passes: int, count_cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(eta (C, D) float64, n (C,) int64): the running class means of ProDA's
    released code (microsoft/ProDA).

    For each observation (k, v), in order, ``passes`` times over the sequence:
    eta_k <- (n_k eta_k + v) / (n_k + 1), then n_k <- min(n_k + 1, count_cap); past the cap the
    update is an EMA with weight 1 / (count_cap + 1).  A class never observed keeps eta_k = 0.
    """
    eta = np.zeros((num_classes, dim), np.float64)
    counts = np.zeros(num_classes, np.int64)
    for _ in range(passes):
        for k, v in observations:
            eta[k] = (counts[k] * eta[k] + v) / (counts[k] + 1)
            counts[k] = min(counts[k] + 1, count_cap)
    return eta, counts


def class_prior(pred_counts: np.ndarray) -> np.ndarray:
    """CPSL's class prior r (the released code, lslrh/CPSL): argmax counts normalised to sum 1,
    float32."""
    counts = np.asarray(pred_counts, np.float64)
    if counts.sum() <= 0:
        raise ValueError("class prior of an empty prediction")
    return (counts / counts.sum()).astype(np.float32)


def confidence_histogram(label: np.ndarray, conf16: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, 65536) int64: pixels per (predicted class, float16 bit pattern of their confidence).

    Confidences are non-negative, and for non-negative float16 values the uint16 bit patterns
    sort exactly like the values, so the histogram holds every class's sorted confidences.
    """
    bits = np.ascontiguousarray(conf16, np.float16).view(np.uint16).astype(np.int64)
    flat = np.asarray(label, np.int64) * FLOAT16_PATTERNS + bits
    return np.bincount(flat.ravel(), minlength=num_classes * FLOAT16_PATTERNS).reshape(
        num_classes, FLOAT16_PATTERNS)


def median_index(count: int) -> int:
    """SIM's index into a class's ascending confidences: round(0.5 N), as released.

    NumPy's round halves to even (N = 3 -> 2, N = 5 -> 2); for N >= 1 the index is < N.
    """
    return int(np.round(0.5 * count))


def portion_index(count: int, portion: float) -> int:
    """Index into a class's N ascending confidences that keeps (about) the top ``portion``:
    round((1 - portion) N), clipped to N - 1 (portion 0.5 is SIM's :func:`median_index`)."""
    return min(int(np.round((1.0 - portion) * count)), count - 1)


def class_quantile_thresholds(histogram: np.ndarray, index: Callable[[int], int], cap: float) -> np.ndarray:
    """tau_c: the confidence at ``index(N_c)`` of class c's ascending confidences, min(tau_c, cap);
    0 for a class never predicted.  Exact for the stored float16 values (``histogram`` from
    :func:`confidence_histogram`)."""
    taus = np.zeros(histogram.shape[0], np.float64)
    for c, row in enumerate(histogram):
        total = int(row.sum())
        if total == 0:
            continue
        cumulative = np.cumsum(row)
        bits = int(np.searchsorted(cumulative, index(total), side="right"))
        value = float(np.array([bits], np.uint16).view(np.float16)[0])
        taus[c] = min(value, cap)
    return taus


def class_median_thresholds(histogram: np.ndarray, cap: float) -> np.ndarray:
    """tau_c of SIM (Wang et al., CVPR 2020; as released): the class's confidence at
    ``median_index(N_c)``, capped."""
    return class_quantile_thresholds(histogram, median_index, cap)


def class_balanced_thresholds(histogram: np.ndarray, portion: float, cap: float) -> np.ndarray:
    """tau_c keeping the top ``portion`` of each class's pixels (CBST), capped at ``cap``."""
    return class_quantile_thresholds(histogram, functools.partial(portion_index, portion=portion), cap)


def kept_by_class_threshold(label: np.ndarray, conf: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """SIM's rule, as released: a pixel is kept iff prob >= tau_{label}."""
    return np.asarray(conf).astype(np.float64) >= taus[label]


def class_fractions(predicted: np.ndarray, kept: np.ndarray) -> tuple[list[float], list[float]]:
    """(predicted share of all pixels, kept / predicted) per class; 0 for a class never predicted."""
    predicted = np.asarray(predicted, np.float64)
    total = max(predicted.sum(), 1.0)
    kept_share = np.divide(kept, predicted, out=np.zeros_like(predicted), where=predicted > 0)
    return (predicted / total).tolist(), kept_share.tolist()


# ------------------------------------------------------------------------------------------------
# Writer


def check_ids(ids: Iterable[str], where: str) -> None:
    """Ids become file names: no separators, no '.'/'..', no repeats."""
    seen = set()
    for sample_id in ids:
        if (not sample_id or sample_id in (".", "..") or "/" in sample_id or "\\" in sample_id
                or "\0" in sample_id):
            raise DataError(f"{where}: sample id {sample_id!r} cannot be a file name")
        if sample_id in seen:
            raise DataError(f"{where}: sample id {sample_id!r} appears twice in the split")
        seen.add(sample_id)


def generate_pseudo_labels(model_dir: Path, dataset: str, split: str, form: str, params: PseudoParams,
                           out: Path, metrics: Path | None = None, progress: bool = True) -> dict:
    """Label ``dataset``/``split`` with the model artifact ``model_dir``; write ``out`` atomically
    (and ``metrics/classes.csv`` when given).  Returns the meta written to ``out/meta.json``.

    Every input is checked before any work: the form, the model folder, the prepared dataset,
    the ids (they become file names) and, for the soft form, the CPSL head.  The dataset's
    ground truth is never read; pseudo-labels are in the model's class set, so the dataset's own
    class protocol does not matter (a SYNTHIA-16 model labels Cityscapes in its 16 classes).
    """
    model_dir, out = Path(model_dir), Path(out)
    check_form(form, params)
    if not (model_dir / MODEL_FILE).is_file():
        raise DataError(f"{model_dir}: model artifact not found (run the stage that writes it first)")
    require_prepared(dataset)
    device = select_device()
    model, model_meta = load_model(model_dir, device)
    inference_layout(model, params.inference.channels_last)
    normalize = model_meta["normalize"]
    images = ImagesOnly(PREPARED_ROOT / dataset, split, Normalize(normalize["mean"], normalize["std"]), seed=0)
    check_ids(images.ids, str(PREPARED_ROOT / dataset / "index.csv"))
    loader = inference_loader(images, params.batch_size, params.workers, device)
    class_set = CLASS_SETS[model_meta["class_set"]]
    meta = {
        "form": form, "model": model_dir.name, "model_stage": model_meta.get("stage"),
        "model_method": model_meta.get("method"), "dataset": dataset, "split": split,
        "num_classes": class_set.num_classes, "class_set": class_set.name, "classes": list(class_set.names),
        "count": len(images), "normalize": normalize, "flip": params.flip_for(form),
        "params": dataclasses.asdict(params),
    }
    bar = tqdm(total=len(images), desc=f"pseudo_label {out.name} ({form})", unit="img", disable=not progress)
    with atomic_dir(out) as tmp, bar:
        write = _write_soft if form == "soft" else _write_hard
        meta.update(write(model, loader, tmp, form, params, class_set.num_classes, device, bar, model_dir))
        index = meta.pop("index")
        pd.DataFrame(index).to_csv(tmp / INDEX, index=False)
        write_json_atomic(tmp / META, meta)
        (tmp / LABELLER).mkdir()
        for part in (MODEL_FILE, "meta.json"):     # the labeller: a distillation round's teacher
            shutil.copyfile(model_dir / part, tmp / LABELLER / part)
        if metrics is not None:   # inside the artifact's atomic block: a failure leaves neither
            with atomic_dir(metrics) as metrics_tmp:
                pd.DataFrame({"class": class_set.names, "predicted": meta["predicted_fraction"],
                              "kept": meta["kept_fraction"]}).to_csv(
                    metrics_tmp / CLASSES_CSV, index=False, float_format="%.6f")
    return meta


def _checked_probabilities(probabilities: torch.Tensor, ids: list[str], model_dir: Path) -> torch.Tensor:
    if not torch.isfinite(probabilities).all():
        raise DataError(f"{model_dir}: the model's prediction is not finite on a batch starting "
                        f"with sample {ids[0]}")
    return probabilities


def _write_soft(model, loader, tmp: Path, form: str, params: PseudoParams, num_classes: int,
                device, bar, model_dir: Path) -> dict:
    """CPSL's soft labels (the released code, lslrh/CPSL): soft maps, prototypes and prior in one
    forward per image.

    The prototypes' ``passes`` passes see the same features every time (eval
    mode, no augmentation), so the per-image class means are computed once and the running-mean
    update is replayed ``passes`` times in the set's order: exactly the update of ``passes``
    forward passes in that order (which order ProDA's loader used is not pinned down: our choice
    is the index order).  What stays in memory is one D-vector per (image, class present).
    Nothing is thresholded: the predicted (= kept) fractions count the argmax on the logit grid.
    """
    (tmp / "soft").mkdir()
    observations: list[tuple[int, np.ndarray]] = []
    pred_counts = np.zeros(num_classes, np.int64)
    index, dim = [], None
    with torch.inference_mode():
        for batch in loader:
            ids = list(batch["id"])
            image = batch["image"].to(device, non_blocking=True)
            if params.inference.input_size is not None:     # our option: a cheaper forward (synthetic default)
                image = F.interpolate(image, size=tuple(params.inference.input_size), mode="bilinear",
                                      align_corners=False, antialias=True)
            with autocast(params.inference.precision, device):
                out = model(image)
            embedding = out.features.get("embedding")
            if embedding is None:
                raise ConfigError(f"{model_dir}: the model returns no 'embedding' feature; the soft "
                                  "form needs one for the class prototypes")
            probabilities = _checked_probabilities(torch.softmax(out.logits.float(), 1), ids, model_dir)
            pred = probabilities.argmax(1)
            pred_counts += torch.bincount(pred.reshape(-1), minlength=num_classes).cpu().numpy()
            for per_image in class_feature_means(embedding.float(), pred, num_classes, params.min_pixels):
                observations.extend(per_image)
            dim = embedding.shape[1]
            height, width = batch["image"].shape[-2:]
            for sample_id, soft in zip(ids, probabilities.half().cpu().numpy()):
                np.save(tmp / "soft" / f"{sample_id}.npy", soft)
                index.append({"id": sample_id, "height": int(height), "width": int(width),
                              "soft": f"soft/{sample_id}.npy"})
            bar.update(len(ids))
    eta, counts = replay_prototypes(observations, num_classes, dim, params.passes, params.count_cap)
    prior = class_prior(pred_counts)
    np.save(tmp / PROTOTYPES, eta.astype(np.float32))
    np.save(tmp / PRIOR, prior)
    predicted, kept = class_fractions(pred_counts, pred_counts)
    # the nominal stride: with ceil-mode pooling the grid is ceil-rounded (h = 9 for H = 64)
    return {"index": index, "stride": model.output_stride, "embedding_dim": int(dim),
            "threshold": {"load_time": None, "rule": "no threshold; 'pseudo' is the argmax of the soft map"},
            "thresholds": None, "predicted_pixels": pred_counts.tolist(), "kept_pixels": pred_counts.tolist(),
            "predicted_fraction": predicted, "kept_fraction": kept, "kept_fraction_total": 1.0,
            "prototype_counts": counts.tolist(), "prior": prior.tolist()}


def predict_probabilities(model, image: torch.Tensor, size: tuple[int, int], inference: InferenceParams,
                          flip: bool) -> torch.Tensor:
    """(N, C, H, W) float32 softmax at ``size``: softmax(up(logits)), flip-averaged if ``flip``
    (as CPSL's hard labels, ``softmax_average``).  Whole image or sliding window per ``inference``."""
    kwargs = {"mode": inference.mode, "input_size": inference.input_size, "resize_mode": inference.resize,
              "precision": inference.precision}
    if inference.mode == "slide":
        kwargs.update(window=inference.window, stride=inference.stride)
    probabilities = torch.softmax(predict_logits(model, image, size, **kwargs), 1)
    mirrored = torch.softmax(predict_logits(model, image.flip(-1), size, **kwargs), 1) if flip else None
    return softmax_average(probabilities, mirrored)


def _write_hard(model, loader, tmp: Path, form: str, params: PseudoParams, num_classes: int,
                device, bar, model_dir: Path) -> dict:
    """CPSL's hard labels and SIM's: an argmax PNG per image, and for hard_threshold its confidence
    as a uint8 code exact at the set's threshold (lib.pseudo.artifact.encode_confidence).

    The class forms take tau_c from the histogram of the float16 confidences, written to the
    temporary folder, and rewrite the labels in a second pass that reads them back one image at a
    time; the set publishes only the labels.
    """
    if num_classes >= IGNORE:
        raise ConfigError(f"{num_classes} classes do not fit a uint8 label with {IGNORE} as ignore")
    (tmp / "labels").mkdir()
    (tmp / "conf").mkdir()
    flip = params.flip_for(form)
    pred_counts = np.zeros(num_classes, np.int64)
    kept_counts = np.zeros(num_classes, np.int64)
    histogram = np.zeros((num_classes, FLOAT16_PATTERNS), np.int64) if form in CLASS_THRESHOLD_FORMS else None
    index = []
    for batch in loader:
        ids = list(batch["id"])
        image = batch["image"].to(device, non_blocking=True)
        size = tuple(image.shape[-2:])
        probabilities = _checked_probabilities(
            predict_probabilities(model, image, size, params.inference, flip), ids, model_dir)
        conf, label = probabilities.max(1)
        label = label.to(torch.uint8).cpu().numpy()
        pred_counts += np.bincount(label.ravel(), minlength=num_classes)
        if histogram is None:
            conf = conf.float().cpu().numpy()
            kept_counts += np.bincount(label[confident(conf, params.threshold)], minlength=num_classes)
        else:
            conf = conf.half().cpu().numpy()
            histogram += confidence_histogram(label, conf, num_classes)
        for sample_id, one_label, one_conf in zip(ids, label, conf):
            write_label_png(tmp / "labels" / f"{sample_id}.png", one_label)
            row = {"id": sample_id, "height": int(size[0]), "width": int(size[1]), "label": f"labels/{sample_id}.png"}
            if histogram is None:
                row["conf"] = f"conf/{sample_id}.png"
                write_label_png(tmp / row["conf"], encode_confidence(one_conf, params.threshold))
            else:
                np.save(tmp / "conf" / f"{sample_id}.npy", one_conf)
            index.append(row)
        bar.update(len(ids))
    result = {"index": index}
    if histogram is None:
        result["threshold"] = {"load_time": params.threshold,
                               "rule": "at load time, conf <= threshold becomes 255 (CPSL's released code)",
                               "stored": "conf/<id>.png: uint8 code, >= 128 exactly where the float32 confidence "
                                         "is > threshold (lib.pseudo.artifact.encode_confidence)"}
        result["thresholds"] = None
    else:
        if form == "class_median":
            taus = class_median_thresholds(histogram, params.median_cap)
            rule = "conf < thresholds[label] (class median, capped) was set to 255 when written (SIM's released code)"
        else:
            taus = class_balanced_thresholds(histogram, params.class_portion, params.threshold)
            rule = (f"conf < thresholds[label] (top {params.class_portion:g} of the class, capped at "
                    f"{params.threshold:g}) was set to 255 when written (CBST, our addition)")
        kept_counts = apply_class_thresholds(tmp, [row["id"] for row in index], taus, num_classes)
        shutil.rmtree(tmp / "conf")       # the labels carry the thresholds: no reader needs the maps
        result["threshold"] = {"load_time": None, "rule": rule}
        result["thresholds"] = taus.tolist()
    predicted, kept = class_fractions(pred_counts, kept_counts)
    result.update(predicted_pixels=pred_counts.tolist(), kept_pixels=kept_counts.tolist(),
                  predicted_fraction=predicted, kept_fraction=kept,
                  kept_fraction_total=float(kept_counts.sum() / max(pred_counts.sum(), 1)))
    return result


def apply_class_thresholds(folder: Path, ids: Sequence[str], taus: np.ndarray, num_classes: int) -> np.ndarray:
    """Second pass of the class-threshold forms: per id, read ``labels/<id>.png`` and ``conf/<id>.npy`` back, set
    pixels with conf < tau_label to 255, rewrite the label.  Returns the kept pixels per class."""
    kept_counts = np.zeros(num_classes, np.int64)
    for sample_id in ids:
        label_path = folder / "labels" / f"{sample_id}.png"
        label = read_label_png(label_path)
        keep = kept_by_class_threshold(label, read_confidence(folder / "conf" / f"{sample_id}.npy"), taus)
        kept_counts += np.bincount(label[keep], minlength=num_classes)
        write_label_png(label_path, np.where(keep, label, IGNORE).astype(np.uint8))
    return kept_counts
