"""What each stage of the ImageNet workflow costs on a fixture, end to end as a user runs
it: fine-tune (studies/corruption_imagenet.py --smoke --stages train: ResNet-18 FP32 and
LSQ-2, 2 epochs at 32 px, Ray Train DDP) -> `qgen measure` (fast; the smoke run's
measures, one PAC-Bayes search and the weight norm) -> `qgen corrupt` (ImageNet-C) ->
`qgen landscape` (11 x 11 grid) -> `qgen report`, each a fresh process (Ray's start
included), the data root found in study.json after the first stage. On a CPU a sharpness
search of a ResNet-18 takes minutes (its ascent is 20 gradient steps of 32 restarts per
probe) and a 51 x 51 landscape ~20x the 11 x 11 one: `--measures all --steps 51` for
those figures.

The fixture: an ImageFolder of 10 classes x 20 training and 5 validation JPEGs (64 px)
written here, an ImageNet-C folder of 2 corruptions x 2 severities made from its val
images, random "pretrained" ResNet-18 weights. Prints figures; asserts nothing.

    python benchmarks/imagenet_stages.py [--repeats 3] [--device cpu|cuda]
        [--measures NAME ... | all] [--steps 11]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware, summary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.support.fixtures import save_weights, write_imagefolder, write_imagenet_c  # noqa: E402

CLASSES, TRAIN, VAL = 10, 20, 5
SETS = [("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 1), ("contrast", 5)]
STUDY = "corruption_imagenet-smoke"


def stages(data, imagenet_c, weights, store: Path, device: str, measures, steps) -> dict:
    study = str(store / STUDY)
    qgen = [sys.executable, "-m", "qgen_ray"]
    return {
        "fine-tune (2 models)": [
            sys.executable, "studies/corruption_imagenet.py", "--smoke", "--stages", "train",
            "--data-root", str(data), "--weights", f"resnet18={weights}", "--workers", "2",
            "--storage", str(store), "--quiet", "--device", device,
        ],
        f"measure (fast, {', '.join(measures)})": [
            *qgen, "measure", study, "--device", device,
            *([] if measures == ["all"] else ["--measures", *measures]),
        ],
        f"corrupt ({len(SETS)} ImageNet-C sets)": [
            *qgen, "corrupt", study, "--corrupt-root", str(imagenet_c), "--device", device,
            "--corruptions", *sorted({c for c, _ in SETS}),
            "--severities", *sorted({str(s) for _, s in SETS}),
        ],
        f"landscape (2 models, {steps}x{steps})": [
            *qgen, "landscape", study, "--device", device, "--steps", str(steps),
        ],
        "report": [*qgen, "report", study],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs (>= 3 for a range)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument(
        "--measures",
        nargs="+",
        default=["pacbayes_init", "weight_norm"],
        help="measure names, or all (default: the smoke run's two)",
    )
    p.add_argument("--steps", type=int, default=11, help="landscape grid (paper: 51)")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_imagefolder(tmp / "data", classes=CLASSES, train=TRAIN, val=VAL, size=64)
        wnids = sorted(p.name for p in (data / "val").iterdir())
        imagenet_c = write_imagenet_c(tmp / "imagenet-c", data / "val", dict.fromkeys(SETS, wnids))
        weights = save_weights(tmp / "r18.pt")
        for run in range(args.repeats):
            store = tmp / f"store{run}"
            plan = stages(data, imagenet_c, weights, store, args.device, args.measures, args.steps)
            for name, cmd in plan.items():
                t0 = time.time()
                out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
                seconds.setdefault(name, []).append(time.time() - t0)
    print(f"# hardware: {hardware()}; fixture: {CLASSES} classes x {TRAIN} training images")
    print(f"{'stage':<44} seconds, {args.repeats} runs (Ray start included)")
    for name, values in seconds.items():
        print(f"{name:<44} {summary(values, '{:.0f}')}")
    total = [sum(v) for v in zip(*seconds.values(), strict=True)]
    print(f"{'all stages':<44} {summary(total, '{:.0f}')}")


if __name__ == "__main__":
    main()
