"""Covariance of instance-normalised feature maps: BlindNet's covariance alignment (Ahn et al., CVPR
2024) and RobustNet's instance whitening losses IW / IRW / ISW (Choi et al., CVPR 2021), as the
released code (root0yang/BlindNet, shachoi/RobustNet) computes them.

For an instance-normalised map F (C channels, HW pixels, zero mean and unit variance per channel and
image) the covariance Sigma(F) = F F^T / (HW - 1) + eps I is essentially a correlation matrix: its
diagonal is HW/(HW - 1) (+ eps), its off-diagonal entries carry the image's "style".  Everything is
computed per image in float32 (bf16 autocast would round the sums).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-5


def _flat(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, HW) in float32."""
    return f.float().flatten(2)


def covariance(f: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Sigma(F) = F F^T / (HW - 1) + eps I per image: (B, C, C)."""
    with torch.autocast(f.device.type, enabled=False):
        x = _flat(f)
        eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
        return x @ x.transpose(1, 2) / (x.shape[-1] - 1) + eps * eye


def covariance_matching_loss(f: torch.Tensor, f_a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CML_i = mean over all B·C·C entries of (sg[Sigma(F)] - Sigma(F_a))^2: the style view's
    covariance is aligned to the original view's, diagonal included; F gets no gradient."""
    return F.mse_loss(covariance(f_a, eps), covariance(f.detach(), eps))


def cross_covariance_loss(f: torch.Tensor, f_a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """CCL_i = 1/B sum_b mean_c (diag Sigma(sg[F_b], F_a,b)_c - 1)^2: each channel's correlation
    across the two views is pushed to 1; F gets no gradient."""
    with torch.autocast(f_a.device.type, enabled=False):
        x, x_a = _flat(f.detach()), _flat(f_a)
        diagonal = (x * x_a).sum(-1) / (x.shape[-1] - 1) + eps
        return (diagonal - 1.0).square().mean()


# --- RobustNet ----------------------------------------------------------------------------------

def strict_upper(channels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(C, C) bool: the C(C-1)/2 off-diagonal pairs i < j (IW and IRW's selection)."""
    return torch.ones(channels, channels, dtype=torch.bool, device=device).triu(diagonal=1)


def relaxed_margin(channels: int, relax_denom: float) -> float:
    """IRW's margin: floor(C(C-1)/2 / relax_denom) (``--relax_denom 64``)."""
    return float(math.floor(channels * (channels - 1) / 2 / relax_denom))


def whitening_loss(f: torch.Tensor, mask: torch.Tensor, margin: float = 0.0, eps: float = EPS) -> torch.Tensor:
    """mean_b max(0, (sum_ij M_ij |Sigma_b,ij| - margin) / |M|): the selected covariance entries are
    driven to 0.  IW: M = strict upper triangle, margin 0; IRW: the same with IRW's margin; ISW: the
    style-sensitive entries.  An empty selection gives 0."""
    count = int(mask.sum())
    cov = covariance(f, eps)
    if count == 0:
        return cov.sum() * 0.0
    selected = (cov.abs() * mask.to(cov.dtype)).sum(dim=(1, 2))
    return ((selected - margin) / count).clamp(min=0.0).mean()


def view_variance(f: torch.Tensor, f_b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """ISW's statistic summed over the batch: for every strict-upper entry, the unbiased variance
    of the two views' covariances, (a - b)^2 / 2; zeros elsewhere.  (C, C) float32."""
    with torch.autocast(f.device.type, enabled=False):
        difference = covariance(f, eps) - covariance(f_b, eps)
        upper = strict_upper(difference.shape[-1], difference.device)
        return (difference.square() / 2).sum(0) * upper


def sensitive_mask(variance: torch.Tensor, clusters: int) -> torch.Tensor:
    """ISW's selection from the mean view variance V (C, C) of one trial: the C^2 entries are clustered
    by exact 1-D k-means; the entries outside the lowest-centroid cluster count as style-sensitive,
    and the mask marks that many largest entries of V.  (C, C) bool on V's device."""
    values = variance.detach().double().cpu().numpy().ravel()
    labels, centroids = kmeans_1d(values, clusters)
    count = int((labels != int(np.argmin(centroids))).sum())
    order = np.argsort(-values, kind="stable")[:count]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return torch.from_numpy(mask.reshape(variance.shape)).to(variance.device)


def kmeans_1d(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal (least within-cluster squared error) k-means of 1-D data: (labels, centroids).

    The optimal clusters are contiguous runs of the sorted values, so a dynamic programme over
    prefix sums finds them exactly:  D_k(m) = min_{j<m} D_{k-1}(j) + SSE(j, m).  Its argmin is
    non-decreasing in m, which a divide and conquer per cluster count exploits, evaluated breadth
    first so that every level of the recursion is one vectorised numpy pass (O(k n log n)).
    Labels number the clusters in increasing order of their centroid; k is capped at n.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value")
    k = max(1, min(int(k), n))
    order = np.argsort(x, kind="stable")
    s = x[order]
    s1 = np.concatenate([[0.0], np.cumsum(s)])
    s2 = np.concatenate([[0.0], np.cumsum(s * s)])

    def sse(j: np.ndarray, m: np.ndarray) -> np.ndarray:   # values s[j:m], j < m
        total = s1[m] - s1[j]
        return np.maximum(s2[m] - s2[j] - total * total / (m - j), 0.0)

    positions = np.arange(n + 1)
    cost = np.full(n + 1, np.inf)
    cost[1:] = sse(np.zeros(n, dtype=np.int64), positions[1:])
    starts = []                          # starts[c][m]: where the last of c + 2 clusters of s[:m] begins
    for c in range(2, k + 1):
        new_cost, start = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.int64)
        lo, hi = np.array([c]), np.array([n])                 # rows m to solve
        opt_lo, opt_hi = np.array([c - 1]), np.array([n - 1])  # their admissible argmin range
        while lo.size:
            mid = (lo + hi) // 2
            last = np.minimum(mid - 1, opt_hi)
            lengths = last - opt_lo + 1
            row = np.repeat(np.arange(mid.size), lengths)
            j = opt_lo[row] + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            value = cost[j] + sse(j, mid[row])
            first = np.cumsum(lengths) - lengths
            best = np.minimum.reduceat(value, first)
            hit = np.flatnonzero(value <= best[row])
            _, first_hit = np.unique(row[hit], return_index=True)
            arg = j[hit[first_hit]]
            new_cost[mid], start[mid] = best, arg
            left, right = lo <= mid - 1, mid + 1 <= hi
            lo, hi, opt_lo, opt_hi = (np.concatenate([lo[left], mid[right] + 1]),
                                      np.concatenate([mid[left] - 1, hi[right]]),
                                      np.concatenate([opt_lo[left], arg[right]]),
                                      np.concatenate([arg[left], opt_hi[right]]))
        cost = new_cost
        starts.append(start)
    bounds = [n]
    for start in reversed(starts):
        bounds.append(int(start[bounds[-1]]))
    bounds.append(0)
    bounds = bounds[::-1]
    sorted_labels = np.repeat(np.arange(k), np.diff(bounds))
    centroids = np.array([s[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    labels = np.empty(n, dtype=np.int64)
    labels[order] = sorted_labels
    return labels, centroids
