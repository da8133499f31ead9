"""Dilated ResNet encoders for DeepLab, and their offline weight loading.

Two layouts (``style``).  ``torchvision``: ResNet v1.5, a stage's stride on the 3×3 conv of its first
block.  ``caffe``: the DeepLab ResNets of ADVENT, AdaptSegNet and CPSL (the released code:
valeoai/ADVENT, wasidennis/AdaptSegNet, lslrh/CPSL), Caffe-style ResNet v1 with the stride on the
first 1×1 conv, the layout the Caffe-converted ``DeepLab_resnet_pretrained_*`` files were trained in
(lib.models.weights).  Both have the same tensor names and shapes and the same output sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib.errors import ConfigError, DataError
from lib.models.resnet import Bottleneck, ResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")
# Where RobustNet/BlindNet put instance normalisation (the released code's ``--wt_layer 0 0 1 1 1 0 0``),
# as the SegOutput feature names of the normalised, pre-ReLU maps.
INSTANCE_NORM_FEATURES = ("instance_norm_stem", "instance_norm_layer1", "instance_norm_layer2")


class ResNetBackbone(nn.Module):
    """ResNet stem and layer1..4, with layer3/layer4 optionally dilated instead of strided.

    ``dilations`` gives the dilation of (layer3, layer4); 1 keeps the stage strided.  A dilated stage
    has stride 1 and dilation = padding = d on the 3×3 conv of *every* block, as DeepLab does
    (torchvision's own ``replace_stride_with_dilation`` keeps the previous rate in the first block
    and refuses BasicBlocks, so it is not used).  ``ceil_pool`` is DeepLabV2's ceil-mode max-pool
    (a 512×1024 input gives 65×129 at stride 8).

    BatchNorm modes (``bn``; backbone BN layers only):

    - ``batch``: ordinary trainable BN.
    - ``frozen_affine``: γ and β never train, but BN still normalises with batch statistics and
      updates its running statistics in train mode: ADVENT/AdaptSegNet (their released code).
    - ``frozen``: γ and β never train and BN stays in eval mode (running statistics) even after
      ``train()``.

    Instance normalisation (``instance_norm``; the IN slots 2-4 of RobustNet's released code):

    - ``none``: the plain ResNet.
    - ``in``: the stem's BN is replaced by InstanceNorm2d(64, affine=False), and the last block of
      layer1 and of layer2 applies InstanceNorm2d(affine=False) to its residual sum, before its
      final ReLU (BlindNet; RobustNet IW / IRW / ISW).  No running statistics: the same per-image
      normalisation in train and eval mode.
    - ``in_affine``: the same three layers with a learnable affine (RobustNet's "IBN" baseline).
      The stem IN keeps the name ``bn1``, so ImageNet's stem γ/β load into it, as RobustNet's
      name-and-shape loader does; the two block INs start at γ = 1, β = 0.

    The three normalised maps (pre-ReLU) are returned as ``INSTANCE_NORM_FEATURES``.
    """

    def __init__(self, depth: int, dilations: tuple[int, int], ceil_pool: bool, bn: str,
                 instance_norm: str = "none", style: str = "torchvision"):
        super().__init__()
        net = ResNet(depth)
        # Same attribute names as torchvision, so its state-dict keys load unchanged.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.maxpool.ceil_mode = ceil_pool
        self.style = style
        if style == "caffe":
            for stage in (self.layer2, self.layer3, self.layer4):
                _stride_on_the_first_1x1(stage[0])
        self.output_stride = 32
        for stage, dilation in zip((self.layer3, self.layer4), dilations):
            if dilation > 1:
                _dilate(stage, dilation)
                self.output_stride //= 2
        width = 1 if depth == 18 else 4  # BasicBlock vs Bottleneck expansion
        self.channels = {"stem": 64, "layer1": 64 * width, "layer2": 128 * width,
                         "layer3": 256 * width, "layer4": 512 * width}
        self.instance_norm = instance_norm
        self.instance_norms = nn.ModuleDict()   # stage -> IN on its last block's residual sum
        if instance_norm != "none":
            affine = instance_norm == "in_affine"
            self.bn1 = nn.InstanceNorm2d(64, affine=affine)
            for stage in ("layer1", "layer2"):
                self.instance_norms[stage] = nn.InstanceNorm2d(self.channels[stage], affine=affine)
        self.bn_mode = bn
        if bn != "batch":
            for norm in self._norms():
                norm.weight.requires_grad_(False)
                norm.bias.requires_grad_(False)
        self.train()  # puts frozen BN in eval mode from the start

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        if self.bn_mode == "frozen":
            for norm in self._norms():
                norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.instance_norm == "none":
            stem = self.relu(self.bn1(self.conv1(x)))
            features = {"stem": stem}
        else:
            normed = self.bn1(self.conv1(x))
            stem = torch.relu(normed)   # not in place: the pre-ReLU map is kept as a feature
            features = {"instance_norm_stem": normed, "stem": stem}
        x = self.maxpool(stem)
        for name in STAGES:
            stage = getattr(self, name)
            if name in self.instance_norms:
                normed = self.instance_norms[name](residual_sum(stage[-1], stage[:-1](x)))
                features[f"instance_norm_{name}"] = normed
                x = torch.relu(normed)
            else:
                x = stage(x)
            features[name] = x
        return features


def residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A BasicBlock / Bottleneck (lib.models.resnet) up to its residual addition (its output before the
    final ReLU), where RobustNet's blocks apply their instance normalisation."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + identity


def _stride_on_the_first_1x1(block: nn.Module) -> None:
    """Caffe's ResNet v1 (the DeepLab-v2 initialisation): a stage's stride on the first 1×1 conv of its
    first block instead of torchvision's 3×3.  The same tensors, another placement of the stride."""
    if not isinstance(block, Bottleneck):
        raise ConfigError("the caffe ResNet layout exists for Bottleneck ResNets (depth 50 or 101)")
    block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """Trade the stage's stride for atrous 3×3 convs, so it keeps its input resolution."""
    for conv in stage.modules():
        if isinstance(conv, nn.Conv2d):
            conv.stride = (1, 1)  # only the first block's 3×3 conv and its shortcut had stride 2
            if conv.kernel_size == (3, 3):
                conv.dilation = (dilation, dilation)
                conv.padding = (dilation, dilation)


def build_backbone(depth: int, dilations: tuple[int, int], ceil_pool: bool, bn: str,
                   instance_norm: str = "none", style: str = "torchvision") -> ResNetBackbone:
    """A randomly initialised backbone; pretrained weights are laid on later (lib.models.weights)."""
    return ResNetBackbone(depth, dilations, ceil_pool, bn, instance_norm, style)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch weights file, loaded with ``weights_only=True``.

    The file may hold the dict itself or wrap it under ``state_dict`` or ``model``, and keys may
    carry DataParallel's ``module.`` prefix (removed here)."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many exception types on a bad file
        raise DataError(f"{path}: not a readable PyTorch weights file ({type(err).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_state(backbone: ResNetBackbone, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a backbone state dict in torchvision's names strictly; ``fc.*`` (the ImageNet
    classifier) is ignored.  With instance normalisation, the stem BN's entries the stem IN has no
    place for (running statistics; γ/β without affine) are dropped and the block INs
    (``instance_norms.*``) keep their initialisation (the released code, root0yang/BlindNet, drops the
    pretrained bn1 affine parameters too)."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    if backbone.instance_norm != "none":
        state = {k: v for k, v in state.items() if k in expected or not k.startswith("bn1.")}
    # Old torchvision files predate BN's num_batches_tracked; BN fills it in itself.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith("instance_norms.")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [f"{what} {_first(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes for", mismatched)) if keys]
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")
    backbone.load_state_dict(state, strict=False)


def _first(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
