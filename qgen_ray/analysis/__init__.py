"""Analysis of a finished study: the paper's tables, figures and correlation analysis,
read only from the study's Parquet tables (never checkpoints, Ray or torch).

    kendall_tau, granulated_kendall   rank correlation of a measure with the gap (§4)
    build_tables(study_dir)           every table as a DataFrame, for notebooks
    write_report(study_dir)           <study>/report/report.md, report.html and PNGs
"""

from qgen_ray.analysis.correlation import (
    AxisKendall,
    granulated_kendall,
    granulated_kendall_by_axis,
    kendall_tau,
    kendall_tau_b,
)
from qgen_ray.analysis.precision import precision_label
from qgen_ray.analysis.report import write_report
from qgen_ray.analysis.tables import build_tables

__all__ = [
    "AxisKendall",
    "build_tables",
    "granulated_kendall",
    "granulated_kendall_by_axis",
    "kendall_tau",
    "kendall_tau_b",
    "precision_label",
    "write_report",
]
