"""Reports and comparisons of cross-validation runs.

>>> write_report("runs/paper")                 # runs/paper/report.html + runs/paper/figures/*.png
>>> compare_runs(["runs/a", "runs/b"]).to_markdown()
"""

from polypseg.reporting.compare import CompareError, Comparison, compare_runs
from polypseg.reporting.report import ReportError, write_report

__all__ = ["write_report", "compare_runs", "Comparison", "CompareError", "ReportError"]
