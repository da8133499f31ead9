"""Dataset-level segmentation metrics from one confusion matrix.

The convention is the one ADVENT, CPSL, BlindNet, mmseg (``IoUMetric``) and the official
Cityscapes evaluator share: a single C x C matrix (rows = ground truth, columns = prediction) is
summed over the whole evaluation set, pixels whose label is outside [0, C) (255 = ignore) are left
out, IoU_c = TP / (TP + FP + FN) and mIoU is the mean over the classes whose IoU is defined (a class
absent from both the ground truth and the predictions has 0/0 = NaN and is skipped, ``nanmean``).
It is not a mean of per-image scores.

Every derived number (mIoU, mAcc, pixel accuracy, mIoU16, mIoU13, per-class rows) is computed from
the same matrix, so the subset means of a 19-class model trained on SYNTHIA can never disagree
with its per-class table.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lib.data.classes import CITYSCAPES19, CLASS_INDEX, SYNTHIA13, SYNTHIA16

HEADLINE_KEYS = ("mIoU", "mAcc", "pixel_acc")


class ConfusionMatrix:
    """A C x C int64 count matrix accumulated on ``device`` (rows = ground truth, cols = prediction).

    ``images`` counts the images seen by ``update``: an (N, H, W) update adds N, a 2-D (H, W) or
    1-D update adds 1.  For DDP, ``torch.distributed.all_reduce(cm.matrix)`` (or ``add`` of a
    gathered matrix) sums the per-process counts.
    """

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                  device=self.device)
        self.images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one batch: integer ``pred`` and ``label`` of the same (any) shape.

        Pixels whose label lies outside [0, C) are skipped; a prediction outside [0, C) anywhere
        is a ValueError (an argmax never produces one, so it means a wrong class count or map).
        One ``torch.bincount`` on the matrix's device; only the range check synchronises.
        """
        pred, label = torch.as_tensor(pred), torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError("ConfusionMatrix.update takes integer class maps, not logits or floats")
        images = pred.shape[0] if pred.dim() >= 3 else 1
        c = self.num_classes
        if pred.numel() == 0:
            self.images += images
            return
        # Move in the caller's dtype (uint8 maps cross to the GPU 8x cheaper than int64).
        pred = pred.reshape(-1).to(self.device)
        label = label.reshape(-1).to(self.device)
        if pred.dtype == torch.bool:
            pred = pred.to(torch.int32)
        low, high = torch.aminmax(pred)
        if bool((low < 0) | (high >= c)):  # the one host sync
            raise ValueError(f"predictions must lie in [0, {c}), got values in [{int(low)}, {int(high)}]")
        # Labels are clamped to [-1, c] and shifted by one row: rows 0 (negative labels) and c + 1
        # (labels >= c, 255 = ignore) are counted and dropped, so no boolean indexing is needed.
        # int32 arithmetic (c < 46000) halves the memory traffic of int64 on CPU and GPU.
        if label.dtype in (torch.int64, torch.int32):
            label = label.clamp(-1, c).to(torch.int32)
        else:
            label = label.to(torch.int32).clamp_(-1, c)
        index = torch.add(pred.to(torch.int32), label.add_(1), alpha=c)
        counts = torch.bincount(index, minlength=(c + 2) * c)[c:(c + 1) * c]
        self.matrix += counts.view(c, c)
        self.images += images

    def add(self, other: ConfusionMatrix | torch.Tensor | np.ndarray) -> ConfusionMatrix:
        """Add another matrix (a ConfusionMatrix also adds its image count); returns self."""
        counts = other.matrix if isinstance(other, ConfusionMatrix) else torch.as_tensor(other)
        if tuple(counts.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"cannot add a {tuple(counts.shape)} matrix to a "
                             f"{self.num_classes}x{self.num_classes} one")
        if counts.is_floating_point():
            raise TypeError("confusion matrices hold integer counts")
        self.matrix += counts.to(self.device, torch.int64)
        if isinstance(other, ConfusionMatrix):
            self.images += other.images
        return self

    def reset(self) -> None:
        self.matrix.zero_()
        self.images = 0

    def numpy(self) -> np.ndarray:
        """The counts as a CPU int64 array."""
        return self.matrix.detach().cpu().numpy().astype(np.int64)


def _counts(matrix: ConfusionMatrix | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, ConfusionMatrix):
        m = matrix.numpy()
    elif isinstance(matrix, torch.Tensor):
        m = matrix.detach().cpu().numpy()
    else:
        m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {m.shape}")
    return m.astype(np.float64)  # exact for counts below 2**53


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (no warning) when there is none."""
    values = np.asarray(values, np.float64)
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def iou(matrix) -> np.ndarray:
    """Per-class TP / (TP + FP + FN) as float64; NaN where the denominator is 0."""
    m = _counts(matrix)
    tp = np.diag(m)
    return _ratio(tp, m.sum(0) + m.sum(1) - tp)


def class_accuracy(matrix) -> np.ndarray:
    """Per-class recall TP / (TP + FN); NaN for classes absent from the ground truth."""
    m = _counts(matrix)
    return _ratio(np.diag(m), m.sum(1))


def pixel_accuracy(matrix) -> float:
    """Correct / counted pixels; NaN for an empty matrix."""
    m = _counts(matrix)
    total = m.sum()
    return float(np.trace(m) / total) if total > 0 else float("nan")


def summarize(matrix, class_names: Sequence[str],
              subsets: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Every score from one matrix, in percent (NaN where undefined).

    Returns ``{"mIoU", "mAcc", "pixel_acc", <one key per subset>, "pixels", "classes"}`` where a
    subset's value is the nanmean of the IoUs of its class indices, ``pixels`` the number of
    counted pixels and ``classes`` a list of per-class rows
    ``{"name", "iou", "acc", "gt_pixels", "pred_pixels"}``.
    """
    m = _counts(matrix)
    c = m.shape[0]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}x{c} confusion matrix")
    ious, accs = iou(m), class_accuracy(m)
    out: dict = {"mIoU": 100.0 * _nanmean(ious), "mAcc": 100.0 * _nanmean(accs),
                 "pixel_acc": 100.0 * pixel_accuracy(m)}
    for name, indices in (subsets or {}).items():
        if name in out or name in ("pixels", "classes"):
            raise ValueError(f"subset name '{name}' clashes with a summary key")
        idx = [int(i) for i in indices]
        if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= c:
            raise ValueError(f"subset '{name}': indices must be distinct and in [0, {c}), got {idx}")
        out[name] = 100.0 * _nanmean(ious[idx])
    out["pixels"] = int(m.sum())
    gt, pred = m.sum(1), m.sum(0)
    out["classes"] = [{"name": class_names[k], "iou": 100.0 * float(ious[k]),
                       "acc": 100.0 * float(accs[k]), "gt_pixels": int(gt[k]),
                       "pred_pixels": int(pred[k])} for k in range(c)]
    return out


def protocol_subsets(class_set_name: str, *, synthia_source: bool = False) -> dict[str, list[int]]:
    """The reduced-class means a protocol reports besides the full mIoU.

    - ``cityscapes19`` with ``synthia_source`` (a 19-class model trained on SYNTHIA, BlindNet
      style): ``mIoU16`` over the 16 SYNTHIA classes and ``mIoU13`` over the 13 of mIoU*;
    - ``synthia16`` (ADVENT / CPSL SYNTHIA models): ``mIoU13`` = the 16 minus wall, fence, pole;
    - anything else: no subsets.
    Indices are class positions in the model's own class set, in that set's order.
    """
    if class_set_name == CITYSCAPES19.name:
        if not synthia_source:
            return {}
        return {"mIoU16": sorted(CLASS_INDEX[n] for n in SYNTHIA16.names),
                "mIoU13": sorted(CLASS_INDEX[n] for n in SYNTHIA13.names)}
    if class_set_name == SYNTHIA16.name:
        return {"mIoU13": sorted(SYNTHIA16.names.index(n) for n in SYNTHIA13.names)}
    return {}
