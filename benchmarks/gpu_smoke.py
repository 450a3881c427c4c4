"""The fused trainer and the fast measure search on a GPU, checked and timed (Ray-free).

1. A packed smoke grid (digits NiNs at FP32 / int8 / int4 / int2, SGD / Adam / RMSprop,
   2 epochs) on the device: every member against its spec trained alone by `train`, in
   float64 (the exactness claim: agree to ~1e-9) and float32 (within float32's spread),
   and the fast paths (bf16 autocast + channels-last) against float32; seconds of each.
2. The fast σ / α search (`qgen measure`'s job) on one CIFAR-shaped NiN (width 10, depth
   3, int4) trained two epochs on 10,000 CIFAR-shaped images with a learnable label:
   wall seconds, images through the network, and each measure.

    PYTHONPATH=. python benchmarks/gpu_smoke.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from qgen_ray.spec import RunOptions, TrainSpec

MIXED = [("fp32", 32, "sgd", 0.05, 5e-4), ("lsq", 8, "adam", 1e-3, 0.0),
         ("lsq", 4, "rmsprop", 5e-4, 5e-4), ("lsq", 2, "sgd", 0.1, 0.0)]  # fmt: skip


def digits_pack() -> list[TrainSpec]:
    return [TrainSpec(dataset="digits", model="nin", width=1, depth=2, epochs=2, batch_size=64,
                      milestones=(1,), gamma=0.5, method=m, bits=b, optimizer=o, lr=lr,
                      weight_decay=wd, seed=i)
            for i, (m, b, o, lr, wd) in enumerate(MIXED)]  # fmt: skip


def worst_relative(rows_a: list[dict], rows_b: list[dict], first_epoch_only=False) -> float:
    """The largest relative difference of the members' training losses and test metrics."""
    worst = 0.0
    for a, b in zip(rows_a, rows_b, strict=True):
        pairs = [(ha["train_loss"], hb["train_loss"]) for ha, hb in zip(a["history"], b["history"])]
        if first_epoch_only:
            pairs = pairs[:1]
        else:
            pairs += [(a[k], b[k]) for k in ("test_loss", "test_acc", "train_acc")]
        worst = max([worst, *(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)])
    return worst


def check_pack(device: str) -> None:
    from qgen_ray.data import load_image_data
    from qgen_ray.train import train
    from qgen_ray.train.pack import train_pack

    data, specs = load_image_data("digits"), digits_pack()
    for dtype in ("float64", "float32"):
        options = RunOptions(device=device, dtype=dtype)
        t0 = time.time()
        packed = train_pack(specs, data, options=options)
        t1 = time.time()
        alone = [train(s, data, options=options) for s in specs]
        t2 = time.time()
        print(f"pack of 4 vs alone, {dtype}: worst relative difference "
              f"{worst_relative(packed, alone):.2e}; packed {t1 - t0:.1f}s, "
              f"alone {t2 - t1:.1f}s", flush=True)  # fmt: skip
        if dtype == "float32":
            fast = RunOptions(device=device, amp="bf16", channels_last=True)
            t0 = time.time()
            quick = train_pack(specs, data, options=fast)
            print(f"pack of 4, bf16 autocast + channels-last vs float32: first-epoch loss "
                  f"within {worst_relative(quick, packed, True):.2%}; {time.time() - t0:.1f}s",
                  flush=True)  # fmt: skip


def learnable_cifar(n: int, seed: int = 0):
    """CIFAR-shaped images with a learnable label: image y has its region y (one of 10
    fixed 16x6 patches) brightened by 80 levels."""
    from benchmarks.population_throughput import cifar_shaped

    data = cifar_shaped(n, n_test=1000, seed=seed)
    masks = torch.zeros(10, 1, 32, 32, dtype=torch.bool)
    for r in range(10):
        masks[r, :, (r // 5) * 16 : (r // 5 + 1) * 16, (r % 5) * 6 : (r % 5) * 6 + 6] = True
    for name, y in (("train_x", data.train_y), ("test_x", data.test_y)):
        x = getattr(data, name)
        setattr(data, name, torch.where(masks[y], (x.int() + 80).clamp(max=255).byte(), x))
    return data


def check_measures(device: str, images: int, width: int, depth: int) -> None:
    from qgen_ray.measures import MEASURES
    from qgen_ray.pipeline.jobs import measure_one
    from qgen_ray.store import StudyStore
    from qgen_ray.train import train

    data = learnable_cifar(images)
    spec = TrainSpec(dataset="cifar10", model="nin", width=width, depth=depth, epochs=2,
                     batch_size=128, milestones=(1,), method="lsq", bits=4, lr=0.05)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = StudyStore(tmp + "/gpu")
        t0 = time.time()
        row = train(spec, data, store.trial(spec.model_id), RunOptions(device=device))
        store.trial(spec.model_id).write_result(row)
        print(f"NiN {width}x{depth} int4 on {images:,} CIFAR-shaped images: 2 epochs in "
              f"{time.time() - t0:.1f}s, train acc {row['train_acc']:.3f}, "
              f"test acc {row['test_acc']:.3f}", flush=True)  # fmt: skip
        t0 = time.time()
        rows = measure_one(store, data, {"model_id": spec.model_id}, device,
                           names=MEASURES.names(), mode="fast", seed=0)  # fmt: skip
        seconds = time.time() - t0
    images = sum(r.get("forward_images") or 0 for r in rows)
    print(f"fast measure search, all {len(rows)} measures: {seconds:.1f}s, "
          f"{images:,} images through the network", flush=True)  # fmt: skip
    for r in rows:
        print(f"  {r['measure']}: {r['value']:.4g}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=10_000, help="CIFAR-shaped training images")
    p.add_argument("--shape", default="10x3", help="NiN WIDTHxDEPTH measured (default 10x3)")
    p.add_argument("--skip-measures", action="store_true")
    args = p.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    check_pack(args.device)
    if not args.skip_measures:
        width, depth = (int(v) for v in args.shape.split("x"))
        check_measures(args.device, args.images, width, depth)


if __name__ == "__main__":
    main()
