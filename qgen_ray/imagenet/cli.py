"""The command line of the ImageNet studies: the shared study flags plus DDP's.

    python studies/imagenet_finetune.py --data-root DIR --weights resnet18=r18.pt ...
        [--workers N] [--image-size PX] [--models NAME ...] [--pretrained-from-hub]
        [--log-samples] + every flag of qgen_ray.pipeline.study_cli (--storage, --smoke, ...)
    python studies/corruption_imagenet.py ... --corrupt-root IMAGENET-C
        [--corruptions NAME ...] [--severities N ...]    (stages train corrupt report)
    --stages train measure corrupt landscape report: the follow-up stages read the
        ImageFolder of --data-root (or the one study.json recorded) from disk

Everything a user can get wrong (the ImageFolder, the weights, the flags) is checked on
the driver before Ray starts, each as one line with exit status 2. A re-run skips the
finished models and resumes the others from their last epoch.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from qgen_ray.errors import UserError, exit_on_user_error
from qgen_ray.imagenet.imagenet_c import check_imagenet_c, require_corrupt_root
from qgen_ray.pipeline import study_cli
from qgen_ray.pipeline.study import STAGES, Study
from qgen_ray.spec import TrainSpec

CPUS_PER_GPU_WORKER = 8  # default CPUs of a GPU worker (JPEG decoding keeps a GPU fed)
CPUS_PER_CPU_WORKER = 1  # default CPUs of a CPU-only worker


def parser(studies: tuple[Study, ...]) -> argparse.ArgumentParser:
    """`qgen_ray.pipeline.study_cli.parser` of the first study, extended with the DDP flags."""
    p = study_cli.parser(studies[0], fused=False)
    helps = {
        "cpus_per_trial": "CPUs of one Train run, split evenly over its --workers (default "
        f"{CPUS_PER_GPU_WORKER} per worker with GPUs, {CPUS_PER_CPU_WORKER} without)",
        "gpus_per_trial": "GPUs of one Train run, split evenly over its --workers (default: "
        "1 per worker when the cluster has GPUs, else 0)",
        "data_root": "folder holding the train/ and val/ ImageFolders (one folder per class)",
        "stages": f"what to run: {' '.join(STAGES)} (default {' '.join(studies[0].stages)})",
        "corrupt_root": "the published ImageNet-C folder, <corruption>/<severity>/<wnid>/"
        "*.JPEG (required by the corrupt stage)",
    }
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    models = [m for s in studies for m in s.grid["model"]]
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="DDP workers (ranks) per Train run: GPUs when present, else CPU "
        "processes talking gloo (default 1)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="MODEL=PATH",
        help="pretrained state dict to start each model from, e.g. "
        "resnet18=resnet18-f37072fd.pth (torchvision) or deit_tiny=deit.pt (timm)",
    )
    p.add_argument(
        "--pretrained-from-hub",
        action="store_true",
        help="start the models without --weights from torchvision's / timm's "
        "published weights (needs internet or a filled cache)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="crop side in pixels (default: the study's, 224); part of the model id",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=models,
        help="train only these models (default: all of the study)",
    )
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=None,
        help="corrupt stage: ImageNet-C corruptions to evaluate (default: all 15)",
    )
    p.add_argument(
        "--severities",
        nargs="+",
        type=int,
        default=None,
        help="corrupt stage: severities 1..5 to evaluate (default: all 5)",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="write the image indices each rank trained on per epoch to "
        "trials/<id>/samples/ (checks that the shards are disjoint)",
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="quantized ViTs (VVTQ) also learn from the frozen FP32 model of their starting "
        "weights (online distillation, KL to its softmax; off for the paper's Table 1 rows); "
        "part of the model id",
    )
    return p


def parse_weights(items: list[str], models: list[str]) -> dict[str, str]:
    """`["resnet18=path", ...]` -> {model: path}; a bare path is fine for one model."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if len(models) != 1:
                raise UserError(
                    f"--weights {item!r} names no model; write MODEL=PATH (models: "
                    f"{', '.join(models)})"
                )
            name, path = models[0], item
        if name not in models:
            raise UserError(
                f"--weights names model {name!r}, which this run does not train; "
                f"models: {', '.join(models)}"
            )
        out[name] = str(Path(path).expanduser().resolve())
    return out


def check_weights(
    plan: list[tuple[TrainSpec, dict]], weights: dict[str, str], hub: bool, num_classes: int
) -> None:
    """Every model has starting weights that fit its architecture (built here, once each)
    and, where it is distilled, that classify the study's classes (`check_teacher`)."""
    from qgen_ray.models import create_model
    from qgen_ray.train.finetune import check_teacher

    seen = set()
    for spec, _ in plan:
        if spec.model in seen:
            continue
        seen.add(spec.model)
        if spec.model in weights and hub:
            raise UserError(
                f"{spec.model} has both --weights and --pretrained-from-hub; pass one of them"
            )
        if spec.model not in weights and not hub:
            raise UserError(
                f"fine-tuning starts from pretrained weights: pass --weights "
                f"{spec.model}=PATH or --pretrained-from-hub"
            )
        create_model(
            spec.model,
            num_classes,
            3,
            spec.image_size,
            weights=weights.get(spec.model),
            pretrained=hub,
            **spec.model_arguments,
        )
        if any(other.distill for other, _ in plan if other.model == spec.model):
            check_teacher(spec.model, weights.get(spec.model), num_classes)


def plan_studies(studies: tuple[Study, ...], args: argparse.Namespace) -> tuple[str, list]:
    """(study name, [(spec, extra)]) of every model to run, after --smoke, --image-size
    and --models."""
    if args.smoke:
        studies = tuple(s.smoke() for s in studies)
    if args.image_size is not None:
        studies = tuple(
            replace(s, protocol={**s.protocol, "image_size": args.image_size}) for s in studies
        )
    name = f"{studies[0].name}-smoke" if args.smoke else studies[0].name
    plan = [item for s in studies for item in s.plan()]
    if args.distill:  # the VVTQ recipe's teacher, for its quantized models
        plan = [(replace(spec, distill=spec.method == "vvtq"), extra) for spec, extra in plan]
    if args.models:
        plan = [(spec, extra) for spec, extra in plan if spec.model in args.models]
    if not plan:
        raise UserError(f"no model of {', '.join(args.models)} is in this run; drop --models")
    return name, plan


def describe(studies: tuple[Study, ...], name: str, plan: list) -> dict:
    """study.json: the union of the studies' grids (model and precision vary)."""
    models = sorted({s.model for s, _ in plan})
    precisions = sorted({(s.method, s.bits) for s, _ in plan}, key=lambda p: -p[1])
    bits = {b for _, b in precisions}
    axes = [a for a, n in (("model", len(models)), ("bits", len(bits))) if n > 1]
    return {
        "study": name,
        "dataset": studies[0].dataset,
        "model": models,
        "axes": axes,
        "grid": {"model": models},
        "precisions": [list(p) for p in precisions],
        "protocol": {  # per model: the fields every precision of it shares
            s.model: {k: v for k, v in s.to_dict().items() if k not in ("bits", "method")}
            for s, _ in plan
        },
        "num_models": len(plan),
        "description": studies[0].description,
    }


def resources(args: argparse.Namespace):
    """Per-worker CPUs / GPUs from the flags and the cluster (call after Ray is up)."""
    from qgen_ray.ray.ddp import DDPResources
    from qgen_ray.ray.session import cluster_gpus as total_gpus

    cluster_gpus = total_gpus()
    if args.device == "cuda" and not cluster_gpus:
        raise UserError("--device cuda but the Ray cluster has no GPUs; use --device auto/cpu")
    if args.device == "cpu":
        gpus = 0.0
    elif args.gpus_per_trial is not None:
        gpus = args.gpus_per_trial
    else:
        gpus = float(args.workers) if cluster_gpus > 0 else 0.0
    default_cpus = CPUS_PER_GPU_WORKER if gpus else CPUS_PER_CPU_WORKER
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else args.workers * default_cpus
    return DDPResources(args.workers, cpus / args.workers, gpus / args.workers)


def run(studies: tuple[Study, ...], args: argparse.Namespace) -> dict:
    """Validate everything, fine-tune the pending models, collect; {stage: output path}."""
    from qgen_ray.imagenet.imagefolder import check_imagefolder
    from qgen_ray.ray import tracking
    from qgen_ray.store import StudyStore

    trackers = tracking.parse(args.callbacks)
    if args.download:
        raise UserError("ImageNet cannot be downloaded here; put it under --data-root yourself")
    stages = args.stages or list(studies[0].stages)
    if unknown := [s for s in stages if s not in STAGES]:
        raise UserError(f"unknown stage {unknown[0]}; choose from {', '.join(STAGES)}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    for flag in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (flag == "cpus_per_trial" and value <= 0)):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    name, plan = plan_studies(studies, args)
    for spec, _ in plan:
        if spec.batch_size % args.workers:
            raise UserError(
                f"--workers {args.workers} does not divide the global batch "
                f"{spec.batch_size} of {spec.model}; pick a divisor"
            )
    store = StudyStore.for_study(args.storage, name)
    first = studies[0].smoke() if args.smoke else studies[0]  # its stage options
    corrupt = corrupt_options(first, args) if "corrupt" in stages else {}
    weights = {}
    if "train" in stages:
        if corrupt:  # ImageNet-C checked before the (long) training, not after it
            check_imagenet_c(args.corrupt_root, args.data_root, corrupt["sets"])
        classes = check_imagefolder(args.data_root)
        weights = parse_weights(args.weights, sorted({s.model for s, _ in plan}))
        check_weights(plan, weights, args.pretrained_from_hub, len(classes))
    store.check_writable()
    outputs: dict[str, str] = {}
    with store.claimed(f"studies/{name}.py"):  # one writing run per study folder
        if "train" in stages:
            root = study_cli.data_root_for(store, args.data_root)  # follow-ups find it
            study_cli.write_study_record(store, describe(studies, name, plan), root)
            _finetune(store, name, plan, weights, trackers, args)
            outputs["trials"] = study_cli.collect_trials(store, name)

        def run_one(stage: str) -> str:
            options = corrupt if stage == "corrupt" else first.stage_options.get(stage, {})
            return run_followup(stage, store, args, options)

        return study_cli.later_stages(store, stages, run_one, outputs)


def _finetune(store, name: str, plan: list, weights: dict, trackers: tuple, args) -> None:
    """Fine-tune the planned models that have no result yet, through Ray Train."""
    from qgen_ray.ray.session import init_ray
    from qgen_ray.train.finetune import FinetuneOptions

    pending = study_cli.pending_models(store, plan, name, verb="fine-tune")
    if not pending:
        return
    from qgen_ray.ray.ddp import run_finetune

    init_ray(args.address)
    res = resources(args)
    print(
        f"[{name}] {res.workers} workers per run, {res.cpus_per_worker:g} CPU and "
        f"{res.gpus_per_worker:g} GPU each",
        flush=True,
    )
    options = FinetuneOptions(  # absolute paths: Ray Train workers change directory
        store=store.root if store.is_local else store.uri,
        data_root=str(Path(args.data_root).expanduser().resolve()),
        pretrained_from_hub=args.pretrained_from_hub,
        cpus_per_worker=res.cpus_per_worker,
        log_samples=args.log_samples,
    )
    run_finetune(
        store,
        pending,
        options,
        res,
        weights=weights,
        already_done=len(plan) - len(pending),
        progress=not args.quiet,
        trackers=trackers,
    )


def corrupt_options(study: Study, args: argparse.Namespace) -> dict:
    """The corrupt stage's corruptions and severities (flags over the study's
    `stage_options`), validated, with their (corruption, severity) `sets`."""
    from qgen_ray.data.corruptions import CORRUPTIONS, SEVERITIES, validate

    require_corrupt_root(args.corrupt_root)
    options = study.stage_options.get("corrupt", {})
    corruptions = list(args.corruptions or options.get("corruptions") or CORRUPTIONS)
    severities = list(args.severities or options.get("severities") or SEVERITIES)
    validate(corruptions, severities)
    sets = [[c, s] for c in corruptions for s in severities]
    return {"corruptions": corruptions, "severities": severities, "sets": sets}


def run_followup(stage: str, store, args: argparse.Namespace, options: dict) -> str:
    """A stage after fine-tuning: the follow-ups (measure, corrupt, landscape) of the
    study's models give one worker actor the CPUs and GPUs of one DDP worker (`resources`),
    several actors work on models side by side, images are read from the ImageFolder (and
    ImageNet-C); the report as any study's."""
    from qgen_ray.pipeline.followups import Placement, run_stage
    from qgen_ray.ray.session import init_ray

    if stage == "report":
        return run_stage(stage, store, args, options)
    init_ray(args.address)
    res = resources(args)
    place = Placement(
        gpus_per_task=res.gpus_per_worker,
        cpus_per_task=res.cpus_per_worker,
        data_root=args.data_root,
        address=args.address,
        device=args.device,
    )
    options = {k: v for k, v in options.items() if k != "sets"}  # corrupt's, for the checks
    return run_stage(stage, store, args, options, place)


def main(studies: tuple[Study, ...], argv: list[str] | None = None) -> dict:
    """Entry point of studies/imagenet_finetune.py and studies/corruption_imagenet.py."""
    args = parser(studies).parse_args(argv)
    outputs = exit_on_user_error(run)(studies, args)
    for name, path in outputs.items():
        print(f"{name:>10}: {path}")
    return outputs
