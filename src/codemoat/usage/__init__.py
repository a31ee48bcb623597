"""Usage analytics: each completion's facts and each editor event, persisted; acceptance and activity in SQL."""

from .report import BY, Report, Row, daily, report
from .store import UsageStore

__all__ = ["BY", "Report", "Row", "UsageStore", "daily", "report"]
