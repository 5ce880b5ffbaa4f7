"""Self-contained HTML reports of run directories: ``medshield report RUN_DIR``.

Example::

    from medshield.report import write_report

    path = write_report("runs/demo")  # runs/demo/report.html

See ``docs/reports.md`` for what a report holds.
"""

from medshield.report.render import render_report, report_after_run, write_report

__all__ = ["render_report", "report_after_run", "write_report"]
