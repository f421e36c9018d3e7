"""Backbones (torchvision, timm, SCAN's small-image ResNets, a small CNN) and heads, and the
registry of architectures a checkpoint's ``arch`` block is rebuilt from."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ncd.errors import NcdError
from ncd.models.backbones import BACKBONES, build_backbone
from ncd.models.cld import NormedLinear, cld_model_from_arch
from ncd.models.heads import ClusteringModel, ContrastiveModel
from ncd.models.resnet import ResNetSmallImages
from ncd.models.sela import SeLaModel
from ncd.models.small import SmallCNN
from ncd.models.sobel import ResNet18withSobel, normalized_fc, sobel_model_from_arch
from ncd.models.uno import MultiHeadModel

__all__ = ["ARCHITECTURES", "BACKBONES", "build_backbone", "model_from_arch", "register_architecture",
           "ClusteringModel", "ContrastiveModel", "ResNetSmallImages", "SmallCNN", "ResNet18withSobel",
           "normalized_fc", "NormedLinear"]


def _backbone(arch: dict) -> tuple[nn.Module, int]:
    return build_backbone(arch["backbone"], arch["in_channels"], **arch.get("backbone_kwargs", {}))


def _contrastive(arch: dict) -> nn.Module:
    return ContrastiveModel(*_backbone(arch), head=arch.get("head", "mlp"), features_dim=arch.get("features_dim", 128))


def _clustering(arch: dict) -> nn.Module:
    return ClusteringModel(*_backbone(arch), arch["num_clusters"], arch.get("num_heads", 1))


def _uno(arch: dict) -> nn.Module:
    return MultiHeadModel(*_backbone(arch), arch["num_labeled"], arch.get("num_unlabeled", 0), arch.get("num_heads", 0),
                          arch.get("overcluster_factor", 3), arch.get("hidden_dim", 2048), arch.get("proj_dim", 256))


def _sela(arch: dict) -> nn.Module:
    return SeLaModel(*_backbone(arch), arch["num_heads"], arch["num_clusters"], arch["num_samples"],
                     head_init=arch.get("head_init", "default"))


#: kind → builder of the (untrained) model a checkpoint's ``arch`` block describes. superand and
#: twostage have two trunks and cld's ``pool_len`` changes the backbone itself: their builders
#: read the backbone from the block themselves.
ARCHITECTURES: dict[str, Callable[[dict], nn.Module]] = {
    "contrastive": _contrastive,
    "clustering": _clustering,
    "uno": _uno,
    "sela": _sela,
    "superand": sobel_model_from_arch,
    "twostage": sobel_model_from_arch,
    "cld": cld_model_from_arch,
}


def register_architecture(kind: str, builder: Callable[[dict], nn.Module]) -> None:
    """Make :func:`model_from_arch` rebuild ``arch`` blocks of ``kind`` with ``builder(arch)``.

    A method module registers its own kind at import; registering the same builder again is a
    no-op, another builder for a known kind raises :class:`NcdError`.
    """
    if not isinstance(kind, str) or not kind:
        raise NcdError(f"architecture kind must be a non-empty string, got {kind!r}")
    if not callable(builder):
        raise NcdError(f"the builder for architecture kind {kind!r} must be callable, got {type(builder).__name__}")
    known = ARCHITECTURES.get(kind)
    if known is not None and known is not builder:
        raise NcdError(f"architecture kind {kind!r} is already registered (to {getattr(known, '__qualname__', known)!r}); "
                       "expected a new kind")
    ARCHITECTURES[kind] = builder


def _known_kinds() -> str:
    kinds = [repr(k) for k in ARCHITECTURES]
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def model_from_arch(arch: dict) -> nn.Module:
    """Rebuild the (untrained) model a checkpoint's ``arch`` block describes."""
    kind = arch["kind"]
    builder = ARCHITECTURES.get(kind)
    if builder is None:
        raise NcdError(f"checkpoint architecture kind {kind!r} has no model; expected {_known_kinds()}")
    return builder(arch)
