"""Fast vs faithful σ / α search on the same models in one run: agreement and cost.

Trains a handful of small CNNs on scikit-learn's digits (different widths, epochs and
weight decay, so their flatness differs), then runs every search measure in both modes
with several seeds and prints, per model and perturbation family: σ of each mode (geometric
mean over seeds, and the spread over seeds), images pushed through the network, wall
seconds, and the ratios; then per family the agreement (max |σ_fast / σ_faithful − 1|,
Kendall τ of the two orderings of the models) and the totals. Hardware and versions head
the output. Usage:

    .venv/bin/python benchmarks/measures_fast_vs_faithful.py [--seeds 2] [--train 1797]
"""

from __future__ import annotations

import argparse
import math
import os
import platform

import torch
from scipy.stats import kendalltau

from qgen_ray.measures import compute_measures
from qgen_ray.measures.perturb import FAMILIES
from qgen_ray.measures.toy import accuracy, digits, tiny_cnn, train_tiny

# (width, epochs, weight decay) of the benchmark models
MODELS = [(8, 3, 0.0), (8, 10, 1e-3), (8, 20, 0.0), (16, 10, 0.0), (4, 10, 0.0)]
MODES = ("faithful", "fast")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="search seeds per mode")
    parser.add_argument("--train", type=int, default=1797, help="digits training images")
    args = parser.parse_args()

    print(f"cpu: {cpu_model()}; cores: {os.cpu_count()}; torch threads: "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"torch {torch.__version__}; python {platform.python_version()}; device cpu")
    x, y = digits(args.train, seed=0)
    print(f"data: digits, m = {x.shape[0]} training images; seeds per mode: {args.seeds}\n")

    families = list(FAMILIES)
    names = [f"{f}_{ref}" for f in families for ref in ("init", "orig")]
    # results[(model, mode, family)] = list of (sigma, converged, images, seconds) per seed
    results: dict[tuple, list] = {}
    for i, (width, epochs, wd) in enumerate(MODELS):
        model, init = train_tiny(tiny_cnn(width, seed=i), x, y, epochs=epochs, weight_decay=wd)
        print(f"model {i}: width {width}, {epochs} epochs, wd {wd}, "
              f"train acc {accuracy(model, x, y):.3f}")  # fmt: skip
        for mode in MODES:
            for seed in range(args.seeds):
                rows = compute_measures(model, init, x, y, names=names, mode=mode, seed=seed)
                by = {r["measure"]: r for r in rows}
                for f in families:
                    a, b = by[f"{f}_init"], by[f"{f}_orig"]
                    results.setdefault((i, mode, f), []).append(
                        (a["sigma"], a["converged"], a["forward_images"] + b["forward_images"],
                         a["seconds"] + b["seconds"])
                    )  # fmt: skip
        for f in families:
            cells = []
            for mode in MODES:
                runs = results[(i, mode, f)]
                sig = [r[0] for r in runs]
                conv = sum(r[1] for r in runs)
                imgs = sum(r[2] for r in runs) / len(runs)
                secs = sum(r[3] for r in runs) / len(runs)
                cells.append((geomean(sig), min(sig), max(sig), conv, imgs, secs))
            (s1, lo1, hi1, c1, i1, t1), (s2, lo2, hi2, c2, i2, t2) = cells
            print(f"  {f:14s} σ faithful {s1:.4f} [{lo1:.4f}-{hi1:.4f}] conv {c1}/{args.seeds}"
                  f" | fast {s2:.4f} [{lo2:.4f}-{hi2:.4f}] conv {c2}/{args.seeds}"
                  f" | fast/faithful σ {s2 / s1:.3f} | images {i1:,.0f} vs {i2:,.0f}"
                  f" ({i1 / i2:.1f}x fewer) | s {t1:.2f} vs {t2:.2f} ({t1 / t2:.1f}x)")  # fmt: skip
        print()

    print("per family over the models (σ = geometric mean over seeds):")
    totals = {m: [0.0, 0.0] for m in MODES}
    for f in families:
        sig = {m: [geomean([r[0] for r in results[(i, m, f)]]) for i in range(len(MODELS))]
               for m in MODES}  # fmt: skip
        imgs = {m: sum(r[2] for i in range(len(MODELS)) for r in results[(i, m, f)])
                for m in MODES}  # fmt: skip
        secs = {m: sum(r[3] for i in range(len(MODELS)) for r in results[(i, m, f)])
                for m in MODES}  # fmt: skip
        for m in MODES:
            totals[m][0] += imgs[m]
            totals[m][1] += secs[m]
        worst = max(abs(a / b - 1) for a, b in zip(sig["fast"], sig["faithful"]))
        tau = kendalltau(sig["fast"], sig["faithful"]).statistic
        print(f"  {f:14s} max |σ_fast/σ_faithful - 1| = {worst:.3f}; Kendall τ = {tau:.2f}; "
              f"images {imgs['faithful'] / imgs['fast']:.1f}x fewer; "
              f"wall {secs['faithful'] / secs['fast']:.1f}x faster")  # fmt: skip
    (fi, fs), (qi, qs) = totals["faithful"], totals["fast"]
    print(
        f"total: faithful {fi:,.0f} images {fs:.1f} s; fast {qi:,.0f} images {qs:.1f} s; "
        f"ratio {fi / qi:.1f}x images, {fs / qs:.1f}x wall"
    )


if __name__ == "__main__":
    main()
