"""Source images restyled by target images as they are loaded: CISS's paired samples and CPSL's
random Lab style.

**CISS** (the released code, SysCV/CISS): each training sample also carries a stylized copy.

Draw k of the source stream and draw k of the target stream form a pair.  The source image is
restyled by the target's full image and the target by the source's (FDA or Reinhard, on the full
0..255 images, before any crop), and the copy rides through the stream's transforms as a continuous
map aligned with the image: the original and the stylized view share resize, crop (rare-class
re-crops included) and flip.  A sample holds ``image`` and ``image_stylized``, both normalised the
same way.

Each stream finds its partner's row for draw k by asking the partner's sampler for its draw k (every
sampler is a pure function of (seed, k), lib.data.sampling), so the two streams stay separate loaders
that agree on the pairs without talking to each other.  Source and target therefore need one batch
size.  Our choice: a style image of another size is resized to the content's (bilinear) before FDA;
CISS centre-crops both to one 1024x1920 canvas first (any equal-size resize works).
FDA's output is not clipped (CISS); Reinhard's is.

**CPSL** (Li et al., CVPR 2022, its GTA5 loader): every time a source image is loaded it is restyled
by a Cityscapes training image drawn at random, matching mean and std per CIE-Lab channel
(:class:`RestyledSource`).  The style image of draw k is drawn from (seed, k), so a resumed run sees
the same styles.  Our choice: the restyled image is rounded to 8 bits, as the stylize stage's cached
copies are.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data.dataset import PreparedDataset
from lib.data.sampling import Draw
from lib.stylize.transfer import Transfer

STYLIZED = "image_stylized"
STYLE_DRAWS = 0x5717E       # keys the style image's generator apart from the draw's augmentation


def stylize(content: np.ndarray, style: np.ndarray, transfer: Transfer) -> np.ndarray:
    """(H, W, 3) 0..255 content restyled by a (h, w, 3) style image -> (H, W, 3) float32, unclipped for FDA."""
    def as_batch(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()

    return transfer(as_batch(content), as_batch(style))[0].permute(1, 2, 0).numpy()


class StylizedPairs(Dataset):
    """The samples of ``content`` with ``image_stylized``: restyled by the full image that ``partner``
    (the other stream's dataset) holds at the row its sampler ``partner_draws`` draws at the same k."""

    def __init__(self, content: PreparedDataset, partner: PreparedDataset,
                 partner_draws: Callable[[int], Iterator[Draw]], transfer: Transfer,
                 normalize: tuple[Sequence[float], Sequence[float]]):
        self.content, self.partner, self.partner_draws, self.transfer = content, partner, partner_draws, transfer
        self.seed = content.seed
        self.mean = torch.tensor(normalize[0], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(normalize[1], dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.content)

    def partner_row(self, k: int) -> int:
        return next(self.partner_draws(k)).index

    def __getitem__(self, draw: Draw) -> dict:
        sample = self.content.load(draw.index)
        style = self.partner.load(self.partner_row(draw.k))["image"]
        sample[STYLIZED] = stylize(sample["image"], style, self.transfer)
        # the stream's transforms crop and flip the copy with the image; their final Normalize only
        # turns a continuous map into a (3, H, W) tensor, so the copy is normalised here
        sample = self.content.augment(sample, draw)
        sample[STYLIZED] = (sample[STYLIZED] / 255.0 - self.mean) / self.std
        return sample


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class RestyledSource(Dataset):
    """The samples of ``content``, each image restyled (before its transforms) by the full image of
    a row of ``style`` drawn uniformly with the generator of (seed, k, STYLE_DRAWS)."""

    def __init__(self, content: PreparedDataset, style: PreparedDataset, transfer: Transfer):
        self.content, self.style, self.transfer = content, style, transfer
        self.seed = content.seed

    def __len__(self) -> int:
        return len(self.content)

    def style_row(self, k: int) -> int:
        return int(np.random.default_rng([self.seed, k, STYLE_DRAWS]).integers(len(self.style)))

    def __getitem__(self, draw: Draw) -> dict:
        sample = self.content.load(draw.index)
        style = self.style.load(self.style_row(draw.k))["image"]
        sample["image"] = to_uint8(stylize(sample["image"], style, self.transfer))
        return self.content.augment(sample, draw)
