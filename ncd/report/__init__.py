"""The results report: reproduced numbers beside the papers', figures and provenance."""

from ncd.report.render import build_report
from ncd.report.tables import load_metrics, load_protocols, load_reported, match_reported, summarise

__all__ = ["build_report", "load_metrics", "load_protocols", "load_reported", "match_reported", "summarise"]
