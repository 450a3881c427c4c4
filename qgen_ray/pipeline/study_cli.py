"""The command line every study script shares: plan -> train -> follow-up stages.

    python studies/<name>.py [--storage DIR|URI] [--data-root DIR] [--download] [--smoke]
        [--address ADDR] [--cpus-per-trial C] [--gpus-per-trial G] [--pack K|auto]
        [--stages ...]

Re-running a study resumes it: finished models are never retrained, unfinished ones
continue from their last checkpoint, failed ones are retried.
"""

from __future__ import annotations

import argparse
import collections.abc

from qgen_ray import schema
from qgen_ray.errors import ItemsFailed, UserError, check_resources, exit_on_user_error
from qgen_ray.pipeline.study import STAGES, Study
from qgen_ray.store import StudyStore

DEFAULT_STORAGE = "./results"


def parser(study: Study, fused: bool = True) -> argparse.ArgumentParser:
    """The study script's flags; `fused`: with those of packed training (not DDP's)."""
    p = argparse.ArgumentParser(
        prog=f"studies/{study.name}.py",
        description=study.description or f"Run the {study.name} study.",
    )
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="study store root: a folder or a pyarrow URI such as s3://bucket/path "
        f"(default {DEFAULT_STORAGE}); the study lands in <storage>/<study name>",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset on disk (CIFAR: the parent of "
        "cifar-10-batches-py); recorded in study.json at the first run, so re-runs and "
        "the follow-up stages find it; not needed for digits",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download the dataset into --data-root if missing (needs network)",
    )
    p.add_argument(
        "--smoke",
        "--smoke-test",  # the name Ray's own examples use
        dest="smoke",
        action="store_true",
        help="a corner of the grid for a few epochs, in <study>-smoke (about a minute; CI)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address ('auto' on a head node); default: a local Ray",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help=f"CPUs per training trial (default {study.cpus_per_trial})",
    )
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help=f"GPUs per trial, fractional packs trials (default {study.gpus_per_trial}); "
        "the follow-up stages' tasks (measure, corrupt, landscape) get the same share",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        default=None,
        choices=STAGES,
        help=f"what to run (default: {' '.join(study.stages)})",
    )
    p.add_argument(
        "--corrupt-root",
        default=None,
        help="published CIFAR-10-C/100-C folder for the corrupt stage; "
        "default: generate the corruptions on the fly",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="float32 (default) | float64: the reproducible mode, whose numbers do not move "
        "with the CPU thread count (slower)",
    )
    if fused:
        add_fused_flags(p)
    p.add_argument(
        "--callbacks",
        default=None,
        metavar="mlflow,wandb",
        help="log every model's curves to MLflow and/or Weights & Biases too (Ray Tune's "
        "MLflowLoggerCallback / WandbLoggerCallback; extras: pip install -e '.[mlflow]' "
        "or '.[wandb]'); TensorBoard files are always written",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def add_fused_flags(p: argparse.ArgumentParser) -> None:
    """--pack and the fast paths of the fused trainer (`qgen_ray.train.pack`)."""
    p.add_argument(
        "--pack",
        default="auto",
        help="train up to K models of one shape as one fused network per trial "
        "(horizontal fusion; each model's numbers are its own); 1: one model per trial; "
        "auto (default): 1 on CPU, where packing does not pay, 12 when trials get a GPU",
    )
    p.add_argument(
        "--amp",
        default="off",
        choices=["off", "bf16"],
        help="bf16: the forward under bfloat16 autocast (GPU fast path; trains fused)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last tensors in the fused forward (GPU fast path; trains fused)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the fused forward (GPU fast path; trains fused; compiling "
        "takes a minute per pack shape)",
    )


def write_study_record(store: StudyStore, record: dict, data_root: str | None = None) -> None:
    """study.json: the study's declaration plus provenance and where its data lives
    (`data_root`, kept from the first run unless a flag names another); a re-run keeps
    `created_at`."""
    from datetime import datetime, timezone

    from qgen_ray.provenance import provenance

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    old = store.read_record(schema.STUDY_JSON, "rewritten from the study script")
    if old is not None:
        now = old.get("created_at", now)
        data_root = data_root or old.get("data_root")
    extra = {"data_root": data_root} if data_root else {}
    record = {**record, **extra, "created_at": now, "provenance": provenance()}
    store.write_json(schema.STUDY_JSON, record)


def data_root_for(store: StudyStore, flag: str | None) -> str | None:
    """The dataset folder: the flag's (a local path made absolute), else the one the
    study recorded in study.json at its first run."""
    from pathlib import Path

    if flag:
        return flag if "://" in flag else str(Path(flag).expanduser().resolve())
    record = store.read_record(schema.STUDY_JSON, "rewritten from the study script") or {}
    return record.get("data_root")


def collect_trials(
    store: StudyStore, name: str, planned: collections.abc.Sequence[str] = ()
) -> str:
    """Rebuild the study's tables, print the counts by status, why models failed, and how
    many of the `planned` model ids have no result at all; return trials.parquet."""
    from qgen_ray.pipeline.collect import collect

    trials = collect(store)
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    print(f"[{name}] trials: {counts}", flush=True)
    failed = trials[trials["status"] == schema.STATUS_FAILED]
    for reason, group in failed.groupby("reason"):
        print(f"[{name}] {len(group)} failed (retried on re-run): {reason}", flush=True)
    collected = set(trials["model_id"])
    missing = [m for m in planned if m not in collected]
    if missing:
        print(
            f"[{name}] {len(missing)} models ended without a result (e.g. {missing[0]}); "
            f"Tune's logs are under {store.path(schema.TUNE_DIR)}; a re-run retries them",
            flush=True,
        )
    return store.path(schema.TRIALS)


def pack_size(value: str, device: str, gpus_per_trial: float) -> int:
    """The --pack value as a number: `auto` is `train.pack.AUTO_PACK` of the device the
    trials will train on (a GPU when they get one and --device is not cpu)."""
    from qgen_ray.train.pack import AUTO_PACK

    if value == "auto":
        on_gpu = gpus_per_trial > 0 and device != "cpu"
        return AUTO_PACK["cuda" if on_gpu else "cpu"]
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise UserError(f"--pack must be a whole number >= 1 or auto, got {value!r}")
    return size


def pending_models(store: StudyStore, plan: list, name: str, verb: str = "train") -> list:
    """The planned (spec, extra) pairs without an ok / diverged result; says how many."""
    from qgen_ray.pipeline.collect import finished_ids

    done = finished_ids(store)
    pending = [(s, e) for s, e in plan if s.model_id not in done]
    print(
        f"[{name}] {len(plan)} models planned, {len(plan) - len(pending)} already done, "
        f"{len(pending)} to {verb}; store: {store.uri}",
        flush=True,
    )
    return pending


def run(study: Study, args: argparse.Namespace) -> dict:
    """Check the study and the flags, then run its stages; return {stage: output path}."""
    from dataclasses import replace

    from qgen_ray.pipeline.search import SearchStudy
    from qgen_ray.ray import tracking
    from qgen_ray.spec import RunOptions
    from qgen_ray.store import StudyStore
    from qgen_ray.train.loop import resolve_dtype
    from qgen_ray.train.pack import check_fast_paths

    args.trackers = tracking.parse(args.callbacks)
    if args.smoke:
        study = replace(study.smoke(), name=f"{study.name}-smoke")
    stages = args.stages or list(study.stages)
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else study.cpus_per_trial
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else study.gpus_per_trial
    check_resources(cpus, gpus, args.device, "trial")
    pack = pack_size(args.pack, args.device, gpus)
    options = RunOptions(device=args.device, dtype=args.dtype, amp=args.amp,
                         channels_last=args.channels_last, compile=args.compile)  # fmt: skip
    check_fast_paths(options, resolve_dtype(options.dtype))
    if isinstance(study, SearchStudy):
        study.check()  # validates the space before anything is written
        if args.pack not in ("auto", "1") or options.fast_paths:
            raise UserError(
                "a search trains one model per trial with the plain trainer: drop --pack, "
                "--amp, --channels-last and --compile"
            )
        plan = []
    else:
        plan = study.plan()  # validates the grid before anything is written
    store = StudyStore.for_study(args.storage, study.name)
    store.check_writable()
    with store.claimed(f"studies/{study.name}.py"):
        return _run_stages(study, args, store, plan, stages, (cpus, gpus, pack), options)


def _run_stages(study, args, store, plan, stages, resources, options) -> dict:
    """The stages of a checked study, in order, on a claimed store."""
    from qgen_ray.data import load_image_data
    from qgen_ray.pipeline.search import SearchStudy

    cpus, gpus, pack = resources
    outputs: dict[str, str] = {}
    if "train" in stages and isinstance(study, SearchStudy):
        outputs["trials"] = _search(study, args, store, options, cpus, gpus)
    elif "train" in stages:
        from qgen_ray.ray.session import init_ray
        from qgen_ray.ray.tune_study import run_training
        from qgen_ray.train.pack import check_pack_models, form_packs

        root = data_root_for(store, args.data_root)
        data = load_image_data(study.dataset, root, args.download)  # a bad root: nothing written
        pending = pending_models(store, plan, study.name)
        packs = form_packs(pending, pack, spec_of=lambda item: item[0])
        check_pack_models([[spec for spec, _ in members] for members in packs], data)
        write_study_record(store, study.describe(), root)
        if pending:
            if pack > 1:
                print(f"[{study.name}] {len(pending)} models in {len(packs)} packs "
                      f"(--pack {pack})", flush=True)  # fmt: skip
            init_ray(args.address)
            run_training(
                store,
                packs,
                data,
                options,
                cpus,
                gpus,
                already_done=len(plan) - len(pending),
                progress=not args.quiet,
                trackers=args.trackers,
            )
        outputs["trials"] = collect_trials(store, study.name, [s.model_id for s, _ in pending])
    from qgen_ray.pipeline import followups as stage_impl

    def run_one(stage: str) -> str:
        return stage_impl.run_stage(stage, store, args, study.stage_options.get(stage, {}))

    return later_stages(store, stages, run_one, outputs)


def later_stages(
    store: StudyStore,
    stages: list[str],
    run_one: collections.abc.Callable[[str], str],
    outputs: dict,
) -> dict:
    """The stages after training, in order (`run_one(stage)` -> its output), then
    {stage: output}. Failed models of the training stage (when it ran: `outputs` has
    "trials") and a stage's failed items do not stop the next stages, which run on what
    finished; they are summed up at the end (`ItemsFailed`: one line each, exit status 1)."""
    failures: dict[str, list[str]] = {}
    if "trials" in outputs:
        trials = store.read_table(schema.TRIALS)
        failed = trials[trials["status"] == schema.STATUS_FAILED]
        if len(failed):
            failures["train"] = [f"{m}: {r}" for m, r in zip(failed["model_id"], failed["reason"])]
    for stage in STAGES[1:]:
        if stage in stages:
            try:
                outputs[stage] = run_one(stage)
            except ItemsFailed as err:  # the next stages still run on what finished
                failures.update(err.failures)
    if failures:
        for name, path in outputs.items():
            print(f"{name:>10}: {path}")
        raise ItemsFailed(failures)
    return outputs


def _search(study, args, store: StudyStore, options, cpus: float, gpus: float) -> str:
    """A search study's training: Optuna through Ray Tune on the validation split, then
    the test set for the models it trained (never read before the search ends)."""
    from qgen_ray.data import load_image_data
    from qgen_ray.pipeline.search import evaluate_on_test
    from qgen_ray.ray.session import init_ray
    from qgen_ray.ray.tune_search import run_search

    root = data_root_for(store, args.data_root)
    data = load_image_data(study.dataset, root, args.download)
    write_study_record(store, study.describe(), root)
    init_ray(args.address)
    run_search(store, study, data, options, cpus, gpus, progress=not args.quiet,
               trackers=args.trackers)  # fmt: skip
    evaluated = evaluate_on_test(store, data)
    print(f"[{study.name}] search over: {evaluated} models evaluated on the test set", flush=True)
    return collect_trials(store, study.name)


def main(study: Study, argv: list[str] | None = None) -> dict:
    """Entry point of every study script."""
    args = parser(study).parse_args(argv)
    outputs = exit_on_user_error(run)(study, args)
    for name, path in outputs.items():
        print(f"{name:>10}: {path}")
    return outputs
