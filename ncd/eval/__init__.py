"""Evaluation: SCAN's Hungarian protocol and head-selection loss, UNO's cluster accuracy,
weighted kNN (DESIGN.md, Contracts)."""

from ncd.eval.clustering import cluster_acc, hungarian_evaluate, scan_head_losses
from ncd.eval.knn import weighted_knn
from ncd.eval.metrics import clustering_metrics

# The Lightning linear probe is ncd.eval.linear_probe.linear_probe, imported where it is used: Lightning is
# slow to import and the package stays light for aggregation and the report.

__all__ = ["hungarian_evaluate", "scan_head_losses", "cluster_acc", "weighted_knn", "clustering_metrics"]
