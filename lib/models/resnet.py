"""ResNet-18/50/101 (He et al., CVPR 2016: Table 1) in torchvision's module names and tensor shapes.

Written here so that building a model does not import torchvision, whose package import pulls in
``torch._dynamo`` (about 1.5–4 s per process, paid by every stage).  The modules are created and
initialised in torchvision's order (convs drawn as they are built, an ImageNet classifier drawn
and dropped, then He-normal fan-out on every conv), so under the same seed the weights are
torchvision's bit for bit and its state dicts load unchanged (tests/test_models.py checks both).
"""
from __future__ import annotations

import torch
from torch import nn

LAYERS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34)."""
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 (×4) with the stride on the 3×3 conv (ResNet v1.5)."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, width * 4, 1), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """Stem (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) and layer1..4; no classifier."""

    def __init__(self, depth: int):
        super().__init__()
        block = BasicBlock if depth == 18 else Bottleneck
        self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), LAYERS[depth])):
            stride = 1 if i == 0 else 2
            cout = width * block.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            stage = [block(cin, width, stride, downsample)] + [block(cout, width, 1, None) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        nn.Linear(cin, 1000)    # torchvision's classifier: drawn (and dropped) to keep its random stream
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
