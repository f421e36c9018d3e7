"""Heads on top of a backbone: SCAN's contrastive MLP and its multi-head cluster layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ncd.errors import NcdError


class ContrastiveModel(nn.Module):
    """Backbone → MLP head (dim → dim → ReLU → features_dim) → L2 normalisation (SCAN 1.2)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, head: str = "mlp",
                 features_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = backbone_dim
        if head == "mlp":
            self.contrastive_head = nn.Sequential(
                nn.Linear(backbone_dim, backbone_dim), nn.ReLU(), nn.Linear(backbone_dim, features_dim)
            )
        elif head == "linear":
            self.contrastive_head = nn.Linear(backbone_dim, features_dim)
        elif head == "identity":
            # MoCo features are mined on the backbone output itself (SCAN 1.6)
            self.contrastive_head = nn.Identity()
        else:
            raise NcdError(f"unknown contrastive head {head!r}; expected 'mlp', 'linear' or 'identity'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.contrastive_head(self.backbone(x)), dim=1)


class ClusteringModel(nn.Module):
    """Backbone → ``num_heads`` independent ``Linear(dim → K)`` heads (logits, no softmax)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_clusters: int,
                 num_heads: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = backbone_dim
        self.num_heads = num_heads
        self.cluster_head = nn.ModuleList([nn.Linear(backbone_dim, num_clusters) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor, forward_pass: str = "default") -> torch.Tensor:
        """Logits ``[H, B, K]``; ``forward_pass="backbone"`` returns the features instead."""
        if forward_pass not in ("default", "backbone", "head"):
            raise NcdError(f"unknown forward_pass {forward_pass!r}; expected 'default', 'backbone' or 'head'")
        if forward_pass == "head":
            feats = x
        else:
            feats = self.backbone(x)
            if forward_pass == "backbone":
                return feats
        return torch.stack([h(feats) for h in self.cluster_head])
