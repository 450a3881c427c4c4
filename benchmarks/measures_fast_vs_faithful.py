"""Fast vs faithful σ / α search on a study's trained models, in one run: agreement and cost.

Loads the finished models of a study folder (default: the demo's, `make demo` first) the
way `qgen measure` does (quantizers replaced by their de-quantized weights, BN folded,
full training set), runs the chosen searches in both modes with several seeds, and prints
per model and perturbation family: σ of each mode (geometric mean over seeds, and the
range), convergence, images pushed through the network, wall seconds and the ratios; then
per family the agreement (max |σ_fast / σ_faithful − 1|, Kendall τ of the two orderings
of the models), next to the faithful protocol's agreement with itself (one seed against
the others: the Monte-Carlo noise floor any comparison with it inherits),
and the totals. Hardware and versions head the output.

With `--reference K` (default 128; 0 turns it off) it also runs, once per model and
family, a precise search: the fast protocol with K directions on the FULL training set and
a ±0.005 band, so its drop at a radius carries ~1/2 the Monte-Carlo error of one fast probe
and none of the image subsampling. Both modes are then also scored against it: it is the
radius both protocols estimate (where the mean drop crosses 0.1), so "fast vs reference"
says how well the fast mode measures it and "faithful vs reference" how far the paper's
protocol lands from it (its first-in-band rule with 10 perturbations per step accepts
steps whose true drop is far from 0.1: ≈ 0.07 on a 2-bit demo NiN). Its images are not
counted in either mode's cost.
Usage:

    .venv/bin/python benchmarks/measures_fast_vs_faithful.py [results/demo] [--models 8]
        [--seeds 3] [--reference 128]
        [--families pacbayes pacbayes_mag sharpness sharpness_mag]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from common import hardware
from scipy.stats import kendalltau

from qgen_ray.errors import exit_on_user_error
from qgen_ray.measures import compute_measures
from qgen_ray.measures.perturb import FAMILIES
from qgen_ray.pipeline.followups import ok_trials, study_data
from qgen_ray.pipeline.jobs import measure_inputs
from qgen_ray.store import StudyStore

MODES = ("faithful", "fast")
REFERENCE = "reference"


def reference_overrides(directions: int) -> dict:
    """The precise search: fast protocol, K directions, full training set, ±0.005 band."""
    return dict(samples=directions, restarts=directions, max_images=None, first_chunk=None,
                tolerance=0.005)  # fmt: skip


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def pick_models(trials, limit: int | None) -> list[dict]:
    """Up to `limit` models spread over the precisions (round robin, lowest lr rank first)."""
    by_bits = [
        group.sort_values("model_id").to_dict("records")
        for _, group in trials.sort_values("bits").groupby("bits", sort=True)
    ]
    order = [rows[i] for i in range(max(map(len, by_bits))) for rows in by_bits if i < len(rows)]
    return order[:limit] if limit else order


def search_model(model, init, x, y, families, seeds, device, reference: int) -> dict:
    """{(mode, family): [(σ, converged, images, seconds) per seed]} for one model; with
    `reference` > 0 also {(REFERENCE, family): [one run]}."""
    names = [f"{f}_init" for f in families]  # one search serves _init and _orig
    # (label, protocol mode, seed, protocol overrides)
    runs = [(mode, mode, seed, None) for mode in MODES for seed in range(seeds)]
    if reference:
        runs.append((REFERENCE, "fast", 0, reference_overrides(reference)))
    out: dict[tuple, list] = {}
    for label, mode, seed, overrides in runs:
        rows = compute_measures(model, init, x, y, names=names, mode=mode, seed=seed,
                                device=device, protocol_overrides=overrides)  # fmt: skip
        for f, r in zip(families, rows):
            out.setdefault((label, f), []).append(
                (r["sigma"], r["converged"], r["forward_images"], r["seconds"])
            )
    return out


def print_model_line(f: str, runs: dict, seeds: int) -> None:
    cells = []
    for mode in MODES:
        sig = [r[0] for r in runs[(mode, f)]]
        conv = sum(r[1] for r in runs[(mode, f)])
        imgs = sum(r[2] for r in runs[(mode, f)]) / seeds
        secs = sum(r[3] for r in runs[(mode, f)]) / seeds
        cells.append((geomean(sig), min(sig), max(sig), conv, imgs, secs))
    (s1, lo1, hi1, c1, i1, t1), (s2, lo2, hi2, c2, i2, t2) = cells
    ref = ""
    if (REFERENCE, f) in runs:
        r = runs[(REFERENCE, f)][0][0]
        ref = f" | reference {r:.4f}: fast/ref {s2 / r:.3f}, faithful/ref {s1 / r:.3f}"
    print(f"  {f:14s} σ faithful {s1:.4f} [{lo1:.4f}-{hi1:.4f}] conv {c1}/{seeds}"
          f" | fast {s2:.4f} [{lo2:.4f}-{hi2:.4f}] conv {c2}/{seeds}"
          f" | fast/faithful σ {s2 / s1:.3f} | images {i1:,.0f} vs {i2:,.0f}"
          f" ({i1 / i2:.1f}x fewer) | s {t1:.2f} vs {t2:.2f} ({t1 / t2:.1f}x){ref}",
          flush=True)  # fmt: skip


def agreement(a: list[float], b: list[float]) -> tuple[float, float]:
    """(max |a_i / b_i − 1|, Kendall τ of the two orderings) over the models."""
    worst = max(abs(x / y - 1) for x, y in zip(a, b))
    return worst, (kendalltau(a, b).statistic if len(a) > 1 else 1.0)


def self_agreement(results: list[dict], f: str, seeds: int) -> tuple[float, float]:
    """The faithful protocol against itself: one seed vs the geometric mean of the other
    seeds, the worst |ratio − 1| and the lowest τ over the choice of the held-out seed."""
    worst, tau = 0.0, 1.0
    for held in range(seeds):
        one = [res[("faithful", f)][held][0] for res in results]
        rest = [geomean([r[0] for j, r in enumerate(res[("faithful", f)]) if j != held])
                for res in results]  # fmt: skip
        w, t = agreement(one, rest)
        worst, tau = max(worst, w), min(tau, t)
    return worst, tau


def print_summary(results: list[dict], families: list[str], seeds: int) -> None:
    print("per family over the models (σ = geometric mean over seeds):")
    totals = {m: [0.0, 0.0] for m in MODES}
    for f in families:
        sig = {m: [geomean([r[0] for r in res[(m, f)]]) for res in results] for m in MODES}
        imgs = {m: sum(r[2] for res in results for r in res[(m, f)]) for m in MODES}
        secs = {m: sum(r[3] for res in results for r in res[(m, f)]) for m in MODES}
        for m in MODES:
            totals[m][0] += imgs[m]
            totals[m][1] += secs[m]
        worst, tau = agreement(sig["fast"], sig["faithful"])
        line = (f"  {f:14s} fast vs faithful: max |σ ratio - 1| = {worst:.3f}, Kendall τ = "
                f"{tau:.2f}; images {imgs['faithful'] / imgs['fast']:.1f}x fewer; "
                f"wall {secs['faithful'] / secs['fast']:.1f}x faster")  # fmt: skip
        if seeds > 1:
            self_worst, self_tau = self_agreement(results, f, seeds)
            line += (f" | faithful, 1 seed vs the other {seeds - 1}: max {self_worst:.3f}, "
                     f"τ {self_tau:.2f}")  # fmt: skip
        print(line)
        if (REFERENCE, f) in results[0]:
            ref = [res[(REFERENCE, f)][0][0] for res in results]
            parts = []
            for m in MODES:
                w, t = agreement(sig[m], ref)
                parts.append(f"{m} max |σ ratio - 1| = {w:.3f}, τ = {t:.2f}")
                if seeds > 1:
                    one = min(agreement([res[(m, f)][s][0] for res in results], ref)[1]
                              for s in range(seeds))  # fmt: skip
                    parts[-1] += f" (1 seed: lowest τ {one:.2f})"
            print(f"  {'':14s} vs the reference: " + "; ".join(parts))
    (fi, fs), (qi, qs) = totals["faithful"], totals["fast"]
    print(
        f"total: faithful {fi:,.0f} images {fs:.1f} s; fast {qi:,.0f} images {qs:.1f} s; "
        f"ratio {fi / qi:.1f}x images, {fs / qs:.1f}x wall"
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="results/demo", help="study folder")
    parser.add_argument("--models", type=int, default=None, help="models at most (default all)")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds per mode")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--reference",
        type=int,
        default=128,
        metavar="K",
        help="directions of the precise full-set reference search (0: off)",
    )
    parser.add_argument("--data-root", default=None, help="dataset folder (not for digits)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    store = StudyStore(args.study)
    trials = ok_trials(store)
    data = study_data(trials, args.data_root)
    device = torch.device(args.device)
    chosen = pick_models(trials, args.models)
    print(f"{hardware(device)}; torch threads: {torch.get_num_threads()}; device {device}")
    print(f"study: {store.uri}; {len(chosen)} of {len(trials)} models; dataset "
          f"{data.name}, m = {data.train_x.shape[0]}; seeds per mode: {args.seeds}\n")  # fmt: skip

    results = []
    for row in chosen:
        model, init, x, y = measure_inputs(store, data, row["model_id"], device)
        print(f"model {row['model_id']}: {row['method']} {row['bits']} bits, "
              f"{row['optimizer']} lr {row['lr']}, train acc {row['train_acc']:.3f}")  # fmt: skip
        runs = search_model(model, init, x, y, args.families, args.seeds, device, args.reference)
        for f in args.families:
            print_model_line(f, runs, args.seeds)
        results.append(runs)
        print()
    print_summary(results, args.families, args.seeds)


if __name__ == "__main__":
    sys.exit(main())
