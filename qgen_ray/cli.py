"""`qgen`: the study store's command line (also `python -m qgen_ray`).

qgen status <study_dir>                  progress from the store alone
qgen collect <study_dir>                 rebuild trials/history/steps tables
qgen measure <study_dir> [--mode fast|faithful] [--measures ...] [--gpus-per-task G]
qgen corrupt <study_dir> [--corruptions ...] [--severities ...] [--corrupt-root DIR]
                                         (ImageNet: --corrupt-root IMAGENET-C --data-root DIR)
qgen landscape <study_dir> [--models ID ...] [--steps N]
qgen report <study_dir> [--out DIR]     (a study on s3://... needs --out, a local folder)
qgen cluster-check [cluster.yaml]        Ray's schema + security rules, offline
"""

from __future__ import annotations

import argparse

from qgen_ray import schema
from qgen_ray.errors import UserError, exit_on_user_error


def _common(p: argparse.ArgumentParser, gpu_flag: bool = True) -> None:
    p.add_argument("study_dir", help="the study folder <storage>/<study> (a path or URI)")
    if gpu_flag:
        p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
        p.add_argument("--address", default=None, help="Ray cluster address; default local")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument(
            "--gpus-per-task",
            type=float,
            default=0.0,
            help="GPUs per worker actor (fractional packs several per GPU)",
        )
        p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per worker actor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qgen", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("status", help="progress of a study from its store"), gpu_flag=False)
    _common(
        sub.add_parser("collect", help="rebuild the Parquet tables from trial folders"),
        gpu_flag=False,
    )
    m = sub.add_parser("measure", help="sharpness and PAC-Bayes measures -> measures.parquet")
    _common(m)
    m.add_argument("--mode", default="fast", help="fast (default) | faithful (paper protocol)")
    m.add_argument("--measures", nargs="+", default=None, help="measure names (default: all)")
    c = sub.add_parser("corrupt", help="corrupted-input evaluation -> corruptions.parquet")
    _common(c)
    c.add_argument("--corruptions", nargs="+", default=None, help="names (default: all 15)")
    c.add_argument("--severities", nargs="+", type=int, default=None, help="1..5 (default all)")
    c.add_argument(
        "--corrupt-root",
        default=None,
        help="published CIFAR-10-C/100-C folder (default: generate on the fly), or "
        "ImageNet-C (required for ImageNet studies, with --data-root for its classes)",
    )
    la = sub.add_parser("landscape", help="2-D loss surfaces -> landscapes.parquet")
    _common(la)
    la.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="model ids (default: the lowest-train-loss model per precision)",
    )
    la.add_argument("--per-precision", type=int, default=1)
    la.add_argument("--steps", type=int, default=51, help="grid points per axis (paper 51)")
    r = sub.add_parser("report", help="report.md / report.html with tables and figures")
    _common(r, gpu_flag=False)
    r.add_argument(
        "--out",
        default=None,
        help="local folder for the report (default <study>/report; needed for s3://...); "
        "the study itself is then only read",
    )
    cc = sub.add_parser("cluster-check", help="check a `ray up` config offline before using it")
    cc.add_argument("config", nargs="?", default="cluster.yaml", help="default ./cluster.yaml")
    return p


def status(store) -> str:
    from qgen_ray.pipeline.collect import progress_counts

    if not store.exists(schema.STUDY_JSON) and not store.trial_ids():
        raise UserError(f"no study in {store.uri}: run a study script first")
    record = store.read_record(schema.STUDY_JSON, "a re-run of the study script rewrites it")
    planned = record.get("num_models") if record else None
    counts = progress_counts(store)
    finished = counts["ok"] + counts["diverged"] + counts["degenerate"] + counts["stopped"]
    search = " (search budget)" if record and "search" in record else ""
    line = (
        f"{store.name}: {finished}/{planned if planned is not None else '?'}{search} models "
        f"done (ok {counts['ok']}, diverged {counts['diverged']}, degenerate "
        f"{counts['degenerate']}"
        + (f", stopped early {counts['stopped']}" if search else "")
        + f", failed {counts['failed']}), {counts['started']} started without a result"
    )
    for table in (schema.MEASURES, schema.CORRUPTIONS, schema.LANDSCAPES):
        df = store.read_table(table)
        if df is not None:
            line += f"\n  {table}: {len(df)} rows, {df['model_id'].nunique()} models"
    return line


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from qgen_ray.pipeline.followups import placement_from_args
    from qgen_ray.store import StudyStore

    args = build_parser().parse_args(argv)
    if args.command == "cluster-check":
        from qgen_ray.ray.cluster_config import cluster_check

        print(cluster_check(args.config))
        return
    store = StudyStore(args.study_dir)
    common = {"place": placement_from_args(args)} if hasattr(args, "gpus_per_task") else {}
    if args.command == "status":
        print(status(store))
        return
    if args.command == "report" and (args.out is not None or not store.is_local):
        from qgen_ray.pipeline.followups import report_study

        # reads the study through its store (rebuilding a missing trials.parquet, as any
        # reader does) and writes the report into `out` only
        print(report_study(store, out=args.out))
        return
    if not store.exists(schema.TRIALS) and not store.trial_ids():
        _write_command(args, store, common)  # says there is no study, writes nothing
        return
    store.check_writable()
    with store.claimed(f"qgen {args.command}"):
        _write_command(args, store, common)


def _write_command(args, store, common: dict) -> None:
    """The commands that write into the study folder (one at a time per folder)."""
    from qgen_ray.pipeline.followups import (
        corrupt_study,
        landscape_study,
        measure_study,
        report_study,
    )

    if args.command == "collect":
        from qgen_ray.pipeline.collect import collect

        if not store.trial_ids():
            raise UserError(f"no trials in {args.study_dir}: run the study first")
        trials = collect(store)
        print(f"{len(trials)} models -> {store.path(schema.TRIALS)}")
    elif args.command == "measure":
        print(measure_study(store, mode=args.mode, measures=args.measures, **common))
    elif args.command == "corrupt":
        print(
            corrupt_study(
                store,
                corruptions=args.corruptions,
                severities=args.severities,
                corrupt_root=args.corrupt_root,
                **common,
            )
        )
    elif args.command == "landscape":
        print(
            landscape_study(
                store,
                models=args.models,
                per_precision=args.per_precision,
                steps=args.steps,
                **common,
            )
        )
    elif args.command == "report":
        print(report_study(store))


if __name__ == "__main__":
    main()
