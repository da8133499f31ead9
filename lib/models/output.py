"""The one output structure every segmentation model returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SegOutput:
    """What a forward pass returns; methods take what they need, models never know which method runs.

    - ``logits``: (N, C, h, w) at the head's own stride (8 for DeepLabV2, 4 for DeepLabV3+);
      ``upsample`` brings them to a label size.
    - ``aux_logits``: the auxiliary head on layer3 (same C, stride of layer3), or None.
    - ``features``: intermediate maps by name: ``stem`` (after the stem's ReLU, before max-pool),
      ``layer1`` .. ``layer4`` (encoder stages), ``embedding`` (the last feature map before the
      classifier: DeepLabV3+'s decoder output ``dec1``, the CPSL head's 256-d ``feat``) and, for
      DeepLabV3+, ``decoder_input`` (``dec0``, the 304-channel concatenation).  With
      ``model.instance_norm`` (DeepLabV3+), also ``instance_norm_stem`` (64 ch, stride 2),
      ``instance_norm_layer1`` and ``instance_norm_layer2`` (strides 4 and 8): the instance-normalised
      maps before their ReLU, BlindNet's encoder features F^i and RobustNet's whitening inputs.
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached(self) -> "SegOutput":
        """The same maps cut from the graph (a discriminator's step must not reach the generator)."""
        return SegOutput(self.logits.detach(),
                         None if self.aux_logits is None else self.aux_logits.detach(),
                         {name: f.detach() for name, f in self.features.items()})


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True, as ADVENT, CPSL and BlindNet all evaluate."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
