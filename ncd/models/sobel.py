"""The two-stage classifier's network (Han et al., "Mitigating Embedding and Class Assignment
Mismatch in Unsupervised Image Classification", ECCV 2020; METHODS.md 6.2) and its fixed,
normalised multi-head class assignment (6.4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ncd.errors import NcdError
from ncd.models.backbones import build_backbone
from ncd.ops.init import npid_memory_init
from ncd.ops.normalized import l2_normalize, normalized_fc

__all__ = ["ResNet18withSobel", "SuperANDModel", "TwoStageModel", "normalized_fc", "sobel_model_from_arch"]

_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def _default_init(module: nn.Module) -> None:
    """PyTorch's own initialisation for every convolution: the official network builds its
    layers without a custom init, whereas the shared CIFAR ResNet applies Kaiming-normal."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()


class ResNet18withSobel(nn.Module):
    """Two independent trunks, one on the image and one on a fixed grayscale → Sobel-x/y input,
    concatenated → ``Linear(2·dim → low_dim)`` → L2 normalisation (the official
    ``ResNet18withSobel``).

    The trunks come from :func:`ncd.models.build_backbone` (``resnet18_cifar`` by default: 3×3 stem,
    no max-pool, global average pool, 512-d), so the default has 22,468,312 parameters of which
    the 24 of the grayscale 1×1 convolution and the Sobel 3×3 convolution (weights and biases)
    are frozen. ``backbone="small_cnn"`` gives the small CPU variant used on digits.
    """

    def __init__(self, low_dim: int = 128, in_channels: int = 3, backbone: str = "resnet18_cifar",
                 backbone_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if int(low_dim) < 1:
            raise NcdError(f"low_dim must be >= 1, got {low_dim}")
        kw = dict(backbone_kwargs or {})
        self.trunk, dim = build_backbone(backbone, in_channels, **kw)
        self.trunk_sobel, dim_sobel = build_backbone(backbone, 2, **kw)
        _default_init(self.trunk)
        _default_init(self.trunk_sobel)
        grayscale = nn.Conv2d(in_channels, 1, kernel_size=1)
        sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        with torch.no_grad():
            grayscale.weight.fill_(1.0 / in_channels)
            grayscale.bias.zero_()
            sobel.weight[0, 0].copy_(torch.tensor(_SOBEL_X))
            sobel.weight[1, 0].copy_(torch.tensor(_SOBEL_Y))
            sobel.bias.zero_()
        self.sobel = nn.Sequential(grayscale, sobel)
        for p in self.sobel.parameters():
            p.requires_grad_(False)
        self.linear = nn.Linear(dim + dim_sobel, int(low_dim))
        self.low_dim = int(low_dim)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([self.trunk(x), self.trunk_sobel(self.sobel(x))], dim=1)
        return l2_normalize(self.linear(out))  # the official Normalize: x / ||x||, no epsilon


class SuperANDModel(nn.Module):
    """Stage 1: the encoder and Super-AND's memory bank (one 128-d row per training image),
    kept in a buffer so that both travel in one checkpoint."""

    def __init__(self, encoder: ResNet18withSobel, memory_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        # NonParametricClassifier's initialisation: uniform in [-s, s], s = 1/sqrt(d/3)
        self.register_buffer("memory", npid_memory_init(int(memory_size), encoder.low_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class TwoStageModel(nn.Module):
    """Stage 2: the encoder and ``num_heads`` fixed heads drawn from N(0, 1) (``Multi_head_fc``);
    the head weights are a buffer, so no optimiser ever sees them. ``forward`` returns the heads'
    probabilities ``[H, B, C]``."""

    def __init__(self, encoder: ResNet18withSobel, num_classes: int, num_heads: int = 5,
                 head_temperature: float = 0.1, normalize: str = "row") -> None:
        super().__init__()
        if int(num_heads) < 1 or int(num_classes) < 1:
            raise NcdError(f"num_heads and num_classes must be >= 1, got {num_heads} and {num_classes}")
        self.encoder = encoder
        self.head_temperature, self.normalize = float(head_temperature), normalize
        self.register_buffer("head_weights", torch.randn(int(num_heads), encoder.low_dim, int(num_classes)))

    def heads(self, features: Tensor) -> Tensor:
        return torch.stack([normalized_fc(features, w, self.head_temperature, self.normalize)
                            for w in self.head_weights])

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.encoder(x))


def sobel_model_from_arch(arch: dict[str, Any]) -> nn.Module:
    """The (untrained) stage-1 or stage-2 model an ``arch`` block of kind superand/twostage describes."""
    enc = ResNet18withSobel(int(arch.get("low_dim", 128)), int(arch["in_channels"]), arch["backbone"],
                            arch.get("backbone_kwargs", {}))
    if arch["kind"] == "superand":
        return SuperANDModel(enc, int(arch["memory_size"]))
    if arch["kind"] == "twostage":
        return TwoStageModel(enc, int(arch["num_classes"]), int(arch["num_heads"]),
                             float(arch.get("head_temperature", 0.1)), arch.get("normalize", "row"))
    raise NcdError(f"architecture kind {arch['kind']!r} is not a two-stage model; expected 'superand' or 'twostage'")
