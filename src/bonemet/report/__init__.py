"""The report: one self-contained HTML page telling the study's story from the stages' outputs."""

from bonemet.report.build import CaseSettings, Provenance, build_report, render_report
from bonemet.report.content import ReportInputs

__all__ = ["CaseSettings", "Provenance", "ReportInputs", "build_report", "render_report"]
