"""The report stage: published artifacts → ``metrics.json`` → a static, offline, multi-page site."""

from tasks.report.index import build_reports_index
from tasks.report.run import ReportStageResult, run_report_stage

__all__ = ["ReportStageResult", "build_reports_index", "run_report_stage"]
