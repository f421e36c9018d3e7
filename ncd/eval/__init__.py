"""Evaluation: SCAN's Hungarian protocol and head-selection loss, UNO's cluster accuracy,
weighted kNN (DESIGN.md, Contracts)."""

from ncd.eval.clustering import cluster_acc, hungarian_evaluate, scan_head_losses
from ncd.eval.knn import weighted_knn

__all__ = ["hungarian_evaluate", "scan_head_losses", "cluster_acc", "weighted_knn"]
