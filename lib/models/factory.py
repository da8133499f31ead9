"""Build the segmenter a ``ModelParams`` describes."""
from __future__ import annotations

from lib.models.base import SegModel
from lib.models.deeplabv2 import DeepLabV2
from lib.models.deeplabv3plus import DeepLabV3Plus
from lib.models.params import ModelParams

_ARCHS = {"deeplabv2": DeepLabV2, "deeplabv3plus": DeepLabV3Plus}


def build_model(params: ModelParams, num_classes: int) -> SegModel:
    """The model in train mode, backbone weights loaded offline (never downloaded)."""
    params.validate("model")  # params built in code skip the parser's check
    return _ARCHS[params.arch](params, num_classes)
