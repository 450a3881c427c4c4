"""`compute_measures`: the single entry point of the measures library (no Ray inside).

Registered measures (`MEASURES`, a name → `Measure` registry):

    pacbayes_init / _orig           Gaussian σ search      (one search serves both)
    pacbayes_mag_init / _orig       Gaussian σ' search     (one search)
    sharpness_init / _orig          worst-case α search   (one search)
    sharpness_mag_init / _orig      worst-case α' search  (one search)
    weight_norm                     ||w||₂, no search (QGen Table 2)

Each search runs at most once per call, however many of its bounds are asked for. A row's
`forward_images` and `seconds` are its share of the work: a search's cost is split evenly
between the rows it serves, so summing a model's rows gives the work done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.measures.bn_fold import fold_batchnorm
from qgen_ray.measures.formulas import (
    flatness,
    magnitude_aware_bound,
    pacbayes_bound,
    paper_scale,
    sharpness_bound,
    weight_norm,
)
from qgen_ray.measures.forward import CleanPredictions
from qgen_ray.measures.params import ParamLayout
from qgen_ray.measures.perturb import FAMILIES
from qgen_ray.measures.search import FlatnessSearch, SearchResult, protocol_for, stream_seed
from qgen_ray.registry import Registry
from qgen_ray.schema import MEASURES_COLUMNS


@dataclass(frozen=True)
class Measure:
    """A registered measure: which search feeds it and which reference vector it uses."""

    name: str
    family: str | None  # key of perturb.FAMILIES; None for measures without a search
    reference: str | None  # "init": ref = w − w0; "orig": ref = w

    def value(self, radius: float, w: torch.Tensor, w0: torch.Tensor, m: int) -> float:
        """The bound at the searched radius (see formulas.py for the equations)."""
        if self.family is None:
            return weight_norm(w)
        family = FAMILIES[self.family]
        ref = w - w0 if self.reference == "init" else w
        if family.magnitude_aware:
            return magnitude_aware_bound(w, w0, ref, radius, m)
        ref_sq_norm = float(ref.double().pow(2).sum())
        if family.worst_case:
            return sharpness_bound(ref_sq_norm, radius, m, w.numel())
        return pacbayes_bound(ref_sq_norm, radius, m)


MEASURES: Registry[Measure] = Registry("measure")
for _family in FAMILIES:
    for _reference in ("init", "orig"):
        _name = f"{_family}_{_reference}"
        MEASURES.add(_name, Measure(_name, _family, _reference))
MEASURES.add("weight_norm", Measure("weight_norm", None, None))

ROW_COLUMNS = [c for c in MEASURES_COLUMNS if c != "model_id"]


def folded_weights(
    model: nn.Module, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ParamLayout, torch.Tensor]:
    """(BN-folded copy of `model` on `device`, its parameter layout, its flat weights w):
    what every search and perturbation works on."""
    folded = fold_batchnorm(model).to(device)
    layout = ParamLayout.of(folded)
    return folded, layout, layout.flatten(folded)


def compute_measures(
    model: nn.Module,
    init_model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: list[str] | None = None,
    mode: str = "fast",
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    protocol_overrides: dict | None = None,
) -> list[dict]:
    """Sharpness / PAC-Bayes measures and the weight norm of one trained model.

    `model` and `init_model`: the same architecture, trained and at step 0, quantized
    layers already replaced by plain layers holding the de-quantized weights; both are
    BN-folded here (copies; the inputs are untouched). `x` [N, C, H, W], `y` [N]: the
    training set, normalized, no augmentation (m = N). `names`: measures to compute
    (default: all registered). `mode`: "fast" or "faithful" (see search.py);
    `protocol_overrides`: SearchProtocol knobs to change (tests shrink sizes). Returns one
    dict per name with exactly the keys of schema.MEASURES_COLUMNS minus model_id.
    Deterministic given `seed` (on a given device).
    """
    chosen = MEASURES.names() if names is None else names
    measures = [MEASURES.get(n) for n in dict.fromkeys(chosen)]
    protocol = protocol_for(mode, **(protocol_overrides or {}))
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise UserError(
            f"x has {x.shape[0]} images but y has {y.shape[0]} labels; pass the matching, "
            "non-empty training set"
        )
    device = torch.device(device)
    folded, layout, w = folded_weights(model, device)
    w0 = layout.flatten(fold_batchnorm(init_model).to(device))
    x, y = x.to(device), y.to(device)
    m = x.shape[0]
    order_gen = torch.Generator(device=device)
    order_gen.manual_seed(stream_seed(seed, "order"))
    if protocol.stratify and protocol.max_images:
        clean = CleanPredictions.stratified(folded, layout, w, x, y, order_gen,
                                            protocol.max_images, protocol.pool_max,
                                            protocol.eval_batch)  # fmt: skip
    else:
        order = torch.randperm(m, generator=order_gen, device=device)
        clean = CleanPredictions(folded, layout, w, x, y, order, protocol.eval_batch)

    searches: dict[str, SearchResult] = {}
    for measure in measures:
        if measure.family is not None and measure.family not in searches:
            search = FlatnessSearch(
                FAMILIES[measure.family], protocol, folded, layout, w, x, y, clean, seed
            )
            searches[measure.family] = search.run()
    shares = {f: sum(ms.family == f for ms in measures) for f in searches}
    served = dict.fromkeys(searches, 0)

    rows = []
    for measure in measures:
        start = time.perf_counter()
        if measure.family is None:
            value = measure.value(math.nan, w, w0, m)
            rows.append(
                _row(measure.name, value, math.nan, True, "exact", 0, time.perf_counter() - start)
            )
            continue
        result, share = searches[measure.family], shares[measure.family]
        images = result.forward_images // share
        if served[measure.family] == 0:  # the first row takes the remainder
            images += result.forward_images % share
        served[measure.family] += 1
        r = result.radius
        rows.append(
            _row(
                measure.name,
                measure.value(r, w, w0, m),
                r,
                result.converged,
                protocol.mode,
                images,
                result.seconds / share + time.perf_counter() - start,
                m,
            )
        )
    return rows


def _row(
    measure: str,
    value: float,
    sigma: float,
    converged: bool,
    mode: str,
    forward_images: int,
    seconds: float,
    m: int | None = None,
) -> dict:
    """A measures.parquet row; with `m` (a bound's training-set size) its paper scale."""
    row = {
        "measure": measure,
        "value": float(value),
        "sigma": float(sigma),
        "flatness": math.nan if math.isnan(sigma) else flatness(sigma),
        "converged": bool(converged),
        "mode": mode,
        "forward_images": int(forward_images),
        "seconds": float(seconds),
        "paper_scale": math.nan if m is None else paper_scale(float(value), m),
    }
    assert list(row) == ROW_COLUMNS, "row keys drifted from schema.MEASURES_COLUMNS"
    return row
