"""CPSL's class-balanced self-labelling pieces (Li et al., CVPR 2022), as the released code
(lslrh/CPSL) computes them: Sinkhorn-Knopp with a class prior, prototype assignments, the FIFO
memory and the symmetric cross-entropy.

All functions are pure (no state) except :class:`FifoQueue`, a module whose buffers are
checkpointed so a resumed run sees the same memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib.data.classes import IGNORE


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, prior: torch.Tensor, epsilon: float = 0.05,
             iterations: int = 3) -> torch.Tensor:
    """Class-balanced Sinkhorn-Knopp (the released code's stage 1): (B, K) scores -> (B, K) soft assignments.

    M = exp(S / eps)^T normalised to sum 1; ``iterations`` times: rows (classes) rescaled to sum
    ``prior[k]`` (CPSL's class prior replaces SwAV's uniform 1/K), then columns (pixels) to 1/B;
    finally x B and transposed, so every pixel's assignment sums to 1.  The global max is
    subtracted before ``exp`` (it cancels in the first normalisation) so float32 never overflows.
    """
    scores = scores.float()
    m = torch.exp((scores - scores.max()) / epsilon).t()          # (K, B)
    m = m / m.sum()
    b = m.shape[1]
    prior = prior.to(m).reshape(-1, 1)
    for _ in range(iterations):
        m = m * (prior / m.sum(dim=1, keepdim=True).clamp_min(1e-30))
        m = m / (b * m.sum(dim=0, keepdim=True).clamp_min(1e-30))
    return (m * b).t()


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(f, C_k) for features (N, D, H, W) and prototypes (K, D): (N, K, H, W)."""
    f = F.normalize(features.float(), dim=1)
    c = F.normalize(prototypes.float(), dim=1)
    return torch.einsum("ndhw,kd->nkhw", f, c)


def prototype_weights(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_k = softmax_k(cos(f, C_k) / tau) (CPSL's rectification and structure loss): (N, K, H, W)."""
    return (cosine_scores(features, prototypes) / temperature).softmax(dim=1)


def rectify(soft: torch.Tensor, weights: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """CPSL's denoised label y = argmax_k w_k * p_k (as released): (N, H, W) int64.

    Pixels whose normalised maximum max(w p) / sum(w p) is below ``threshold`` become 255
    (CPSL's ``train_thred`` is 0: none are dropped).
    """
    product = weights * soft
    confidence, label = (product / product.sum(dim=1, keepdim=True).clamp_min(1e-12)).max(dim=1)
    return torch.where(confidence < threshold, torch.full_like(label, IGNORE), label)


def symmetric_ce(logits: torch.Tensor, label: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                 clamp: float = 1e-4) -> torch.Tensor:
    """alpha CE + beta RCE on valid pixels (CPSL's target loss), logits at the label's size.

    RCE = -sum_k p_k log clamp(onehot_k, clamp, 1) = -ln(clamp) (1 - p_y).
    """
    valid = label != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    logits = logits.float()
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE)
    prob = logits.softmax(dim=1)
    p_y = prob.gather(1, label.clamp_max(logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    rce = (-math.log(clamp) * (1.0 - p_y))[valid].mean()
    return alpha * ce + beta * rce


def consistency_kl(teacher_prob: torch.Tensor, student_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ProDA/CPSL structure loss (the released code): sum mask z (log z - log z') / sum mask.

    The mask spans (N, K, H, W), so the value is the per-pixel KL divided by K, as released.
    """
    mask = valid.unsqueeze(1).expand_as(teacher_prob).to(teacher_prob)
    if mask.sum() == 0:
        return student_logp.sum() * 0.0
    kl = teacher_prob * (teacher_prob.clamp_min(1e-12).log() - student_logp)
    return (kl * mask).sum() / mask.sum()


def self_labelling_loss(targets: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """-(1/B) sum_b sum_k q_bk log softmax(s_b / tau)_k (CPSL's L_SL)."""
    return -(targets * F.log_softmax(scores.float() / temperature, dim=1)).sum(dim=1).mean()


def queue_contrast(features: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor,
                   queue_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """CPSL's L_con, found only in the released code, for (B, D) normalised features with labels.

    l = f Q^T / tau shifted by the row max; per pixel with at least one positive,
    -mean_p [l_p - log(e^{l_p} + sum_negatives e^{l_n})]; averaged over those pixels.
    """
    keep = labels != IGNORE
    features, labels = features[keep], labels[keep]
    if features.numel() == 0:
        return queue.new_zeros(()).requires_grad_(False) + features.sum() * 0.0
    logits = features.float() @ queue.float().t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    positive = labels[:, None] == queue_labels[None, :]
    exp = logits.exp()
    negatives = (exp * (~positive)).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(exp + negatives)
    count = positive.sum(dim=1)
    has = count > 0
    if not has.any():
        return features.sum() * 0.0
    per_pixel = -(log_prob * positive).sum(dim=1)[has] / count[has]
    return per_pixel.mean()


class FifoQueue(nn.Module):
    """A zero-initialised FIFO memory of ``length`` rows, newest first, as CPSL's queues.

    ``full`` once its last row is non-zero, as CPSL tests it.  Buffers, so checkpoints carry it.
    """

    def __init__(self, length: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (length,) if dim == 0 else (length, dim)
        self.register_buffer("data", torch.zeros(shape, dtype=dtype))

    @property
    def full(self) -> bool:
        return bool((self.data[-1] != 0).any())

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(self.data)
        n = min(len(rows), len(self.data))
        self.data.copy_(torch.cat([rows[:n], self.data[: len(self.data) - n]]))
