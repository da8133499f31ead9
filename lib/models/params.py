"""The ``model`` block of a recipe: which segmenter to build (its initialisation is the row's ``from``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lib.errors import ConfigError


@dataclass(frozen=True)
class ModelParams:
    """Architecture of the segmentation network.

    - ``arch``: DeepLabV2 as the released code of ADVENT and CPSL builds it (valeoai/ADVENT,
      lslrh/CPSL), or DeepLabV3+ as BlindNet's (root0yang/BlindNet).
    - ``depth``: ResNet 18, 50 or 101 (lib.models.resnet: torchvision's names and initialisation).
    - ``bn``: backbone BatchNorm mode, see :class:`lib.models.backbone.ResNetBackbone`.
    - ``aux``: auxiliary head on layer3.
    - ``head``: DeepLabV2 classifier: ``aspp_sum`` (ADVENT/AdaptSegNet) or ``cpsl`` (ProDA/CPSL).
    - ``aspp_two_branch_compat``: sum only the rate-6 and rate-12 branches, AdaptSegNet's bug.
    - ``extra_bn``: CPSL's ``bn_pretrain``, a BatchNorm over layer4's output before the heads, used
      to renormalise SimCLR backbone features (the released code, lslrh/CPSL); it trains with the
      heads.
    - ``instance_norm``: ``none``, ``in`` (instance normalisation without affine after the stem and
      at the end of layer1 and layer2: BlindNet and RobustNet IW/IRW/ISW) or ``in_affine`` (the same
      with a learnable affine: RobustNet's "IBN" baseline); DeepLabV3+ only (as in the released
      code of BlindNet and RobustNet; :class:`lib.models.backbone.ResNetBackbone`).
    - ``output_stride``: DeepLabV2's stride, 8 (the papers: layer3/layer4 dilated 2/4) or 16 (layer4
      dilated 2, layer3 strided: about 0.4x the step time of a ResNet-18, bench/README.md); null
      keeps the architecture's own (DeepLabV2 8, DeepLabV3+ 16, the only one it has).
    - ``head_width``: channels of the CPSL head's branches and embedding (256 in CPSL; a multiple
      of 32 for its GroupNorm).  Our synthetic default narrows it, which is our choice: at 256 the
      head costs more than the ResNet-18 backbone on a CPU.
    """

    arch: Literal["deeplabv2", "deeplabv3plus"] = "deeplabv2"
    depth: Literal[18, 50, 101] = 101
    style: Literal["torchvision", "caffe"] = "torchvision"
    bn: Literal["batch", "frozen_affine", "frozen"] = "frozen_affine"
    aux: bool = True
    head: Literal["aspp_sum", "cpsl"] = "aspp_sum"
    aspp_two_branch_compat: bool = False
    extra_bn: bool = False
    head_width: int = 256
    output_stride: Literal[8, 16] | None = None
    instance_norm: Literal["none", "in", "in_affine"] = "none"

    def validate(self, where: str) -> None:
        if self.style == "caffe" and self.depth == 18:
            raise ConfigError(f"params: {where}.style 'caffe' (stride on a block's first 1x1 conv) exists for "
                              "depth 50 or 101, the Bottleneck ResNets")
        if self.instance_norm != "none" and self.arch != "deeplabv3plus":
            raise ConfigError(f"params: {where}.instance_norm = {self.instance_norm!r} exists for arch "
                              f"'deeplabv3plus' only (got arch {self.arch!r})")
        if self.head == "cpsl" and self.arch != "deeplabv2":
            raise ConfigError(f"params: {where}.head = 'cpsl' exists for arch 'deeplabv2' only "
                              f"(got arch {self.arch!r})")
        if self.head_width < 32 or self.head_width % 32:
            raise ConfigError(f"params: {where}.head_width must be a positive multiple of 32 (GroupNorm(32)), "
                              f"got {self.head_width}")
        if self.output_stride == 8 and self.arch == "deeplabv3plus":
            raise ConfigError(f"params: {where}.output_stride 8 exists for arch 'deeplabv2' only "
                              "(DeepLabV3+ runs at 16; null keeps an architecture's own)")
        if self.extra_bn and self.arch != "deeplabv2":
            raise ConfigError(f"params: {where}.extra_bn exists for arch 'deeplabv2' only (got {self.arch!r})")
        if self.aspp_two_branch_compat and (self.arch != "deeplabv2" or self.head != "aspp_sum"):
            raise ConfigError(f"params: {where}.aspp_two_branch_compat needs arch 'deeplabv2' with "
                              f"head 'aspp_sum' (got arch {self.arch!r}, head {self.head!r})")
