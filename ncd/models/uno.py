"""UNO's multi-head model (METHODS.md 3.2): a labeled head of normalised prototypes on the
normalised feature, and ``num_heads`` unlabeled and over-clustering heads (MLP projector →
normalisation → normalised prototypes); all logits are cosines."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Prototypes(nn.Module):
    """``Linear(in → K, bias=False)`` whose rows are kept at unit norm (cosine logits)."""

    def __init__(self, in_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.prototypes = nn.Linear(in_dim, num_prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight.data.clone()
        self.prototypes.weight.copy_(F.normalize(w, dim=1, p=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(x)


class MultiHead(nn.Module):
    """``num_heads`` × (Linear → BN → ReLU → Linear projector, L2-normalise, prototypes)."""

    def __init__(self, in_dim: int, num_prototypes: int, num_heads: int, hidden_dim: int = 2048,
                 proj_dim: int = 256) -> None:
        super().__init__()
        self.projectors = nn.ModuleList([
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                          nn.Linear(hidden_dim, proj_dim))
            for _ in range(num_heads)])
        self.prototypes = nn.ModuleList([Prototypes(proj_dim, num_prototypes) for _ in range(num_heads)])
        self.normalize_prototypes()

    def normalize_prototypes(self) -> None:
        for p in self.prototypes:
            p.normalize_prototypes()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``[H, B, K]``."""
        return torch.stack([p(F.normalize(proj(feats), dim=1)) for proj, p in zip(self.projectors, self.prototypes)])


class MultiHeadModel(nn.Module):
    """Encoder + labeled head (+ unlabeled and over-clustering heads when ``num_unlabeled`` > 0)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_labeled: int, num_unlabeled: int = 0,
                 num_heads: int = 0, overcluster_factor: int = 3, hidden_dim: int = 2048, proj_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = backbone_dim
        self.head_lab = Prototypes(backbone_dim, num_labeled)
        self.has_unlab = num_unlabeled > 0 and num_heads > 0
        if self.has_unlab:
            self.head_unlab = MultiHead(backbone_dim, num_unlabeled, num_heads, hidden_dim, proj_dim)
            self.head_unlab_over = MultiHead(backbone_dim, num_unlabeled * overcluster_factor, num_heads,
                                             hidden_dim, proj_dim)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.head_lab.normalize_prototypes()
        if self.has_unlab:
            self.head_unlab.normalize_prototypes()
            self.head_unlab_over.normalize_prototypes()

    def forward_heads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"logits_lab": self.head_lab(F.normalize(feats, dim=1)), "feats": feats}
        if self.has_unlab:
            out["logits_unlab"] = self.head_unlab(feats)
            out["logits_unlab_over"] = self.head_unlab_over(feats)
        return out

    def forward(self, views: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One image batch → per-head outputs; a list of views → the same, stacked over views
        (``logits_lab [V, B, nlc]``, ``logits_unlab [V, H, B, nuc]``, ``logits_unlab_over [V, H, B, nuc·f]``)."""
        if isinstance(views, torch.Tensor):
            return self.forward_heads(self.backbone(views))
        outs = [self.forward_heads(self.backbone(v)) for v in views]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
