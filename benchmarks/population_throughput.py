"""Population throughput: how fast a device trains a population of NiN CIFAR-10 models.

Four ways to spend one device on many models of one shape, each timed on the real
trainers (`qgen_ray.train.train`, `qgen_ray.train.pack.train_pack`) over CIFAR-shaped data
(3x32x32 uint8, 10 classes, random crop + flip, batch 128 per model):

    one      one model at a time on the whole device (a trial per device)
    procs4   four OS processes sharing the device, one model each: what four fractional
             Ray trials (`--gpus-per-trial 0.25`) are
    fused-K  K models as one fused network in one process (`--pack K`), K = 4, 12, 36

For each: model-steps per second (one model's optimizer step on 128 images), images per
second, model FLOP utilization (training FLOPs per image counted with
`torch.utils.flop_counter.FlopCounterMode`, against a dense matmul timed on the same
device in the same dtype, and on a known GPU against its nominal bf16 peak too), models
per hour and the GPU-hours of the paper's 1,944-model population at its protocol (300
epochs of 391 steps), and the speed-up over `procs4`. Each timing is the second of two
epochs (the first warms up: allocator, cuDNN autotune, torch.compile), repeated
`--repeats` times with the modes interleaved; the table prints median [min-max].

Ray-free: runs from a checkout with `PYTHONPATH=.` where Ray is not installed.

    python benchmarks/population_throughput.py [--device auto] [--shapes 8x2 10x3 12x4]
        [--packs 4 12 36] [--steps N] [--repeats 3] [--amp bf16] [--channels-last] [--compile]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch
from common import hardware, summary

from qgen_ray.data.base import ImageData
from qgen_ray.spec import RunOptions, TrainSpec

BATCH = 128
PAPER_STEPS_PER_MODEL = 391 * 300  # ceil(50,000 / 128) steps x 300 epochs
PAPER_POPULATION = 1944
PAPER_A100_HOURS = 1134  # the paper's population: 8 A100s for ~6 days
# Nominal dense bf16 tensor-core peaks (TFLOP/s, SXM parts) of GPUs this may run on.
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# Precisions and optimizers cycled over a pack's members: a pack mixes them, as a grid does.
MIX = [("fp32", 32, "sgd", 0.1), ("lsq", 8, "adam", 1e-3), ("lsq", 4, "rmsprop", 5e-4),
       ("lsq", 2, "sgd", 0.05)]  # fmt: skip


def cifar_shaped(n_train: int, n_test: int = BATCH, seed: int = 0) -> ImageData:
    """Random uint8 images with CIFAR-10's shapes, statistics and augmentation."""
    gen = torch.Generator().manual_seed(seed)
    return ImageData(
        name="cifar10",
        train_x=torch.randint(0, 256, (n_train, 3, 32, 32), generator=gen, dtype=torch.uint8),
        train_y=torch.randint(0, 10, (n_train,), generator=gen),
        test_x=torch.randint(0, 256, (n_test, 3, 32, 32), generator=gen, dtype=torch.uint8),
        test_y=torch.randint(0, 10, (n_test,), generator=gen),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        num_classes=10,
        crop_padding=4,
        flip=True,
    )


def member(width: int, depth: int, i: int) -> TrainSpec:
    method, bits, optimizer, lr = MIX[i % len(MIX)]
    return TrainSpec(dataset="cifar10", model="nin", width=width, depth=depth, epochs=2,
                     batch_size=BATCH, milestones=(100, 200), method=method, bits=bits,
                     optimizer=optimizer, lr=lr, seed=i)  # fmt: skip


def second_epoch_seconds(row: dict) -> float:
    return float(row["history"][1]["seconds"])


def time_one(shape, steps: int, options: RunOptions) -> float:
    """Model-steps per second of one model on the whole device (the plain trainer)."""
    from qgen_ray.train import train

    row = train(member(*shape, 0), cifar_shaped(steps * BATCH), options=options)
    return steps / second_epoch_seconds(row)


def _process_worker(args) -> float:
    shape, steps, options, threads, i = args
    torch.set_num_threads(threads)
    from qgen_ray.train import train

    row = train(member(*shape, i), cifar_shaped(steps * BATCH, seed=i), options=options)
    return steps / second_epoch_seconds(row)


def time_processes(shape, steps: int, options: RunOptions, procs: int = 4) -> float:
    """Model-steps per second of `procs` processes sharing the device, one model each
    (the sum of their rates in their second epochs, which run side by side)."""
    threads = max(1, (os.cpu_count() or 1) // procs)
    with mp.get_context("spawn").Pool(procs) as pool:
        rates = pool.map(
            _process_worker, [(shape, steps, options, threads, i) for i in range(procs)]
        )
    return sum(rates)


def time_fused(shape, k: int, steps: int, options: RunOptions) -> float:
    """Model-steps per second of K models trained as one fused network."""
    from qgen_ray.train.pack import train_pack

    rows = train_pack(
        [member(*shape, i) for i in range(k)], cifar_shaped(steps * BATCH), options=options
    )
    return k * steps / max(second_epoch_seconds(r) for r in rows)


def train_flops_per_image(shape, device: torch.device) -> float:
    """Forward + backward FLOPs of one model on one CIFAR image (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from qgen_ray.train.build import build_model

    model = build_model(member(*shape, 0), 10, 3, 32).to(device)
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / BATCH


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput measured on the device: the practical peak MFU is read against."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 50 if device.type == "cuda" else 5
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def nominal_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="NiN WIDTHxDEPTH (default: 8x2 10x3 12x4 on a GPU, 8x2 on a CPU)",
    )
    p.add_argument(
        "--packs",
        nargs="+",
        type=int,
        default=None,
        help="fused pack sizes (default 4 12 36 on a GPU, 4 12 on a CPU)",
    )
    p.add_argument(
        "--modes", nargs="+", default=["one", "procs4", "fused"], choices=["one", "procs4", "fused"]
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per epoch (default 20 on a GPU, 3 on a CPU)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--amp", default="off", choices=["off", "bf16"], help="fused modes only")
    p.add_argument("--channels-last", action="store_true", help="fused modes only")
    p.add_argument("--compile", action="store_true", help="fused modes only")
    args = p.parse_args()  # fmt: skip
    from qgen_ray.train.loop import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    shapes = [
        tuple(int(v) for v in s.split("x"))
        for s in (args.shapes or (["8x2", "10x3", "12x4"] if gpu else ["8x2"]))
    ]
    packs = args.packs or ([4, 12, 36] if gpu else [4, 12])
    steps = args.steps or (20 if gpu else 3)
    plain = RunOptions(device=device.type)
    fused = RunOptions(device=device.type, amp=args.amp, channels_last=args.channels_last,
                       compile=args.compile)  # fmt: skip
    chosen = [("bf16 autocast", args.amp == "bf16"), ("channels-last", args.channels_last),
              ("torch.compile", args.compile)]  # fmt: skip
    fast = ", ".join(name for name, on in chosen if on) or "eager fp32"
    print(f"hardware: {hardware(device)}; {steps} steps of {BATCH} images per model and epoch, "
          f"second epoch timed, {args.repeats} repeats interleaved; fused modes: {fast}",
          flush=True)  # fmt: skip
    peak_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak = matmul_tflops(device, peak_dtype)
    nominal = nominal_peak(device)
    print(f"measured dense matmul peak ({str(peak_dtype).removeprefix('torch.')}): {peak:.3g} "
          f"TFLOP/s" + (f"; nominal bf16 peak {nominal:g} TFLOP/s" if nominal else ""),
          flush=True)  # fmt: skip

    modes = []
    for mode in args.modes:
        if mode == "fused":
            modes += [
                (f"fused-{k}", lambda shape, k=k: time_fused(shape, k, steps, fused)) for k in packs
            ]
        elif mode == "procs4":
            modes.append(("procs4", lambda shape: time_processes(shape, steps, plain)))
        else:
            modes.append(("one", lambda shape: time_one(shape, steps, plain)))
    for shape in shapes:
        flops = train_flops_per_image(shape, device)
        rates: dict[str, list[float]] = {name: [] for name, _ in modes}
        for r in range(args.repeats):
            for name, measure in modes:
                rates[name].append(measure(shape))
                print(f"  NiN {shape[0]}x{shape[1]} repeat {r + 1} {name}: "
                      f"{rates[name][-1]:.3g} model-steps/s", flush=True)  # fmt: skip
        print(f"\nNiN width {shape[0]} depth {shape[1]}: {flops / 1e9:.3g} GFLOP per training "
              f"image; median [min-max] over {args.repeats} repeats")  # fmt: skip
        header = ["mode", "images/s", "TFLOP/s", "MFU (matmul)"]
        header += ["MFU (nominal bf16)"] if nominal else []
        header += ["models/hour", "population GPU-h" if gpu else "population device-h", "vs procs4"]
        print(" | ".join(header))
        for name, _ in modes:
            ips = [v * BATCH for v in rates[name]]
            tflops = [v * flops / 1e12 for v in ips]
            per_hour = [3600 * v / PAPER_STEPS_PER_MODEL for v in rates[name]]
            cells = [
                name,
                summary(ips),
                summary(tflops),
                summary([t / peak for t in tflops], "{:.1%}"),
            ]
            cells += [summary([t / nominal for t in tflops], "{:.1%}")] if nominal else []
            cells += [summary(per_hour), summary([PAPER_POPULATION / v for v in per_hour])]
            if "procs4" in rates:
                cells.append(
                    summary([a / b for a, b in zip(rates[name], rates["procs4"])], "{:.2f}x")
                )
            else:
                cells.append("-")
            print(" | ".join(cells), flush=True)
    print(f"\n(the paper: {PAPER_POPULATION} models in ~{PAPER_A100_HOURS} A100-hours)")


if __name__ == "__main__":
    main()
