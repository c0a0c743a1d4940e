"""Self-contained HTML report of a pipeline run (static images, opens offline)."""

from bonemet.report.html import build_report

__all__ = ["build_report"]
