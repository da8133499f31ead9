"""Category- and instance-level alignment of BAFFT (Yuan et al., IEEE TIP 2022): pure functions plus
the ring-buffer memory.

Vocabulary, as in the released code (HibiscusYB/BAFFT): *stuff* classes are aligned through one
pooled feature per class and image (a prototype), *thing* classes through one pooled feature per
connected region (an instance).  Features are the backbone's layer4 maps, D channels: 2048 for
ResNet-101 as in the paper, 512 for ResNet-18.  Every "/2048" of the released code is written "/D"
here, so the normalisations equal the original's for R101 and scale with the feature dimension
otherwise.  "Code version A" is an early step-2 script of the released code with its own ISIA/AIM.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as label_components
from torch import nn

from lib.data.classes import CITYSCAPES19, CLASS_SETS, IGNORE, ClassSet
from lib.errors import ConfigError

# Stuff and thing classes of the released code (HibiscusYB/BAFFT), 19-class train IDs
STUFF_19 = (0, 1, 2, 3, 4, 8, 9, 10)                     # road .. fence, vegetation, terrain, sky
THING_19 = (5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)     # pole, light, sign, person .. bicycle
STUFF_NAMES = frozenset(CITYSCAPES19.names[c] for c in STUFF_19)


# --- class split -----------------------------------------------------------------------------

def stuff_and_things(class_set: ClassSet) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The split above carried over to another protocol by class name (e.g. SYNTHIA's 16 classes)."""
    stuff = tuple(i for i, name in enumerate(class_set.names) if name in STUFF_NAMES)
    things = tuple(i for i, name in enumerate(class_set.names) if name not in STUFF_NAMES)
    return stuff, things


def check_split(stuff: Sequence[int], things: Sequence[int], num_classes: int, where: str) -> None:
    """Stuff and thing train IDs must be distinct classes of the model's ``num_classes``."""
    for name, ids in (("stuff_classes", stuff), ("thing_classes", things)):
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad or len(set(ids)) != len(ids):
            hint = "".join(f"; for {cs.name} use stuff_classes {list(stuff_and_things(cs)[0])}, "
                           f"thing_classes {list(stuff_and_things(cs)[1])}"
                           for cs in CLASS_SETS.values() if cs.num_classes == num_classes)
            raise ConfigError(f"params: {where}.{name} = {list(ids)} must be distinct train IDs "
                              f"below {num_classes}{hint}")
    both = sorted(set(stuff) & set(things))
    if both:
        raise ConfigError(f"params: {where}: classes {both} are both stuff and thing")


# --- regions ---------------------------------------------------------------------------------

def resize_labels(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) train IDs -> (N, h, w), nearest neighbour (255 stays 255)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


def correct_prediction_mask(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The released code's correct-prediction mask M: the ground truth brought to the logits' grid,
    kept where it equals argmax P, 255 elsewhere.  (N, C, h, w), (N, H, W) -> (N, h, w)."""
    label = resize_labels(label, tuple(logits.shape[-2:]))
    return torch.where(label == logits.argmax(dim=1), label, torch.full_like(label, IGNORE))


def connected_components(mask: np.ndarray, top_k: int, connectivity: int = 2) -> np.ndarray:
    """The ``top_k`` largest connected regions of a boolean (h, w) mask, largest first.

    ``connectivity`` 2 is 8-connectivity (diagonal neighbours join), as the released code calls
    ``skimage.measure.label``; ties in size keep scikit-image's raster order.  Returns (k, h, w) bool.
    """
    labelled, count = label_components(mask, connectivity=connectivity, return_num=True, background=0)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    largest = np.argsort(-sizes, kind="stable")[:top_k] + 1
    return labelled[None] == largest[:, None, None]


def stuff_regions(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """One region per class present in the (h, w) label map: (K, h, w) masks and their classes."""
    present = [c for c in classes if (labels == c).any()]
    return labels[None] == np.asarray(present, dtype=labels.dtype).reshape(-1, 1, 1), present


def thing_regions(labels: np.ndarray, classes: Sequence[int], top_k: int) -> tuple[np.ndarray, list[int]]:
    """Instances: the ``top_k`` largest 8-connected regions of each class, (K, h, w) and classes."""
    masks, owners = [np.zeros((0, *labels.shape), bool)], []
    for c in classes:
        if (labels == c).any():
            components = connected_components(labels == c, top_k)
            masks.append(components)
            owners += [c] * len(components)
    return np.concatenate(masks), owners


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """v = Σ f·m / max(Σ m, 1e-12) for each mask (as released): features (D, *S), masks (K, *S) -> (K, D).

    The spatial shape S may include a batch axis (pooling over several images at once)."""
    m = masks.flatten(1).to(features.dtype)
    total = m @ features.flatten(1).T
    return total.float() / m.sum(dim=1, keepdim=True).float().clamp(min=1e-12)


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class centroids of a batch, c_i of the paper's L_ISIA: features (N, D, h, w), labels (N, h, w) ->
    (C, D) centroids (0 for absent classes) and the (C,) mask of classes present."""
    masks = labels[None] == torch.arange(num_classes, device=labels.device).view(-1, 1, 1, 1)
    return masked_average_pool(features.transpose(0, 1), masks), masks.flatten(1).any(dim=1)


# --- the memory ------------------------------------------------------------------------------

class RingBank(nn.Module):
    """Per-class ring buffers of detached source features (as released: 50 slots per
    stuff class, 500 per thing class).

    A write goes to slot ``writes mod capacity``, then ``writes`` grows by one; a class is used
    for matching only once it has had more than ``capacity`` writes (``ready``), as the released
    code tests ``ptr > capacity``.  The storage and counters are buffers, so a checkpoint of the
    method holds them and a resumed run continues bit for bit.
    """

    def __init__(self, classes: Sequence[int], capacity: int, dim: int):
        super().__init__()
        self.classes = tuple(classes)
        self.capacity = capacity
        self.row = {c: i for i, c in enumerate(self.classes)}
        self.register_buffer("storage", torch.zeros(len(self.classes), capacity, dim))
        self.register_buffer("writes", torch.zeros(len(self.classes), dtype=torch.long))

    def write(self, cls: int, vectors: torch.Tensor) -> None:
        """Append (K, D) vectors of class ``cls`` in order (only the last ``capacity`` can survive)."""
        row, count = self.row[cls], len(vectors)
        kept = vectors[-self.capacity:]
        first = self.writes[row] + (count - len(kept))
        slots = (first + torch.arange(len(kept), device=self.writes.device)) % self.capacity
        self.storage[row].index_copy_(0, slots, kept.detach().to(self.storage.dtype))
        self.writes[row] += count

    def ready_classes(self) -> set[int]:
        """Classes with more than ``capacity`` writes (one device sync)."""
        return {c for c, n in zip(self.classes, self.writes.tolist()) if n > self.capacity}

    def ready(self, cls: int) -> bool:
        return cls in self.ready_classes()

    def entries(self, cls: int) -> torch.Tensor:
        """(capacity, D) stored vectors of ``cls``."""
        return self.storage[self.row[cls]]


# --- matching ---------------------------------------------------------------------------------

def mean_abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a, b) = (1/D) Σ_k |a_k - b_k| (as released), over the last axis."""
    return (a - b).abs().mean(dim=-1)


def nearest_distance(queries: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """min_j d(v, bank_j) for each of the (K, D) queries against (S, D) entries -> (K,)."""
    dim = queries.shape[-1]
    return torch.cdist(queries.float()[None], entries.float()[None], p=1)[0].min(dim=1).values / dim


def self_weighted(distance: torch.Tensor) -> torch.Tensor:
    """AIM's self-weighting of code version A: the weight of a match is its own distance, not detached,
    so the term is d² and its gradient 2·d·∇d."""
    return distance * distance


def head_logits(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's logits; the CPSL head returns (logits, feat)."""
    out = head(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def classifier_agrees(head: nn.Module, vectors: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """The released code's classifier-agreement gate: argmax head(v) == c with v fed as a 1x1 map (so an
    atrous head uses only its centre taps).  (K, D), K classes -> (K,) bool.

    The head runs in eval mode (our choice: only the CPSL head's dropout is affected; the ASPP
    classifier of the original has none)."""
    if len(vectors) == 0:
        return torch.zeros(0, dtype=torch.bool, device=vectors.device)
    was_training = head.training
    head.eval()
    try:
        logits = head_logits(head, vectors[:, :, None, None]).flatten(1)
    finally:
        head.train(was_training)
    return logits.argmax(dim=1) == torch.as_tensor(list(classes), device=logits.device)


# --- ISIA (the paper's terms, in our form) ----------------------------------------------------

def rescaled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D_sim = (1 + cos)/2 in [0, 1] for every pair of rows: (A, D), (B, D) -> (A, B)."""
    return 0.5 * (1.0 + F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T)


def isia_intra(source: torch.Tensor, target: torch.Tensor, source_present: torch.Tensor,
               target_present: torch.Tensor) -> torch.Tensor:
    """Intra-class aggregation Σ_i d(c_s,i, c_t,i) over classes present in both domains
    (mean-absolute d, our choice; the paper's ‖·‖₁ up to the 1/D normalisation)."""
    both = source_present & target_present
    return mean_abs_distance(source[both].float(), target[both].float()).sum()


def isia_separation(source: torch.Tensor, target: torch.Tensor, source_present: torch.Tensor,
                    target_present: torch.Tensor) -> torch.Tensor:
    """Inter-class separation Σ_i Σ_{k≠i} (1 + cos(c_s,i, c_t,k))/2 over present classes (the paper's
    L_ISIA)."""
    s_ids, t_ids = source_present.nonzero()[:, 0], target_present.nonzero()[:, 0]
    similarity = rescaled_cosine(source[s_ids], target[t_ids])
    return (similarity * (s_ids[:, None] != t_ids[None, :])).sum()


# --- code version A of the released code, for comparison only ----------------------------------

def version_a_same(p_s: torch.Tensor, p_t: torch.Tensor, dim: int) -> torch.Tensor:
    """L_same = Σ_c Σ_x |p_s^c(x) - p_t^c(x)| / D on softmax maps of one grid, pixel-aligned
    across two unrelated images, as released; averaged over the image pairs."""
    return (p_s.float() - p_t.float()).abs().sum(dim=(1, 2, 3)).mean() / dim


def version_a_diff(p_s: torch.Tensor, p_t: torch.Tensor, dim: int) -> torch.Tensor:
    """L_diff = Σ_{i≠j} mean_x (0.5 + 0.5·cos(p_s^i(x), p_t^j(x))) / D with the cosine taken over
    a singleton axis, exactly as released: it is 1 wherever both probabilities exceed the cosine's
    eps, so the term is ≈ C(C-1)/D with essentially no gradient."""
    classes = p_s.shape[1]
    cos = F.cosine_similarity(p_s.float()[:, :, None, None], p_t.float()[:, None, :, None], dim=3)
    pairs = ~torch.eye(classes, dtype=torch.bool, device=p_s.device)
    per_pair = (0.5 + 0.5 * cos).mean(dim=(3, 4))                  # (N, C, C)
    return (per_pair * pairs).sum(dim=(1, 2)).mean() / dim


def version_a_separation(stuff: torch.Tensor, instances: torch.Tensor, instance_classes: Sequence[int],
                         dim: int) -> torch.Tensor:
    """L_sep = Σ_{c stuff} Σ_{k thing} (1/n_k) Σ_r 500·(0.5 + 0.5·cos(v^c, v^r))/D on target
    features of one image (version A): stuff centroids (B, D), instances (R, D) of the given classes."""
    if len(stuff) == 0 or len(instances) == 0:
        return stuff.new_zeros((), dtype=torch.float32)
    similarity = rescaled_cosine(stuff, instances)                 # (B, R)
    owners = torch.as_tensor(list(instance_classes), device=similarity.device)
    per_class = [similarity[:, owners == k].mean(dim=1) for k in owners.unique()]
    return 500.0 * torch.stack(per_class, dim=1).sum() / dim
