"""Training throughput: the engine's loop vs a plain DataLoader + torchvision-transforms
loop, same model, same data; plus Ray Tune's per-trial overhead. Each measurement is
repeated (`--repeats`, interleaved: every round runs every variant once) and printed as
median [min-max]; a ratio whose range includes 1 is reported as no measurable gain.

Prints figures; asserts nothing about time. Data: CIFAR-shaped random uint8 images
(3x32x32, crop-4 + flip augmentation, as the CIFAR studies train), so no download.

    python benchmarks/train_throughput.py [--images 5000] [--epochs 2] [--trials 8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from common import hardware, ratio_verdict, summary
from PIL import Image

from qgen_ray.data.base import ImageData
from qgen_ray.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from qgen_ray.spec import RunOptions, TrainSpec
from qgen_ray.train import build_model, make_optimizer, train


def cifar_shaped(n: int) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("cifar-shaped", x, y, x[:500], y[:500], CIFAR10_MEAN, CIFAR10_STD, 10, 4, True)


class PILDataset(torch.utils.data.Dataset):
    """What a torchvision CIFAR pipeline does: PIL image per item, transforms per image."""

    def __init__(self, data: ImageData):
        self.images = data.train_x.permute(0, 2, 3, 1).numpy()
        self.labels = data.train_y.tolist()
        self.transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def plain_epoch_seconds(spec: TrainSpec, data: ImageData, epochs: int, workers: int) -> float:
    torch.manual_seed(spec.seed)
    model = build_model(spec, 10, 3, 32)
    opt = make_optimizer(spec, model)
    loader = torch.utils.data.DataLoader(
        PILDataset(data), batch_size=spec.batch_size, shuffle=True, num_workers=workers
    )
    times = []
    for _ in range(epochs):
        t0 = time.time()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.time() - t0)
    return min(times)


def tune_overhead(trials: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds of N one-epoch digits trials under Tune (Ray already started), and of
    the same trials run directly, one pair per round."""
    from qgen_ray.data import load_image_data
    from qgen_ray.ray.session import init_ray
    from qgen_ray.ray.tune_study import run_training
    from qgen_ray.store import StudyStore

    data = load_image_data("digits")
    specs = [
        TrainSpec(
            dataset="digits",
            model="nin",
            width=1,
            depth=2,
            epochs=1,
            seed=s,
            batch_size=64,
            augment=False,
        )
        for s in range(trials)
    ]
    init_ray(None)
    tuned, direct = [], []
    for _ in range(repeats):
        t0 = time.time()
        for s in specs:
            train(s, data)
        direct.append(time.time() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            store = StudyStore(os.path.join(tmp, "bench"))
            t0 = time.time()
            run_training(
                store,
                [[(s, {})] for s in specs],
                data,
                RunOptions(device="cpu"),
                1.0,
                0.0,
                progress=False,
            )
            tuned.append(time.time() - t0)
    return tuned, direct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--model-width", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3 for a range)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = cifar_shaped(args.images)
    spec = TrainSpec(
        dataset="cifar10",
        model="nin",
        width=args.model_width,
        depth=3,
        bits=4,
        method="lsq",
        epochs=args.epochs,
        batch_size=128,
        milestones=(1000,),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# hardware: {hardware(device)}")
    print(
        f"# model: NiN depth 3 width {args.model_width}, LSQ int4; {args.images} CIFAR-shaped "
        f"images, batch 128, crop-4 + flip; best of {args.epochs} epochs per run; "
        f"{args.repeats} rounds, interleaved; median [min-max]"
    )
    names = [
        "engine (in-memory uint8, batched augmentation)",
        "DataLoader + torchvision transforms, 0 workers",
        "DataLoader + torchvision transforms, 2 workers",
    ]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        result = train(spec, data, options=RunOptions(device="auto"))
        seconds[names[0]].append(min(h["seconds"] for h in result["history"]))
        for name, workers in zip(names[1:], (0, 2)):
            seconds[name].append(plain_epoch_seconds(spec, data, args.epochs, workers))
    for name in names:
        rates = [args.images / sec for sec in seconds[name]]
        print(f"{name:<52} {summary(rates, '{:.0f}')} images/s")
    ratios = [
        min(seconds[names[1]][r], seconds[names[2]][r]) / seconds[names[0]][r]
        for r in range(args.repeats)
    ]
    print(
        f"speed-up of the engine over the best plain loop (per round): "
        f"{summary(ratios, '{:.2f}x')}: {ratio_verdict(ratios)}"
    )
    tuned, direct = tune_overhead(args.trials, args.repeats)
    concurrency = max(1, int(os.cpu_count() or 1))
    overhead = [(t - d / concurrency) / (args.trials / concurrency) for t, d in zip(tuned, direct)]
    print(
        f"Tune (Ray already started, not timed): {args.trials} one-epoch digits trials in "
        f"{summary(tuned, '{:.1f}')} s (direct sequential {summary(direct, '{:.1f}')} s, "
        f"{concurrency} concurrent) -> {summary(overhead, '{:.1f}')} s overhead per trial slot"
    )


if __name__ == "__main__":
    main()
