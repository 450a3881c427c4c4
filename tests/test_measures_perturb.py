"""Perturbation families, the batched (vmap) paths against the plain loop, and the ascent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from qgen_ray.measures.api import folded_weights
from qgen_ray.measures.bn_fold import fold_batchnorm
from qgen_ray.measures.formulas import MAG_EPS
from qgen_ray.measures.forward import ForwardCounter, correct_predictions
from qgen_ray.measures.params import ParamLayout
from qgen_ray.measures.perturb import FAMILIES, ascend
from tests.support.toy import digits, tiny_cnn, train_tiny


@pytest.fixture(scope="module")
def trained():
    x, y = digits(300, seed=1)
    model, _ = train_tiny(tiny_cnn(4, seed=1), x, y, epochs=6)
    return model, x, y


def _loss(model, layout, flat, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(model, layout.unflatten(flat), (x,)), y))


def test_family_scales_follow_method_formulas():
    w = torch.tensor([-2.0, 0.0, 0.5])
    r = 0.3
    torch.testing.assert_close(FAMILIES["pacbayes"].scale(r, w), torch.full((3,), 0.3))
    torch.testing.assert_close(FAMILIES["sharpness"].scale(r, w), torch.full((3,), 0.3))
    # u_i ~ N(0, σ'² w_i² + ε²): std sqrt(0.09 * w² + 1e-6)
    std = torch.tensor([(0.09 * 4 + 1e-6) ** 0.5, 1e-3, (0.09 * 0.25 + 1e-6) ** 0.5])
    torch.testing.assert_close(FAMILIES["pacbayes_mag"].scale(r, w), std)
    # |u_i| ≤ α' (|w_i| + ε)
    box = torch.tensor([0.3 * (2 + MAG_EPS), 0.3 * MAG_EPS, 0.3 * (0.5 + MAG_EPS)])
    torch.testing.assert_close(FAMILIES["sharpness_mag"].scale(r, w), box)


@pytest.mark.statistical
def test_directions_have_the_stated_laws(stat_seed):
    """Moments of N = 200,000 draws, each within 5 of its own standard errors (a false
    alarm about once in 10^6 runs): N(0, 1) has SE(mean) = 1/√N = 0.0022 and SE(sd) =
    1/√(2N) = 0.0016; U(-1, 1) has E u² = 1/3 with SE sd(u²)/√N = √(4/45)/√N = 0.00067. A
    law off by 1% in scale (sd 1.01, E u² 0.34) is outside these bands."""
    gen = torch.Generator().manual_seed(stat_seed)
    k, omega = 4, 50_000
    n = k * omega
    gauss = FAMILIES["pacbayes"].directions(k, omega, gen, torch.device("cpu"))
    box = FAMILIES["sharpness"].directions(k, omega, gen, torch.device("cpu"))
    assert abs(float(gauss.mean())) <= 5 / n**0.5
    assert abs(float(gauss.std()) - 1) <= 5 / (2 * n) ** 0.5
    assert float(box.abs().max()) <= 1
    assert abs(float(box.pow(2).mean()) - 1 / 3) <= 5 * (4 / 45) ** 0.5 / n**0.5


@pytest.mark.parametrize("fold", [True, False])
def test_batched_evaluation_equals_plain_loop(trained, fold):
    model, x, y = trained
    model = fold_batchnorm(model) if fold else model.eval()  # unfolded: BN under vmap
    layout = ParamLayout.of(model)
    w = layout.flatten(model)
    gen = torch.Generator().manual_seed(3)
    flat = w + 0.05 * torch.randn(6, layout.numel, generator=gen)
    loop_count, vmap_count = ForwardCounter(), ForwardCounter()
    index = torch.randperm(x.shape[0], generator=gen)[:250]
    loop = correct_predictions(model, layout, flat, x, y, loop_count, False, 64, index)
    batched = correct_predictions(model, layout, flat, x, y, vmap_count, True, 64, index)
    assert torch.equal(loop, batched)
    assert loop_count.images == vmap_count.images == 6 * 250
    # and the loop itself matches plainly loading the weights into the module
    for k in (0, 5):
        with torch.no_grad():
            plain = functional_call(model, layout.unflatten(flat[k]), (x[index],))
        assert torch.equal(loop[k], plain.argmax(-1) == y[index])


@pytest.mark.parametrize("name", ["sharpness", "sharpness_mag"])
def test_batched_ascent_equals_plain_loop(trained, name):
    model, x, y = trained
    folded, layout, w = folded_weights(model)
    family = FAMILIES[name]
    half = family.scale(0.05, w)
    u0 = half * family.directions(3, layout.numel, torch.Generator().manual_seed(4), w.device)
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]
    a, b = ForwardCounter(), ForwardCounter()
    loop = ascend(folded, layout, w, u0, half, batches, 1e-2, a, batched=False)
    vmapped = ascend(folded, layout, w, u0, half, batches, 1e-2, b, batched=True)
    torch.testing.assert_close(loop, vmapped, rtol=1e-5, atol=1e-7)
    assert a.images == b.images == 2 * 3 * 120  # forward + backward, 3 restarts, 3 steps


@pytest.mark.parametrize("name", ["sharpness", "sharpness_mag"])
def test_ascent_raises_training_loss_and_stays_in_box(trained, name):
    model, x, y = trained
    folded, layout, w = folded_weights(model)
    family = FAMILIES[name]
    half = family.scale(0.08, w)
    u0 = half * family.directions(2, layout.numel, torch.Generator().manual_seed(5), w.device)
    steps = [(x, y)] * 20  # the paper's 20 steps, lr 1e-4, full batch: a clean signal
    u = ascend(folded, layout, w, u0, half, steps, 1e-4, ForwardCounter())
    assert bool((u.abs() <= half + 1e-7).all())
    assert not torch.equal(u, u0)
    for k in range(2):
        assert _loss(folded, layout, w + u[k], x, y) > _loss(folded, layout, w + u0[k], x, y)
    # the projection is active: a large step lands every moved coordinate on the box
    big = ascend(folded, layout, w, u0, half, steps[:1], 1e6, ForwardCounter())
    moved = big != u0
    torch.testing.assert_close(big[moved].abs(), half.expand_as(big)[moved])
