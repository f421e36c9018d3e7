"""Backbones (torchvision, timm, SCAN's small-image ResNets, a small CNN) and heads."""

from __future__ import annotations

from torch import nn

from ncd.errors import NcdError
from ncd.models.cld import NormedLinear
from ncd.models.heads import ClusteringModel, ContrastiveModel
from ncd.models.resnet import ResNetSmallImages, init_resnet_weights
from ncd.models.small import SmallCNN
from ncd.models.sobel import ResNet18withSobel, normalized_fc

BACKBONES = ("small_cnn", "resnet18_cifar", "resnet18_stl", "resnet18_lowres", "resnet18", "resnet50", "timm:<name>",
             "sela_alexnet", "sela_resnetv2_50")


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
        # UNO's CIFAR encoder: torchvision ResNet-18, 3×3 stride-1 stem, no max-pool, re-initialised
        import torchvision

        m = torchvision.models.resnet18()
        m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
        m.fc = nn.Identity()
        init_resnet_weights(m)
        return m, 512
    if name in ("resnet18_cifar", "resnet18_stl"):
        return ResNetSmallImages(in_channels=in_channels, stem=name.split("_")[1]), 512
    if name in ("resnet18", "resnet50"):
        import torchvision

        weights = "DEFAULT" if pretrained else None
        m = getattr(torchvision.models, name)(weights=weights)
        if in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return m, dim
    if name == "sela_alexnet":
        from ncd.models.sela import SeLaAlexNet

        m = SeLaAlexNet(size=str(kwargs.get("size", "big")), in_channels=in_channels)
        return m, m.out_dim
    if name == "sela_resnetv2_50":
        from ncd.models.sela import sela_resnetv2_50

        return sela_resnetv2_50(in_channels, final_norm=bool(kwargs.get("final_norm", False)),
                                init=str(kwargs.get("init", "torch")))
    if name.startswith("timm:"):
        import timm

        try:
            m = timm.create_model(name[5:], pretrained=pretrained, num_classes=0, in_chans=in_channels)
        except RuntimeError as e:  # timm raises RuntimeError for unknown models
            raise NcdError(f"unknown timm backbone {name[5:]!r}: {e}") from e
        return m, m.num_features
    raise NcdError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "build_backbone", "model_from_arch", "ClusteringModel", "ContrastiveModel", "ResNetSmallImages", "SmallCNN",
           "ResNet18withSobel", "normalized_fc", "NormedLinear"]


def model_from_arch(arch: dict) -> nn.Module:
    """Rebuild the (untrained) model a checkpoint's ``arch`` block describes."""
    if arch["kind"] in ("superand", "twostage"):  # two trunks: not one backbone plus a head
        from ncd.models.sobel import sobel_model_from_arch

        return sobel_model_from_arch(arch)
    if arch["kind"] == "cld":  # CLD's pool_len changes the backbone itself
        from ncd.models.cld import cld_model_from_arch

        return cld_model_from_arch(arch)
    backbone, dim = build_backbone(arch["backbone"], arch["in_channels"], **arch.get("backbone_kwargs", {}))
    kind = arch["kind"]
    if kind == "contrastive":
        return ContrastiveModel(backbone, dim, head=arch.get("head", "mlp"), features_dim=arch.get("features_dim", 128))
    if kind == "clustering":
        return ClusteringModel(backbone, dim, arch["num_clusters"], arch.get("num_heads", 1))
    if kind == "uno":
        from ncd.models.uno import MultiHeadModel

        return MultiHeadModel(backbone, dim, arch["num_labeled"], arch.get("num_unlabeled", 0), arch.get("num_heads", 0),
                              arch.get("overcluster_factor", 3), arch.get("hidden_dim", 2048), arch.get("proj_dim", 256))
    if kind == "sela":
        from ncd.models.sela import SeLaModel

        return SeLaModel(backbone, dim, arch["num_heads"], arch["num_clusters"], arch["num_samples"],
                         head_init=arch.get("head_init", "default"))
    raise NcdError(f"checkpoint architecture kind {kind!r} has no model; expected 'contrastive', 'clustering', 'uno', 'sela', "
                   "'superand', 'twostage' or 'cld'")
