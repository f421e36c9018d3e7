"""ResNet-18 variants of SCAN's official code: the CIFAR stem and the STL-10 stem."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ncd.errors import NcdError

#: Weight initialisations of :class:`ResNetSmallImages`: ``kaiming`` (SCAN's and UNO's
#: :func:`init_resnet_weights`) or ``torch`` (PyTorch's own layer defaults, which CLD's
#: ``models/resnet_cifar.py`` and NPID's ``models/resnet_cifar.py`` keep: they have no init loop).
INITS = ("kaiming", "torch")


def init_resnet_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, BatchNorm weight 1 and bias 0, as both SCAN's
    and UNO's small-image ResNets do (no zero-init of the residual BN)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class BasicBlock(nn.Module):
    """The standard two-conv residual block (expansion 1)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmallImages(nn.Module):
    """ResNet with a 3×3 stride-1 stem, for 32×32 (CIFAR) or 96×96 (STL-10) inputs.

    ``stem="cifar"``: no max-pool, adaptive average pool (SCAN's ``resnet_cifar``).
    ``stem="stl"``: MaxPool(2, 2, padding 1) after the stem and a fixed AvgPool(7) at the end,
    so inputs must be 96×96 (SCAN's ``resnet_stl``). ``init``: one of :data:`INITS`.
    """

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3,
                 stem: str = "cifar", *, init: str = "kaiming") -> None:
        super().__init__()
        if init not in INITS:
            raise NcdError(f"unknown ResNet init {init!r}; expected one of {', '.join(INITS)}")
        self.stem = stem
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(2, 2, padding=1) if stem == "stl" else nn.Identity()
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AvgPool2d(7, stride=1) if stem == "stl" else nn.AdaptiveAvgPool2d(1)
        if init == "kaiming":
            init_resnet_weights(self)
        # "torch": every layer keeps the init its constructor gave it (conv: kaiming_uniform with
        # a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm: weight 1, bias 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
