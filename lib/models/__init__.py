"""Segmentation networks: DeepLabV2 (ADVENT/AdaptSegNet, CPSL) and DeepLabV3+ (BlindNet)."""
from lib.models.base import SegModel
from lib.models.factory import build_model
from lib.models.output import SegOutput, upsample
from lib.models.params import ModelParams

__all__ = ["ModelParams", "SegModel", "SegOutput", "build_model", "upsample"]
