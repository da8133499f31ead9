"""DeepLabV3+ at output stride 16, as RobustNet/BlindNet build it (the released code: shachoi/RobustNet,
root0yang/BlindNet)."""
from __future__ import annotations

import torch
from torch import nn

from lib.errors import ConfigError
from lib.models.backbone import build_backbone
from lib.models.base import SegModel
from lib.models.output import SegOutput, upsample
from lib.models.params import ModelParams


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Image pooling, a 1×1 and three atrous 3×3 branches (rates 6/12/18), each 256 channels +
    BN + ReLU, concatenated (1280) and projected to 256 (``bot_aspp``).

    The image-pooling branch applies BatchNorm to a 1×1 map, so in train mode it needs at least two
    images per batch; a batch of one is refused with a clear error rather than silently changing
    the released code's layer (BlindNet trains with several images per batch).  Eval mode works at any size.
    """

    RATES = (6, 12, 18)

    def __init__(self, in_ch: int, width: int = 256):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_ch, width, 1))
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, width, 1)] + [_conv_bn_relu(in_ch, width, 3, rate) for rate in self.RATES])
        self.project = _conv_bn_relu(width * (len(self.branches) + 1), width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            raise ConfigError("DeepLabV3+ cannot train on a batch of one image: its ASPP image-pooling "
                              "BatchNorm sees a single value per channel (use a batch size of at least 2)")
        pooled = upsample(self.image_pool(x), tuple(x.shape[-2:]))
        return self.project(torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1))


class DeepLabV3Plus(SegModel):
    """DeepLabV3+ "D16" (the released code's variant): layer4 dilated 2, ASPP on layer4, decoder at stride 4.

    Decoder: ``bot_fine`` (layer1 → 48) concatenated with the upsampled ASPP output gives ``dec0``
    (304 channels, ``features["decoder_input"]``); two 3×3 conv+BN+ReLU give ``dec1`` (256,
    ``features["embedding"]``); a 1×1 conv gives the logits.  The optional ``dsn`` aux head sits on
    layer3 (stride 16).  Heads are initialised Kaiming-normal (ReLU gain) with zero biases, BN γ=1
    β=0, as RobustNet's ``initialize_weights``.  ``params.instance_norm`` adds RobustNet's
    instance-normalisation layers to the backbone; their maps come back as the features
    ``instance_norm_stem``, ``instance_norm_layer1`` and ``instance_norm_layer2``.
    """

    def __init__(self, params: ModelParams, num_classes: int):
        backbone = build_backbone(params.depth, dilations=(1, 2), ceil_pool=False, bn=params.bn, style=params.style,
                                  instance_norm=params.instance_norm)
        super().__init__(params, num_classes, backbone)
        channels = backbone.channels
        self.aspp = ASPP(channels["layer4"])
        self.bot_fine = _conv_bn_relu(channels["layer1"], 48, 1)
        self.final1 = nn.Sequential(_conv_bn_relu(256 + 48, 256, 3), _conv_bn_relu(256, 256, 3))
        self.final2 = nn.Conv2d(256, num_classes, 1)
        self.dsn = nn.Sequential(
            nn.Conv2d(channels["layer3"], 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
            nn.Dropout2d(0.1), nn.Conv2d(512, num_classes, 1)) if params.aux else None
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("backbone."):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> SegOutput:
        features = self.backbone(x)
        fine = self.bot_fine(features["layer1"])
        coarse = upsample(self.aspp(features["layer4"]), tuple(fine.shape[-2:]))
        features["decoder_input"] = torch.cat([fine, coarse], dim=1)
        features["embedding"] = self.final1(features["decoder_input"])
        aux = self.dsn(features["layer3"]) if self.dsn is not None else None
        return SegOutput(logits=self.final2(features["embedding"]), aux_logits=aux, features=features)
