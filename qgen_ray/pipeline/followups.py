"""The follow-up stages of a study (measure, corrupt, landscape, report), as run by
`qgen <stage> <study_dir>` and by the study scripts after training.

Each stage reads the trials table, works out what is not yet in its own table, fans the
rest out over Ray (`qgen_ray.ray.fanout`) and prints where its output is. Stages are
idempotent: a re-run after a kill finishes only what is missing.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from qgen_ray import schema
from qgen_ray.data import load_image_data
from qgen_ray.errors import ItemsFailed, UserError, check_resources
from qgen_ray.loaders import load_trials
from qgen_ray.store import StudyStore

DEFAULT_MEASURE_MODE = "fast"
FOLDER_DATASETS = ("imagenet",)  # read from ImageFolders on disk (qgen_ray.imagenet), not memory
MEASURE_SEED = 0  # noise / restarts seed of the sigma searches
# A landscape of an ImageFolder study is evaluated on this many training images (seeded):
# its 51 x 51 grid reads them 2,601 times, so they are decoded once and kept in memory
# (0.6 GB at 224 px); the in-memory datasets use their whole training set.
LANDSCAPE_FOLDER_IMAGES = 1000


def ok_trials(store: StudyStore) -> pd.DataFrame:
    """The trials table's finished models; one line (UserError) when there are none or
    their checkpoints are missing."""
    trials = load_trials(store.uri)
    ok = trials[trials["status"] == schema.STATUS_OK]
    if ok.empty:
        raise UserError(f"no finished (status ok) models in {store.uri}: train the study first")
    folders = set(store.trial_ids())
    absent = [m for m in ok["model_id"] if m not in folders]
    if absent:
        raise UserError(
            f"{len(absent)} models in {store.uri} have a row but no trial folder (e.g. "
            f"{absent[0]}): their checkpoints are elsewhere; copy the trials/ folders back "
            "(e.g. aws s3 sync s3://.../<study>/trials <study>/trials) and re-run"
        )
    missing = [m for m in ok["model_id"] if store.trial(m).missing_checkpoints()]
    if missing:
        raise UserError(
            f"{len(missing)} models in {store.uri} lack init.pt or final.pt (e.g. "
            f"{missing[0]}): re-run the study script, which re-trains them (from last.pt)"
        )
    return ok


def _dataset(trials: pd.DataFrame) -> str:
    names = trials["dataset"].unique().tolist()
    if len(names) != 1:
        raise UserError(f"study mixes datasets {names}; run the stage per dataset")
    return names[0]


def study_data(trials: pd.DataFrame, data_root: str | None):
    """The (single) dataset the trials were trained on, loaded into memory."""
    return load_image_data(_dataset(trials), data_root)


def data_root(store: StudyStore, place: Placement) -> str | None:
    """The dataset folder: `--data-root` when given, else the study's own (study.json)."""
    from qgen_ray.pipeline.study_cli import data_root_for

    return data_root_for(store, place.data_root)


@dataclass(frozen=True)
class Placement:
    """Where and how a stage's work runs: never part of what it computes."""

    gpus_per_task: float = 0.0  # GPUs per worker actor (fractional packs several per GPU)
    cpus_per_task: float = 1.0  # CPUs per worker actor
    data_root: str | None = None  # dataset folder (not needed for digits)
    address: str | None = None  # Ray cluster address; None = local Ray
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def __post_init__(self):
        check_resources(self.cpus_per_task, self.gpus_per_task, self.device, "task")


def _fan(
    store: StudyStore,
    place: Placement,
    trials: pd.DataFrame,
    job: str,
    items: list[dict],
    in_memory: bool = True,
    **kwargs,
) -> list[str]:
    """Fan `job` out over `items` with the stage's placement; return the error lines.
    `in_memory=False`: the job reads its images from disk (ImageNet); actors get no dataset."""
    from qgen_ray.ray.fanout import fan_out
    from qgen_ray.ray.session import init_ray

    init_ray(place.address)
    data = study_data(trials, data_root(store, place)) if in_memory else None
    _, errors = fan_out(
        store,
        job,
        items,
        data,
        cpus=place.cpus_per_task,
        gpus=place.gpus_per_task,
        device=place.device,
        **kwargs,
    )
    if errors:
        print(f"[{job}] {len(errors)} item(s) failed and will be retried on re-run:")
        for line in errors[:10]:
            print(f"  {line}")
        raise ItemsFailed({job: errors})
    return errors


def folder_source(store: StudyStore, place: Placement, trials: pd.DataFrame) -> dict | None:
    """How the jobs read an ImageFolder study's training images ({"root", "threads"};
    see `jobs.training_images`), once its root is checked against the models' class
    count (one line when wrong); None for in-memory datasets."""
    if _dataset(trials) not in FOLDER_DATASETS:
        return None
    from qgen_ray.imagenet.imagenet_c import clean_class_index

    root = data_root(store, place)
    clean_class_index(root, {int(n) for n in trials["num_classes"]})
    return {"root": str(Path(root).expanduser().resolve()),
            "threads": max(1, int(place.cpus_per_task))}  # fmt: skip


def _items(trials: pd.DataFrame, models: list[str], folder: dict | None) -> list[dict]:
    """The fan-out items of `models`: their ids, and for a folder study the model and
    image size its transform needs."""
    if folder is None:
        return [{"model_id": m} for m in models]
    rows = trials.set_index("model_id").loc[models, ["model", "image_size"]]
    return [{"model_id": m, "model": r.model, "image_size": int(r.image_size)}
            for m, r in rows.iterrows()]  # fmt: skip


def measure_todo(done: pd.DataFrame, models: list[str], names: list[str], mode: str) -> list[str]:
    """The models still to measure: a stored row counts only when it was computed in the
    mode asked for (a search-free measure, mode "exact", counts in both)."""
    same = done[done["mode"].isin([mode, "exact"])]
    have = set(zip(same["model_id"], same["measure"]))
    return [m for m in models if any((m, n) not in have for n in names)]


def measure_study(
    store: StudyStore,
    *,
    mode: str = DEFAULT_MEASURE_MODE,
    measures: list[str] | None = None,
    place: Placement = Placement(),
) -> str:
    """Sharpness / PAC-Bayes measures of every ok model -> measures.parquet."""
    from qgen_ray.measures import MEASURES, PROTOCOLS

    names = measures or MEASURES.names()
    for name in names:
        MEASURES.get(name)
    if mode not in PROTOCOLS:
        raise UserError(f"unknown measure mode {mode!r}; valid: {', '.join(PROTOCOLS)}")
    trials = ok_trials(store)
    folder = folder_source(store, place, trials)
    done = store.read_table(schema.MEASURES)
    if done is None:
        done = pd.DataFrame(columns=schema.MEASURES_COLUMNS)
    todo = measure_todo(done, list(trials["model_id"]), names, mode)
    other = sorted(set(done.loc[~done["mode"].isin([mode, "exact"]), "mode"]))
    print(
        f"[measure] {len(trials)} models, {len(trials) - len(todo)} already measured, "
        f"{len(todo)} to measure ({mode} mode, {len(names)} measures"
        + (f"; rows in {', '.join(other)} mode are replaced" if other and todo else "")
        + ")",
        flush=True,
    )
    if todo:
        _fan(
            store,
            place,
            trials,
            "measure",
            _items(trials, todo, folder),
            in_memory=folder is None,
            table=schema.MEASURES,
            key=["model_id", "measure"],
            kwargs={"names": names, "mode": mode, "seed": MEASURE_SEED, "folder": folder},
        )
    return store.path(schema.MEASURES)


def corrupt_study(
    store: StudyStore,
    *,
    corruptions: list[str] | None = None,
    severities: list[int] | None = None,
    corrupt_root: str | None = None,
    place: Placement = Placement(),
) -> str:
    """Every ok model on every corruption x severity -> corruptions.parquet.

    In-memory datasets use the published CIFAR-C arrays in `corrupt_root`, or generate
    the corruptions. ImageNet studies need the published ImageNet-C in `corrupt_root`
    and the clean ImageFolder in `place.data_root` (its classes label ImageNet-C)."""
    from qgen_ray.data.corruptions import CORRUPTIONS, SEVERITIES, validate

    corruptions = list(corruptions or CORRUPTIONS)
    severities = [int(s) for s in (severities or SEVERITIES)]
    validate(corruptions, severities)
    trials = ok_trials(store)
    sets = [[c, s] for c in corruptions for s in severities]
    done = store.read_table(schema.CORRUPTIONS)
    have = (
        set() if done is None else set(zip(done["model_id"], done["corruption"], done["severity"]))
    )
    todo = trials[[any((m, c, s) not in have for c, s in sets) for m in trials["model_id"]]]
    print(
        f"[corrupt] {len(trials)} models x {len(sets)} corrupted sets; "
        f"{len(todo)} models to evaluate",
        flush=True,
    )
    if _dataset(trials) in FOLDER_DATASETS:
        _corrupt_imagenet(store, place, trials, todo, sets, corrupt_root)
        return store.path(schema.CORRUPTIONS)
    if corrupt_root is not None:  # a published set must be complete before any work
        from qgen_ray.data.corruption_readers import read_cifar_c

        for c, sev in sets:
            read_cifar_c(corrupt_root, c, sev)
    if len(todo):
        _fan(
            store,
            place,
            trials,
            "corrupt_prepare",
            [{"corruption": c, "severity": sev} for c, sev in sets],
            table=None,
            key=[],
            kwargs={"corrupt_root": corrupt_root},
            label="corrupt: sets",
        )
        _fan(
            store,
            place,
            trials,
            "corrupt",
            todo[["model_id", "train_loss"]].to_dict("records"),
            table=schema.CORRUPTIONS,
            key=["model_id", "corruption", "severity"],
            kwargs={"sets": sets, "corrupt_root": corrupt_root},
            label="corrupt: models",
        )
    return store.path(schema.CORRUPTIONS)


def _corrupt_imagenet(
    store: StudyStore,
    place: Placement,
    trials: pd.DataFrame,
    todo: pd.DataFrame,
    sets: list[list],
    corrupt_root: str,
) -> None:
    """The ImageNet half of `corrupt_study`. The flags and the clean classes are checked
    on every call; the ImageNet-C sets (listing their files takes a while) when there is
    work, all of them before any is evaluated."""
    from qgen_ray.imagenet.imagefolder import loader_workers
    from qgen_ray.imagenet.imagenet_c import check_imagenet_c

    num_classes = {int(n) for n in trials["num_classes"]}
    checked = sets if len(todo) else []
    root, class_to_idx = check_imagenet_c(
        corrupt_root, data_root(store, place), checked, num_classes
    )
    if not len(todo):
        return
    items = todo[["model_id", "train_loss", "model", "image_size"]].to_dict("records")
    _fan(
        store,
        place,
        trials,
        "corrupt_imagenet",
        items,
        in_memory=False,
        table=schema.CORRUPTIONS,
        key=["model_id", "corruption", "severity"],
        kwargs={
            "sets": sets,
            "corrupt_root": root,
            "class_to_idx": class_to_idx,
            "num_workers": loader_workers(place.cpus_per_task),
        },
        label="corrupt: models",
    )


def pick_landscape_models(trials: pd.DataFrame, per_precision: int) -> list[str]:
    """Per precision, the `per_precision` models with the lowest training loss."""
    ranked = trials.sort_values(["bits", "train_loss", "model_id"])
    return ranked.groupby("bits").head(per_precision)["model_id"].tolist()


def landscape_study(
    store: StudyStore,
    *,
    models: list[str] | None = None,
    per_precision: int = 1,
    steps: int = 51,
    span: float = 1.0,
    place: Placement = Placement(),
) -> str:
    """Filter-normalized loss surfaces of chosen models -> landscapes.parquet."""

    if steps < 3 or per_precision < 1 or span <= 0:
        raise UserError(
            f"a landscape needs --steps >= 3 (got {steps}), --per-precision >= 1 (got "
            f"{per_precision}) and a span > 0 (got {span}); the paper's grid is --steps 51"
        )
    trials = ok_trials(store)
    chosen = models or pick_landscape_models(trials, per_precision)
    unknown = sorted(set(chosen) - set(trials["model_id"]))
    if unknown:
        raise UserError(
            f"unknown or unfinished model id {unknown[0]}; see `qgen status {store.uri}`"
        )
    folder = folder_source(store, place, trials)
    images = None if folder is None else LANDSCAPE_FOLDER_IMAGES
    done = store.read_table(schema.LANDSCAPES)
    have = set() if done is None else _same_grid(done, steps, span)
    todo = [m for m in chosen if m not in have]
    print(
        f"[landscape] {len(chosen)} models, {len(todo)} to compute ({steps}x{steps} grid"
        + (f", on at most {images} training images drawn at random)" if images else ")")
    )
    stale = [] if done is None else sorted(set(todo) & set(done["model_id"]))
    if stale:  # another grid of these models: replaced, never mixed with the new one
        print(f"[landscape] {len(stale)} models have another grid; it is replaced", flush=True)
        store.write_table(schema.LANDSCAPES, done[~done["model_id"].isin(stale)])
    if todo:
        _fan(
            store,
            place,
            trials,
            "landscape",
            _items(trials, todo, folder),
            in_memory=folder is None,
            table=schema.LANDSCAPES,
            key=["model_id", "x", "y"],
            kwargs={
                "steps": steps,
                "span": span,
                "seed": MEASURE_SEED,
                "folder": folder,
                "images": images,
            },  # fmt: skip
        )
    return store.path(schema.LANDSCAPES)


def _same_grid(done: pd.DataFrame, steps: int, span: float) -> set[str]:
    """Models whose stored surface is the steps x steps grid over [-span, span]."""
    grids = done.groupby("model_id")["x"].agg(["size", "min", "max"])
    same = (grids["size"] == steps * steps) & ((grids["max"] - span).abs() < 1e-9)
    return set(grids.index[same & ((grids["min"] + span).abs() < 1e-9)])


def report_study(store: StudyStore, out: str | None = None) -> str:
    """The Markdown + HTML report with the paper's tables and figures, in <study>/report
    or in the local folder `out` (needed when the study is on an object store)."""
    from qgen_ray.analysis.report import write_report

    return str(write_report(store.root if store.is_local else store.uri, out=out))


def publish_report(store: StudyStore) -> str:
    """The report stage of a run that writes the study (it holds the lease): the report
    in <study>/report, on an object store too (written locally, then copied in)."""
    if store.is_local:
        return report_study(store)
    with tempfile.TemporaryDirectory(prefix="qgen-report-") as tmp:
        report_md = Path(report_study(store, out=tmp)).name
        for path in sorted(Path(tmp).iterdir()):
            store.write_bytes(f"{schema.REPORT_DIR}/{path.name}", path.read_bytes())
    return f"{store.uri}/{schema.REPORT_DIR}/{report_md}"


STAGE_FUNCTIONS = {
    "measure": measure_study,
    "corrupt": corrupt_study,
    "landscape": landscape_study,
    "report": report_study,
}


def placement_from_args(args: argparse.Namespace) -> Placement:
    """The Placement fields the command line sets. `qgen measure|corrupt|landscape` name
    them (`--gpus-per-task`, ...); a study script has only `--gpus-per-trial`, and its
    follow-up stages give each task that same GPU share (its help says so)."""
    values = {
        f.name: getattr(args, f.name)
        for f in fields(Placement)
        if getattr(args, f.name, None) is not None
    }
    if getattr(args, "gpus_per_trial", None):
        values["gpus_per_task"] = args.gpus_per_trial
    return Placement(**values)


def run_stage(
    stage: str,
    store: StudyStore,
    args: argparse.Namespace,
    options: dict,
    place: Placement | None = None,
) -> str:
    """Run one stage with the study's options and `place` (default: the command line's
    placement)."""
    if stage == "report":
        return publish_report(store)
    if stage == "corrupt" and getattr(args, "corrupt_root", None):
        options = {**options, "corrupt_root": args.corrupt_root}
    return STAGE_FUNCTIONS[stage](store, **options, place=place or placement_from_args(args))
