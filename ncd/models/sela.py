"""SeLa's networks (Asano et al., ICLR 2020; official ``models/alexnet.py`` and ``models/resnetv2.py``;
METHODS.md 2.2): the AlexNet with BatchNorm after every conv, the pre-activation ResNet-50 built from
timm's ``resnetv2_50``, and the model with ``hc`` linear heads that carries the label matrix."""

from __future__ import annotations

import math

import torch
from torch import nn

from ncd.errors import NcdError

__all__ = ["SeLaAlexNet", "sela_resnetv2_50", "SeLaModel", "ALEXNET_WIDTHS"]

#: conv widths of the five conv layers: "big" (the paper's) and "small"
ALEXNET_WIDTHS = {"big": (96, 256, 384, 384, 256), "small": (64, 192, 384, 256, 256)}
# (kernel, stride, padding) of the five convs; a 3/2 max-pool follows convs 1, 2 and 5
_ALEXNET_CONVS = ((11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))


class SeLaAlexNet(nn.Module):
    """AlexNet as in DeepCluster/SeLa: conv-BN-ReLU ×5 (convs keep their bias) with max-pools after
    conv 1, 2 and 5 (224 → 256×6×6), then Dropout 0.5 → Linear(9216, 4096) → ReLU → Dropout 0.5 →
    Linear(4096, 4096) → ReLU. Returns the 4096-d features (the heads sit on top, :class:`SeLaModel`).

    Init (``_initialize_weights``): conv weights N(0, √(2 / (k² · out_channels))), BatchNorm weight 1
    and bias 0, linear weights N(0, 0.01), every bias 0.
    """

    out_dim = 4096

    def __init__(self, size: str = "big", in_channels: int = 3) -> None:
        super().__init__()
        if size not in ALEXNET_WIDTHS:
            raise NcdError(f"unknown AlexNet size {size!r}; expected one of {', '.join(ALEXNET_WIDTHS)}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, (width, (k, s, p)) in enumerate(zip(ALEXNET_WIDTHS[size], _ALEXNET_CONVS)):
            layers += [nn.Conv2d(c_in, width, k, s, p), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
        )
        sela_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[1:] != (256, 6, 6):
            raise NcdError(f"SeLa's AlexNet needs 224x224 inputs (conv5 output 256x6x6), got conv5 output "
                           f"{tuple(x.shape[1:])}")
        return self.classifier(torch.flatten(x, 1))


def sela_init(module: nn.Module) -> None:
    """The AlexNet init of the official code (applied to every conv, BatchNorm and linear layer)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def sela_resnetv2_50(in_channels: int = 3, final_norm: bool = False, init: str = "torch") -> tuple[nn.Module, int]:
    """timm's pre-activation ``resnetv2_50`` (7×7/2 stem without norm, 3/2 max-pool, bottlenecks
    [3, 4, 6, 3] with the stride in the 3×3 conv, 1×1 projection shortcuts on the pre-activated input)
    returning the 2048-d average-pooled features.

    Where timm and SeLa's ``resnetv2`` differ, the defaults take SeLa's side:

    * ``final_norm=False``: timm ends with BatchNorm + ReLU after the last block; SeLa's network has
      none (its features are the raw residual sums, pooled), so timm's ``norm`` becomes Identity.
    * ``init="torch"``: SeLa's network keeps PyTorch's default initialisation; timm re-initialises
      convs (Kaiming normal, fan-out). ``init="timm"`` keeps timm's.
    """
    import timm  # loaded lazily: a heavy import (seconds) that only this backbone needs

    if init not in ("torch", "timm"):
        raise NcdError(f"resnetv2_50 init must be 'torch' (SeLa's) or 'timm', got {init!r}")
    m = timm.create_model("resnetv2_50", pretrained=False, num_classes=0, in_chans=in_channels)
    if not final_norm:
        m.norm = nn.Identity()
    if init == "torch":
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                mod.reset_parameters()
    return m, m.num_features


class SeLaModel(nn.Module):
    """Backbone → ``num_heads`` linear heads ``Linear(dim → K)`` (no hidden layer, no normalisation).

    ``labels`` (buffer, int64 ``[num_heads, num_samples]``) is SeLa's label matrix ``L``: it travels in
    every checkpoint, so a resumed run trains against the same self-labels. ``head_init="sela"`` gives
    the heads the AlexNet init (N(0, 0.01), zero bias, as the official AlexNet), ``"default"`` PyTorch's.
    """

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_heads: int, num_clusters: int,
                 num_samples: int, head_init: str = "default") -> None:
        super().__init__()
        if num_heads < 1 or num_clusters < 1 or num_samples < 1:
            raise NcdError(f"SeLaModel needs num_heads, num_clusters, num_samples >= 1, got "
                           f"{num_heads}, {num_clusters}, {num_samples}")
        if head_init not in ("sela", "default"):
            raise NcdError(f"head_init must be 'sela' or 'default', got {head_init!r}")
        self.backbone = backbone
        self.backbone_dim, self.num_heads, self.num_clusters = backbone_dim, num_heads, num_clusters
        self.heads = nn.ModuleList([nn.Linear(backbone_dim, num_clusters) for _ in range(num_heads)])
        if head_init == "sela":
            for h in self.heads:
                nn.init.normal_(h.weight, 0.0, 0.01)
                nn.init.zeros_(h.bias)
        self.register_buffer("labels", torch.zeros(num_heads, num_samples, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[H, B, K]``."""
        return self.head_logits(self.backbone(x))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(features) for h in self.heads])

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return f, self.head_logits(f)
