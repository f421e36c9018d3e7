"""CLD's models (METHODS.md 5.2): a backbone forked into an instance head and a group head.

* CIFAR: SCAN's small-image ResNet-18 (3×3 stem, no max-pool) with CLD's ``pool_len`` average
  pool, two heads 512 → 128 (``Linear`` or :class:`NormedLinear`), each followed by L2 norm.
* ImageNet, MoCo v2 + CLD: torchvision's ResNet-50, a shared ``Linear(2048, 2048) + ReLU``
  and the two heads 2048 → 128.
* ImageNet, InfoMin + CLD: the same, plus InfoMin's jigsaw head (:class:`JigsawHead`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.models.backbones import build_backbone

HEADS = ("linear", "normlinear")


class NormedLinear(nn.Module):
    r"""Cosine layer: :math:`y_j = \frac{x}{\lVert x\rVert}\cdot\frac{W_{:,j}}{\lVert W_{:,j}\rVert}`.

    CLD's ``NormedLinear`` (``--normlinear``; "NormLinear"/"NormMLP" in its README): weight
    ``[in_features, out_features]``, no bias; initialised uniform in [-1, 1], then every column
    rescaled to unit norm (irrelevant to the output, which normalises anyway).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise NcdError(f"NormedLinear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.in_features, self.out_features))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def projection(kind: str, in_features: int, out_features: int) -> nn.Module:
    """``nn.Linear`` (with bias) for ``linear``, :class:`NormedLinear` for ``normlinear``."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "normlinear":
        return NormedLinear(in_features, out_features)
    raise NcdError(f"unknown CLD head {kind!r}; expected one of {', '.join(HEADS)}")


class JigsawHead(nn.Module):
    """InfoMin's jigsaw head (PIRL): every patch through ``fc1``, the ``k`` patches of an image
    shuffled, concatenated and mapped by ``fc2`` to one L2-normalised feature per image.

    ``kind`` is InfoMin's head name: ``linear`` (fc1 one Linear), ``mlp`` (Linear, ReLU, Linear)
    or ``normmlp`` (Linear, ReLU, NormedLinear; fc2 NormedLinear too).
    """

    def __init__(self, dim_in: int, dim_out: int, kind: str = "mlp", k: int = 9) -> None:
        super().__init__()
        last = NormedLinear if "norm" in kind else nn.Linear
        if kind == "linear":
            self.fc1: nn.Module = nn.Linear(dim_in, dim_out)
        elif kind in ("mlp", "normmlp"):
            self.fc1 = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), last(dim_in, dim_out))
        else:
            raise NcdError(f"unknown jigsaw head {kind!r}; expected 'linear', 'mlp' or 'normmlp'")
        self.fc2 = last(dim_out * k, dim_out)
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.k:
            raise NcdError(f"jigsaw input has {x.shape[0]} patches; expected a multiple of {self.k}")
        n = x.shape[0] // self.k
        x = self.fc1(x)
        # a fresh patch order per image, as the official head draws it on every call
        order = torch.argsort(torch.rand(n, self.k, device=x.device), dim=1)
        order = order + torch.arange(n, device=x.device)[:, None] * self.k
        x = x[order.reshape(-1)].reshape(n, -1)
        return F.normalize(self.fc2(x), dim=1)


class CLDModel(nn.Module):
    """Backbone → optional shared MLP (``Linear(d, d) + ReLU``) → instance head and group head,
    each followed by L2 normalisation; optionally InfoMin's jigsaw head on the backbone.

    ``forward(x, two_branch=True)`` returns ``(instance, group)`` features; with
    ``two_branch=False`` only the instance feature (what kNN, the key encoder and the memory
    see). ``forward_jigsaw(patches)`` maps ``[n·9, C, h, w]`` patches to ``[n, low_dim]``.
    """

    def __init__(self, backbone: nn.Module, backbone_dim: int, low_dim: int = 128, head: str = "linear",
                 mlp: bool = False, jigsaw: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = backbone_dim
        self.mlp = nn.Sequential(nn.Linear(backbone_dim, backbone_dim), nn.ReLU(inplace=True)) if mlp else nn.Identity()
        self.inst_head = projection(head, backbone_dim, low_dim)
        self.group_head = projection(head, backbone_dim, low_dim)
        self.jigsaw_head = None
        if jigsaw:
            kind = ("normmlp" if head == "normlinear" else "mlp") if mlp else "linear"
            self.jigsaw_head = JigsawHead(backbone_dim, low_dim, kind)

    def forward(self, x: Tensor, two_branch: bool = True) -> Tensor | tuple[Tensor, Tensor]:
        h = self.mlp(self.backbone(x))
        inst = F.normalize(self.inst_head(h), dim=1)
        if not two_branch:
            return inst
        return inst, F.normalize(self.group_head(h), dim=1)

    def forward_jigsaw(self, patches: Tensor) -> Tensor:
        if self.jigsaw_head is None:
            raise NcdError("this CLD model has no jigsaw head; build it with jigsaw=True (InfoMin)")
        return self.jigsaw_head(self.backbone(patches))


def build_cld_backbone(name: str, in_channels: int, pool_len: int = 0, *, init: str | None = None,
                       **kwargs: Any) -> tuple[nn.Module, int]:
    """The shared backbone registry, plus CLD's ``pool_len``: a fixed average-pool window on the
    CIFAR ResNet-18 (4 for 32×32 inputs, 7 for 96×96 STL-10, as CLD's ``F.avg_pool2d``; 0 = the
    backbone's own global pool).

    ``init`` (``resnet18_cifar`` / ``resnet18_stl`` only; None = the registry's Kaiming-normal):
    ``torch`` keeps PyTorch's default layer init, as CLD's and NPID's ``models/resnet_cifar.py``
    (no init loop there); other backbones keep their own init (torchvision's ResNet-50 is what
    CLD's ImageNet ``models/ResNet.py`` and MoCo's ``main_moco.py`` use)."""
    if init is not None and name in ("resnet18_cifar", "resnet18_stl"):
        kwargs = {**kwargs, "init": init}
    backbone, dim = build_backbone(name, in_channels, **kwargs)
    if pool_len:
        if name != "resnet18_cifar":
            raise NcdError(f"cld.pool_len applies to the resnet18_cifar backbone only, got backbone {name!r}")
        backbone.avgpool = nn.AvgPool2d(int(pool_len))
    return backbone, dim


def cld_model_from_arch(arch: dict[str, Any]) -> CLDModel:
    """Rebuild the (untrained) :class:`CLDModel` a checkpoint's ``arch`` block describes."""
    backbone, dim = build_cld_backbone(arch["backbone"], arch["in_channels"], arch.get("pool_len", 0),
                                       **arch.get("backbone_kwargs", {}))
    return CLDModel(backbone, dim, int(arch.get("low_dim", 128)), arch.get("head", "linear"),
                    bool(arch.get("mlp", False)), bool(arch.get("jigsaw", False)))


__all__ = ["NormedLinear", "JigsawHead", "CLDModel", "build_cld_backbone", "cld_model_from_arch", "projection"]
