"""DeepLabV2 with the ADVENT/AdaptSegNet ASPP-sum classifier or the ProDA/CPSL head."""
from __future__ import annotations

import torch
from torch import nn

from lib.models.backbone import build_backbone
from lib.models.base import SegModel
from lib.models.output import SegOutput
from lib.models.params import ModelParams

ATROUS_RATES = (6, 12, 18, 24)


class AsppSum(nn.Module):
    """DeepLabV2's classifier, as in the released code (valeoai/ADVENT): four atrous 3×3 convs to class
    scores, summed.

    No concatenation, normalisation, activation or image pooling; weights N(0, 0.01), biases at
    PyTorch's default.  ``two_branch_compat`` reproduces AdaptSegNet's early ``return``: only the
    rate-6 and rate-12 branches count.  The other two still exist, so state dicts match, but never
    train (requires_grad off), as in AdaptSegNet where they never receive a gradient.
    """

    def __init__(self, in_ch: int, num_classes: int, two_branch_compat: bool = False):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=rate, dilation=rate) for rate in ATROUS_RATES)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
        self.used = 2 if two_branch_compat else len(ATROUS_RATES)
        for conv in self.branches[self.used:]:
            conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.branches[:self.used])


class SqueezeExcite(nn.Module):
    """Channel gate: global average pool, FC down by ``reduction``, ReLU, FC up, sigmoid, rescale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]


def _conv_gn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation),
        nn.GroupNorm(32, out_ch), nn.ReLU(inplace=True))


class CpslHead(nn.Module):
    """ProDA/CPSL ``Classifier_Module2`` (the released code: microsoft/ProDA, lslrh/CPSL).

    A 1×1 and four atrous 3×3 branches (rates 6/12/18/24) to 256 channels, each GroupNorm(32) +
    ReLU; concatenated (1280), SE-gated, fused by a 3×3 conv to 256 + GroupNorm(32) (no activation)
    and Dropout2d(0.1): that is ``feat``, the embedding prototypes and clustering use.  A bias-free
    1×1 conv gives the logits.  Every conv weight is N(0, 0.01); of the released code's convs only the
    classifier is known to be bias-free, so the other convs keep PyTorch's default bias.
    """

    def __init__(self, in_ch: int, num_classes: int, width: int = 256):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_gn_relu(in_ch, width, 1)]
            + [_conv_gn_relu(in_ch, width, 3, rate) for rate in ATROUS_RATES])
        fused = width * len(self.branches)
        self.se = SqueezeExcite(fused)
        self.fuse = nn.Sequential(nn.Conv2d(fused, width, 3, padding=1), nn.GroupNorm(32, width),
                                  nn.Dropout2d(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, feat)."""
        feat = self.fuse(self.se(torch.cat([branch(x) for branch in self.branches], dim=1)))
        return self.classifier(feat), feat


class DeepLabV2(SegModel):
    """DeepLabV2 as the released code of ADVENT and CPSL builds it: output stride 8, layer3/layer4
    dilated 2/4, ceil-mode max-pool; the main head on layer4, the optional aux head (ASPP sum) on layer3, both
    at stride 8.  ``output_stride: 16`` (our option for CPU runs) keeps layer3 strided and dilates
    layer4 by 2.  ``features["embedding"]`` is the last map before the classifier: the CPSL head's
    ``feat`` (256-d in the paper), or layer4 itself under ASPP sum, whose atrous convolutions are the
    classifier.  The latter is OUR CHOICE for running CPSL's prototype clustering on an ADVENT model
    (the synthetic default does: from scratch the ASPP model learns faster than the CPSL head).
    """

    def __init__(self, params: ModelParams, num_classes: int):
        dilations = (1, 2) if params.output_stride == 16 else (2, 4)
        backbone = build_backbone(params.depth, dilations=dilations, ceil_pool=True, bn=params.bn, style=params.style)
        super().__init__(params, num_classes, backbone)
        channels = backbone.channels
        compat = params.aspp_two_branch_compat
        if params.head == "cpsl":
            self.head = CpslHead(channels["layer4"], num_classes, params.head_width)
        else:
            self.head = AsppSum(channels["layer4"], num_classes, compat)
        self.aux_head = AsppSum(channels["layer3"], num_classes, compat) if params.aux else None
        self.extra_bn = nn.BatchNorm2d(channels["layer4"]) if params.extra_bn else None

    @property
    def embedding_channels(self) -> int:
        """Channels of ``features["embedding"]``."""
        if isinstance(self.head, CpslHead):
            return self.head.classifier.in_channels
        return self.backbone.channels["layer4"]

    def forward(self, x: torch.Tensor) -> SegOutput:
        features = self.backbone(x)
        if self.extra_bn is not None:
            features["layer4"] = self.extra_bn(features["layer4"])
        if isinstance(self.head, CpslHead):
            logits, features["embedding"] = self.head(features["layer4"])
        else:
            logits = self.head(features["layer4"])
            features["embedding"] = features["layer4"]
        aux = self.aux_head(features["layer3"]) if self.aux_head is not None else None
        return SegOutput(logits=logits, aux_logits=aux, features=features)
