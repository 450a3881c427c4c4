"""DDP fine-tuning throughput: images/s per worker, and scaling from 1 to N workers.

Runs the engine's real path (Ray Tune trial -> Ray Train TorchTrainer -> DDP ranks running
`qgen_ray.train.finetune.finetune`) on a synthetic ImageFolder of JPEGs, once per worker count,
with a fixed per-worker batch (weak scaling) and fixed resources per worker. Throughput is
what the ranks measure per epoch (JPEG decode + augmentation + forward/backward + gradient
all-reduce), without Ray's start-up, from the second epoch on (the first warms up).
Every worker count runs `--repeats` times, interleaved (1, N, 1, N, ...); figures are
median [min-max], the scaling a per-round ratio. Prints figures; asserts nothing about time.

    python benchmarks/ddp_throughput.py [--workers 2] [--model resnet18] [--image-size 64]
        [--images 192] [--epochs 3] [--batch-per-worker 16] [--cpus-per-worker 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from common import hardware, ratio_verdict, summary
from PIL import Image

from qgen_ray.models import create_model
from qgen_ray.ray.ddp import DDPResources, run_finetune
from qgen_ray.ray.session import init_ray
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train.finetune import FinetuneOptions

CLASSES = 4
SOURCE_SIZE = 80  # side of the synthetic JPEGs (RandomResizedCrop scales them down)


def synthetic_imagefolder(root: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", CLASSES)):
        for i in range(n):
            folder = root / split / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (SOURCE_SIZE, SOURCE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def measure(args, workers: int, root: Path, weights: Path, tmp: Path) -> dict:
    spec = TrainSpec(
        dataset="imagenet",
        model=args.model,
        method="lsq",
        bits=4,
        epochs=args.epochs,
        batch_size=args.batch_per_worker * workers,
        lr=0.01,
        weight_decay=1e-4,
        milestones=(args.epochs,),
        image_size=args.image_size,
    )
    store = StudyStore(str(tmp / f"store-{workers}"))
    options = FinetuneOptions(
        store=store.uri,
        data_root=str(root),
        weights=str(weights),
        cpus_per_worker=args.cpus_per_worker,
    )
    gpus = 1.0 if args.gpu else 0.0
    start = time.time()
    run_finetune(
        store,
        [(spec, {})],
        options,
        DDPResources(workers, args.cpus_per_worker, gpus),
        progress=False,
    )
    wall = time.time() - start
    result = store.trial(spec.model_id).read_result()
    if result["status"] != "ok":
        raise SystemExit(f"run with {workers} workers failed: {result.get('reason')}")
    rates = [h["images_per_s"] for h in result["history"][1:]]
    train_seconds = sum(h["seconds"] for h in result["history"])
    return {
        "workers": workers,
        "images_per_s": statistics.median(rates),
        "wall": wall,
        "train_seconds": train_seconds,
        "device": result["device"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="largest worker count (from 1)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=192, help="training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-per-worker", type=int, default=16)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--address", default=None, help="Ray cluster (default: a local Ray)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3 for a range)")
    args = p.parse_args()

    counts = sorted({1, args.workers})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = synthetic_imagefolder(tmp / "data", args.images)
        weights = tmp / "weights.pt"
        torch.save(create_model(args.model, 1000, 3, args.image_size).state_dict(), weights)
        init_ray(args.address)
        resources = ray.cluster_resources()
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            for w in counts:
                runs[w].append(measure(args, w, root, weights, tmp / f"round-{r}"))

    kind = "GPU, NCCL, bf16 autocast + channels-last" if args.gpu else "CPU, gloo, fp32"
    print(f"# DDP fine-tuning throughput via Ray Train ({kind}; device {runs[1][0]['device']})")
    print(
        f"# host: {hardware()}; Ray cluster CPUs {resources.get('CPU', 0):g}, GPUs "
        f"{resources.get('GPU', 0):g}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (a shared machine is noisy)"
    )
    print(
        f"# {args.model} LSQ-4, {args.image_size}px RandomResizedCrop+flip from "
        f"{SOURCE_SIZE}px JPEGs, {args.images} train images, batch {args.batch_per_worker} "
        f"per worker, {args.cpus_per_worker:g} CPU per worker; median over epochs "
        f"2..{args.epochs}; {args.repeats} rounds interleaved, median [min-max]"
    )
    print(f"{'workers':>7}  {'images/s':<22} {'per worker':<22} {'run wall s':<22}")
    for w in counts:
        rates = [r["images_per_s"] for r in runs[w]]
        per_worker = summary([x / w for x in rates], "{:.1f}")
        walls = summary([r["wall"] for r in runs[w]], "{:.0f}")
        print(f"{w:>7}  {summary(rates, '{:.1f}'):<22} {per_worker:<22} {walls:<22}")
    for w in counts[1:]:
        scaling = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[w], runs[1])]
        print(
            f"scaling 1 -> {w} workers (per round): {summary(scaling, '{:.2f}x')}, efficiency "
            f"{summary([x / w for x in scaling], '{:.0%}')}: {ratio_verdict(scaling)}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
