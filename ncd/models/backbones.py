"""The backbone registry: a name → ``(module mapping images to flat features, feature dim)``."""

from __future__ import annotations

from torch import nn

from ncd.errors import NcdError
from ncd.models.resnet import ResNetSmallImages, init_resnet_weights
from ncd.models.sela import SeLaAlexNet, sela_resnetv2_50
from ncd.models.small import SmallCNN

__all__ = ["BACKBONES", "build_backbone"]

BACKBONES = ("small_cnn", "resnet18_cifar", "resnet18_stl", "resnet18_lowres", "resnet18", "resnet50", "timm:<name>",
             "sela_alexnet", "sela_resnetv2_50")


def _resnet18_lowres(in_channels: int) -> tuple[nn.Module, int]:
    """UNO's CIFAR encoder: torchvision ResNet-18, 3×3 stride-1 stem, no max-pool, re-initialised."""
    import torchvision  # here: the small CNN and SCAN's ResNets need none of it

    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    init_resnet_weights(m)
    return m, 512


def _torchvision_resnet(name: str, in_channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    import torchvision

    weights = "DEFAULT" if pretrained else None
    m = getattr(torchvision.models, name)(weights=weights)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def _timm_model(name: str, in_channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    import timm  # loaded lazily: a heavy import (seconds) that only timm backbones need

    try:
        m = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels)
    except RuntimeError as e:  # timm raises RuntimeError for unknown models
        raise NcdError(f"unknown timm backbone {name!r}: {e}") from e
    return m, m.num_features


def build_backbone(name: str, in_channels: int = 3, pretrained: bool = False, **kwargs) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``; the backbone maps images to flat features.

    ``resnet18_cifar`` / ``resnet18_stl``: SCAN's ResNet-18 variants (1.2); ``resnet18`` /
    ``resnet50``: torchvision with ``fc = Identity``; ``small_cnn``: the CPU default;
    ``timm:<model>``: any timm model by name, classifier removed.
    """
    if name == "small_cnn":
        m = SmallCNN(in_channels, width=int(kwargs.get("width", 64)), pool=int(kwargs.get("pool", 2)))
        return m, m.out_dim
    if name == "resnet18_lowres":
        return _resnet18_lowres(in_channels)
    if name in ("resnet18_cifar", "resnet18_stl"):
        # init: "kaiming" (SCAN's) or "torch" (PyTorch's layer defaults, CLD's CIFAR ResNet)
        return ResNetSmallImages(in_channels=in_channels, stem=name.split("_")[1],
                                 init=kwargs.get("init", "kaiming")), 512
    if name in ("resnet18", "resnet50"):
        return _torchvision_resnet(name, in_channels, pretrained)
    if name == "sela_alexnet":
        m = SeLaAlexNet(size=str(kwargs.get("size", "big")), in_channels=in_channels)
        return m, m.out_dim
    if name == "sela_resnetv2_50":
        return sela_resnetv2_50(in_channels, final_norm=bool(kwargs.get("final_norm", False)),
                                init=str(kwargs.get("init", "torch")))
    if name.startswith("timm:"):
        return _timm_model(name[5:], in_channels, pretrained)
    raise NcdError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
