"""CycleGAN networks (Zhu et al., ICCV 2017), as the released code (junyanz/pytorch-CycleGAN-and-pix2pix)
builds them: the ResNet generator and the 70x70 PatchGAN discriminator.

Generator ``resnet_9blocks``: ReflPad3 -> 7x7 conv -> IN -> ReLU; two 3x3 stride-2 convs doubling the
channels; ``n_blocks`` residual blocks [ReflPad1, 3x3 conv, IN, ReLU, ReflPad1, 3x3 conv, IN] + skip;
two 3x3 stride-2 transposed convs halving them; ReflPad3 -> 7x7 conv -> tanh.  It is fully
convolutional and maps an (H, W) image with H, W multiples of 4 to an (H, W) image in [-1, 1].

Discriminator (PatchGAN, 3 layers): 4x4 convs with padding 1, 3 -> ndf (stride 2, no norm), then
ndf -> 2ndf -> 4ndf (stride 2) and 4ndf -> 8ndf (stride 1) with IN, LeakyReLU 0.2 throughout, and a
last 8ndf -> 1 conv (stride 1): one real/fake score per 70x70 input patch (30x30 scores for 256x256).

InstanceNorm has no affine parameters and no running statistics, so every conv keeps its bias.
Weights are initialised N(0, 0.02), biases 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lib.config import positive

INIT_STD = 0.02
DOWNSAMPLINGS = 2   # the generator's stride-2 stages: inputs must be multiples of 2**2
PATCH_LAYERS = 3    # the 70x70 PatchGAN


@dataclass(frozen=True)
class CycleGANModelParams:
    """Widths and depth of the four networks; the defaults are the reference resnet_9blocks / 70x70."""

    ngf: int = 64        # generator channels after the first conv
    ndf: int = 64        # discriminator channels after the first conv
    n_blocks: int = 9    # residual blocks of the generator

    def validate(self, where: str) -> None:
        positive(self.ngf, f"{where}.ngf")
        positive(self.ndf, f"{where}.ndf")
        positive(self.n_blocks, f"{where}.n_blocks")


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels))

    def forward(self, x):
        return x + self.body(x)   # no ReLU after the addition


class ResnetGenerator(nn.Module):
    def __init__(self, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), _norm(ngf), nn.ReLU(True)]
        channels = ngf
        for _ in range(DOWNSAMPLINGS):
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), _norm(channels * 2), nn.ReLU(True)]
            channels *= 2
        layers += [ResnetBlock(channels) for _ in range(n_blocks)]
        for _ in range(DOWNSAMPLINGS):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                       _norm(channels // 2), nn.ReLU(True)]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.net(x)


class PatchDiscriminator(nn.Module):
    def __init__(self, ndf: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, PATCH_LAYERS + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < PATCH_LAYERS else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1), _norm(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.net(x)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            nn.init.zeros_(m.bias)


def build_generator(params: CycleGANModelParams) -> ResnetGenerator:
    return ResnetGenerator(params.ngf, params.n_blocks)


def build_discriminator(params: CycleGANModelParams) -> PatchDiscriminator:
    return PatchDiscriminator(params.ndf)
