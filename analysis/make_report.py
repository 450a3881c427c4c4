"""Write a study's report (report.md, report.html, PNG figures) from its Parquet tables.

    python analysis/make_report.py results/nin_cifar10        # -> results/nin_cifar10/report/
    python analysis/make_report.py --demo /tmp/qgen_demo      # synthetic study, then its report

A thin wrapper over `qgen_ray.analysis.write_report`, for use outside the `qgen` CLI.
"""

from __future__ import annotations

import argparse

from qgen_ray.analysis import write_report
from qgen_ray.analysis.synthetic import write_synthetic_study
from qgen_ray.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="the study folder (holds trials.parquet)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="first write a synthetic study into study_dir (for trying the report out)",
    )
    args = parser.parse_args(argv)
    if args.demo:
        write_synthetic_study(args.study_dir)
    print(write_report(args.study_dir))


if __name__ == "__main__":
    main()
