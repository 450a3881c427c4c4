"""Every bound against a hand computation on a two-weight model (docs/method.md §3).

w = [1, 2], w0 = [0, 1], so w − w0 = [1, 1], ||w − w0||² = 2, ||w||² = 5, ω = 2;
m = 100 and radius σ = α = 0.5 throughout (σ² = 0.25, log(m/σ) = log 200).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qgen_ray.measures import MEASURES, compute_measures
from qgen_ray.schema import MEASURES_COLUMNS

W = torch.tensor([1.0, 2.0])
W0 = torch.tensor([0.0, 1.0])
M, R = 100, 0.5
EPS2 = 1e-6  # ε² with ε = 1e-3

HAND = {
    # ||ref||² / (4σ²) + log(m/σ) + 10, 4σ² = 1
    "pacbayes_init": 2 / 1 + math.log(200) + 10,
    "pacbayes_orig": 5 / 1 + math.log(200) + 10,
    # ||ref||² log(2ω) / (4α²) + log(m/α) + 10, log(2ω) = log 4
    "sharpness_init": 2 * math.log(4) / 1 + math.log(200) + 10,
    "sharpness_orig": 5 * math.log(4) / 1 + math.log(200) + 10,
    # 1/4 Σ_i log((ε² + (σ²+1) ||ref||²/ω) / (ε² + σ² (w_i − w0_i)²)) + log(m/σ) + 10
    # init: ||ref||²/ω = 2/2 = 1 -> numerator 1e-6 + 1.25; both denominators 1e-6 + 0.25
    "pacbayes_mag_init": 0.25 * 2 * math.log(1.250001 / 0.250001) + math.log(200) + 10,
    # orig: ||w||²/ω = 5/2 -> numerator 1e-6 + 1.25 * 2.5 = 3.125001
    "pacbayes_mag_orig": 0.25 * 2 * math.log(3.125001 / 0.250001) + math.log(200) + 10,
    "sharpness_mag_init": 0.25 * 2 * math.log(1.250001 / 0.250001) + math.log(200) + 10,
    "sharpness_mag_orig": 0.25 * 2 * math.log(3.125001 / 0.250001) + math.log(200) + 10,
    "weight_norm": math.sqrt(5),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_bound_matches_hand_computation(name):
    assert MEASURES.get(name).value(R, W, W0, M) == pytest.approx(HAND[name], rel=1e-12)


def test_every_registered_measure_has_a_hand_check():
    assert set(MEASURES.names()) == set(HAND)


def test_mag_denominator_uses_distance_to_init_with_unequal_weights():
    w, w0 = torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])  # w − w0 = [2, 0]
    # init: ||ref||²/ω = 4/2 = 2 -> numerator 1e-6 + 1.25 * 2 = 2.500001
    # denominators: 1e-6 + 0.25 * 4 = 1.000001 and 1e-6 + 0 = 1e-6
    hand = 0.25 * (math.log(2.500001 / 1.000001) + math.log(2.500001 / 1e-6))
    hand += math.log(200) + 10
    assert MEASURES.get("pacbayes_mag_init").value(R, w, w0, M) == pytest.approx(hand)


def test_weight_norm_row_from_compute_measures():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.bias.copy_(torch.tensor([12.0]))  # biases are weights too: sqrt(9+16+144)
    x, y = torch.randn(5, 2), torch.zeros(5, dtype=torch.int64)
    (row,) = compute_measures(model, model, x, y, names=["weight_norm"])
    assert list(row) == [c for c in MEASURES_COLUMNS if c != "model_id"]
    assert row["value"] == pytest.approx(13.0)
    assert row["mode"] == "exact" and row["forward_images"] == 0 and row["converged"] is True
    assert math.isnan(row["sigma"]) and math.isnan(row["flatness"])


def test_bounds_at_a_radius_where_4_sigma_squared_is_not_1():
    # the table above has 4σ² = 1, where dividing and multiplying by it agree; at σ = 0.25
    # 4σ² = 1/4: ||ref||² / (4σ²) = 2 * 4 = 8, log(m/σ) = log 400
    from qgen_ray.measures.formulas import pacbayes_bound, sharpness_bound

    assert pacbayes_bound(2.0, 0.25, M) == pytest.approx(8 + math.log(400) + 10)
    assert sharpness_bound(2.0, 0.25, M, 2) == pytest.approx(8 * math.log(4) + math.log(400) + 10)
