"""What every segmenter shares: a ResNet backbone, heads, and the backbone/head parameter split."""
from __future__ import annotations

from torch import nn

from lib.models.backbone import ResNetBackbone
from lib.models.params import ModelParams


class SegModel(nn.Module):
    """A ``backbone`` plus heads; every other submodule counts as head.

    The split matches the LR groups of the methods' released code (e.g. valeoai/ADVENT, lslrh/CPSL):
    the backbone at the base LR, the heads at a multiple of it.
    """

    def __init__(self, params: ModelParams, num_classes: int, backbone: ResNetBackbone):
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.backbone = backbone

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("backbone.")]
