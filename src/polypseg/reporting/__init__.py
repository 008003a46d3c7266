"""Reports and comparisons of cross-validation runs.

>>> write_report("runs/paper")                 # runs/paper/report.html + runs/paper/figures/*.png
>>> compare_runs(["runs/a", "runs/b"]).to_markdown()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from polypseg._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "write_report": "polypseg.reporting.report",
    "ReportError": "polypseg.reporting.report",
    "compare_runs": "polypseg.reporting.compare",
    "Comparison": "polypseg.reporting.compare",
    "CompareError": "polypseg.reporting.compare",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves the names
    from polypseg.reporting.compare import CompareError as CompareError
    from polypseg.reporting.compare import Comparison as Comparison
    from polypseg.reporting.compare import compare_runs as compare_runs
    from polypseg.reporting.report import ReportError as ReportError
    from polypseg.reporting.report import write_report as write_report
