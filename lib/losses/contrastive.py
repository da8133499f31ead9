"""Pixel contrasts between two pixel-aligned views: BlindNet's class-wise contrast CWCL and semantic
disentanglement contrast SDCL (Ahn et al., CVPR 2024), as the released code (root0yang/BlindNet)
computes them.

Both work on one projection level at a time: q (B, D, h, w) are the unit-norm embeddings of the style
view x_a (anchors, with gradient), k those of the original view x (keys, detached by the caller), and
label y, prediction p (of x) and p_a (of x_a) are integer maps on the same (h, w) grid.  Samplers
take their randomness from a CPU ``torch.Generator`` and return pixel indices into the flattened
grid; the losses gather the embeddings and compute InfoNCE with the positive at index 0.

Our choices, flagged: where a set must yield more pixels than it holds (only at grids smaller than
the reference's 48x48 .. 192x192), the draw is with replacement; the random fill of unused class
slots draws all its pixels at once (distinct where possible).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lib.data.classes import IGNORE

CwclNegatives = Literal["as_executed", "intended"]


def _choose(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random entries of ``pool``: distinct while the pool lasts, with replacement beyond."""
    if count <= 0:
        return pool[:0]
    if count <= len(pool):
        return pool[torch.randperm(len(pool), generator=generator)[:count]]
    return pool[torch.randint(len(pool), (count,), generator=generator)]


def _gather(embedding: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) embeddings at flat pixel indices (B, M) -> (B, M, D) float32."""
    flat = embedding.float().flatten(2)
    return torch.gather(flat, 2, index.to(flat.device)[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


# --- CWCL ------------------------------------------------------------------------------------------

def class_wise_anchors(label: torch.Tensor, pred: torch.Tensor, max_classes: int, per_class: int,
                       negatives: CwclNegatives, generator: torch.Generator) -> torch.Tensor | None:
    """CWCL's sampled pixels: (B, max_classes·per_class) flat indices, slot s = positions
    [s·per_class, (s+1)·per_class), or None when no image of the batch has a valid class.

    Per image: the valid classes are the labelled ids with MORE than ``per_class`` pixels, at most
    ``max_classes`` of them in ascending id order.  Each gets ``per_class`` anchors, half hard
    (y = c, p != c) and half easy (y = c, p = c); when one kind has fewer than half, all of it is
    taken and the other kind fills up.  The remaining slots are filled with random pixels of any
    label, "excluding the pixels already sampled" in the ``intended`` variant; as executed that
    exclusion was a no-op (the inverted uint8 mask selected everything under PyTorch >= 1.2), so the
    fill may repeat pixels.
    """
    label, pred = label.cpu(), pred.cpu()
    n, h, w = label.shape
    slots = max_classes * per_class
    half = per_class // 2
    rows, any_valid = [], False
    for y, p in zip(label.flatten(1), pred.flatten(1)):
        counts = torch.bincount(y[y != IGNORE], minlength=1)
        classes = torch.nonzero(counts > per_class).flatten()[:max_classes].tolist()
        any_valid = any_valid or bool(classes)
        picks = []
        for c in classes:
            hard = torch.nonzero((y == c) & (p != c)).flatten()
            easy = torch.nonzero((y == c) & (p == c)).flatten()
            if len(hard) >= half and len(easy) >= half:
                n_hard = half
            elif len(hard) >= half:
                n_hard = per_class - len(easy)
            else:
                n_hard = len(hard)
            picks += [_choose(hard, n_hard, generator), _choose(easy, per_class - n_hard, generator)]
        taken = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
        pool = torch.arange(h * w)
        if negatives == "intended" and len(taken):
            free = torch.ones(h * w, dtype=torch.bool)
            free[taken] = False
            pool = pool[free] if free.any() else pool
        rows.append(torch.cat([taken, _choose(pool, slots - len(taken), generator)]))
    return torch.stack(rows) if any_valid else None


def class_wise_nce(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, per_class: int,
                   temperature: float, negatives: CwclNegatives) -> torch.Tensor:
    """CWCL on one level: mean over anchors m of
        -log( exp(q_m.k_m/T) / (exp(q_m.k_m/T) + sum_{n in Neg(m)} exp(q_m.k_n/T)) ),
    negatives from the same image only.  ``as_executed``: Neg(m) = all sampled keys of the image,
    k_m and same-class keys included (logit vector of length M + 1); ``intended``: the keys of the
    other slots.  ``k`` is used as given (the caller detaches it)."""
    anchors, keys = _gather(q, index), _gather(k, index)                       # (B, M, D)
    positive = (anchors * keys).sum(-1, keepdim=True)
    similarity = anchors @ keys.transpose(1, 2)                                 # (B, M, M)
    if negatives == "intended":
        slot = torch.arange(index.shape[1], device=similarity.device) // per_class
        similarity = similarity.masked_fill(slot[:, None] == slot[None, :], float("-inf"))
    logits = torch.cat([positive, similarity], dim=-1).flatten(0, 1) / temperature
    return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))


# --- SDCL ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DisentangleAnchors:
    """SDCL's anchors: image ``batch`` (A,), flat ``pixel`` (A,), and each anchor's negative pixels
    in the same image (A, K)."""

    batch: torch.Tensor
    pixel: torch.Tensor
    negatives: torch.Tensor


def vulnerable_pixels(label: torch.Tensor, pred: torch.Tensor, pred_a: torch.Tensor) -> torch.Tensor:
    """V = [p_a != p] & [y != 255] & [p = y]: right in the original view, wrong in the style view."""
    return (pred_a != pred) & (label != IGNORE) & (pred == label)


def disentangle_anchors(label: torch.Tensor, pred: torch.Tensor, pred_a: torch.Tensor, num_negatives: int,
                        max_anchors: int, generator: torch.Generator) -> DisentangleAnchors | None:
    """Per image and wrong class c of the style view (c in p_a over V): anchors V & [p_a = c], and
    ``num_negatives`` random pixels with y = c, one draw shared by the anchors of (image, c); c is
    skipped when fewer than ``num_negatives`` pixels have y = c.  Beyond ``max_anchors`` in total a
    random subset is kept (B·1000 in the reference).  None when there is no anchor."""
    label, pred, pred_a = label.cpu(), pred.cpu(), pred_a.cpu()
    vulnerable = vulnerable_pixels(label, pred, pred_a).flatten(1)
    batch, pixel, negatives = [], [], []
    for b, (v, y, wrong) in enumerate(zip(vulnerable, label.flatten(1), pred_a.flatten(1))):
        for c in torch.unique(wrong[v]).tolist():
            pool = torch.nonzero(y == c).flatten()
            if len(pool) < num_negatives:
                continue
            anchors = torch.nonzero(v & (wrong == c)).flatten()
            drawn = _choose(pool, num_negatives, generator)
            batch.append(torch.full_like(anchors, b))
            pixel.append(anchors)
            negatives.append(drawn.expand(len(anchors), -1))
    if not pixel:
        return None
    batch, pixel, negatives = torch.cat(batch), torch.cat(pixel), torch.cat(negatives)
    if len(pixel) > max_anchors:
        keep = torch.randperm(len(pixel), generator=generator)[:max_anchors]
        batch, pixel, negatives = batch[keep], pixel[keep], negatives[keep]
    return DisentangleAnchors(batch, pixel, negatives)


def disentangle_nce(q: torch.Tensor, k: torch.Tensor, anchors: DisentangleAnchors,
                    temperature: float) -> torch.Tensor:
    """SDCL on one level: mean over anchors of CE([q_m.k_m, q_m.q_n1 .. q_m.q_nK] / T, 0).  The
    positive is the same pixel of the original view, the negatives are genuine class-c pixels of
    the style view (q, with gradient)."""
    device = q.device
    flat_q = q.float().flatten(2).transpose(1, 2)                               # (B, hw, D)
    flat_k = k.float().flatten(2).transpose(1, 2)
    b, m, negatives = (t.to(device) for t in (anchors.batch, anchors.pixel, anchors.negatives))
    anchor = flat_q[b, m]
    positive = (anchor * flat_k[b, m]).sum(-1, keepdim=True)
    negative = torch.einsum("ad,akd->ak", anchor, flat_q[b[:, None], negatives])
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))
