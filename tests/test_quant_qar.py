"""QAR (Malchiodi et al. 2026): codebook init, the nearest-representative
speed trick against the brute-force min, the penalty, the snap and its evaluation."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.quant import (
    CodebookQuantizer,
    QuantPolicy,
    compression_ratio,
    effective_weights,
    evaluate_snap,
    materialize,
    quant_regularizer,
    quantize_model,
    quantized_layers,
    snap_to_codebook_,
)
from qgen_ray.quant.qar import cluster_penalty, init_codebook, nearest_representative


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


QAR_MARGIN = 0.1  # least difference of the two snap drops (see the test)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def train(
    model: nn.Module, digits, epochs: int, weight: float | None = None, seed: int = 0
) -> nn.Module:
    x, y = digits[0], digits[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = loss + quant_regularizer(model, 0.5, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_codebook_init_at_quantiles():
    w = torch.randn(10001, generator=torch.Generator().manual_seed(0))
    codebook = init_codebook(w, 4)
    expected = torch.quantile(w, torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(codebook, expected, atol=1e-3)
    q = CodebookQuantizer(3)
    q.initialize(w)
    assert q.codebook.shape == (8,) and torch.all(q.codebook[1:] > q.codebook[:-1])


def _brute_force_penalty(w, codebook):
    return (w[:, None] - codebook[None, :]).pow(2).min(dim=1).values.mean()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nearest_representative_and_penalty_equal_the_brute_force_min(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(2000, generator=gen).requires_grad_()
    codebook = (torch.randn(2**bits, generator=gen)).requires_grad_()  # unsorted on purpose
    nearest = nearest_representative(w, codebook)
    distance = (w[:, None] - codebook[None, :]).abs()
    assert torch.allclose((w - nearest).abs(), distance.min(dim=1).values)
    fast = cluster_penalty(w, codebook)
    grads_fast = torch.autograd.grad(fast, (w, codebook))
    slow = _brute_force_penalty(w, codebook)
    grads_slow = torch.autograd.grad(slow, (w, codebook))
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow):
        assert torch.allclose(fast_grad, slow_grad, atol=1e-8)


def test_qar_trains_in_full_precision_and_the_penalty_pulls_weights_in(digits):
    model = quantize_model(mlp(), 2, "qar", QuantPolicy.none())
    x = digits[2]
    assert torch.equal(model(x), mlp()(x))  # forward is the identity until the snap
    free = train(quantize_model(mlp(), 2, "qar", QuantPolicy.none()), digits, 3, weight=0.0)
    pulled = train(model, digits, 3)
    assert quant_regularizer(pulled, 0.5) < quant_regularizer(free, 0.5)


@pytest.mark.parametrize("bits", [2, 4])
def test_snap_leaves_at_most_2_to_the_b_codebook_values_per_layer(digits, bits):
    model = train(quantize_model(mlp(), bits, "qar", QuantPolicy.none()), digits, 1)
    expected = effective_weights(model)
    snap_to_codebook_(model)
    for name, layer in quantized_layers(model):
        values = torch.unique(layer.weight.detach())
        assert len(values) <= 2**bits
        assert torch.isin(values, layer.weight_quantizer.codebook.detach()).all()
        assert torch.equal(layer.weight.detach(), expected[name])
    x = digits[2]
    assert torch.equal(materialize(model)(x), model(x))  # after the snap nothing differs


def test_evaluate_snap_reports_accuracies_and_compression(digits):
    model = train(quantize_model(mlp(), 2, "qar", QuantPolicy.none()), digits, 2)
    x, y = digits[2], digits[3]
    with torch.no_grad():
        before = (model(x).argmax(1) == y).float().mean().item()
    result = evaluate_snap(model, x, y)
    with torch.no_grad():
        after = (model(x).argmax(1) == y).float().mean().item()
    assert result["acc_before"] == pytest.approx(before)
    assert result["acc_after"] == pytest.approx(after)
    assert result["acc_drop"] == pytest.approx(before - after)
    numels = [64 * 64, 64 * 64, 64 * 10]
    stored = sum(n * 2 + 4 * 32 for n in numels)
    assert result["compression_ratio"] == pytest.approx(32 * sum(numels) / stored)
    assert result["compression_ratio"] == compression_ratio(model)
    assert model.training  # evaluate_snap restores the mode


@pytest.mark.statistical
def test_the_penalty_shrinks_the_snap_drop(digits, stat_seed):
    """The point of the regularizer: with it, snapping costs less accuracy. Measured over
    seeds 0-5: 0.23-0.71 of test accuracy lost by the plain model, 0.015-0.12 by the
    regularized one, never less than 0.18 apart; the test asks for 0.1 (five standard
    errors of an accuracy on these 397 test images)."""
    x, y = digits[2], digits[3]

    def trained(weight):
        model = quantize_model(mlp(stat_seed), 2, "qar", QuantPolicy.none())
        return train(model, digits, 8, weight=weight, seed=stat_seed)

    drop_plain = evaluate_snap(trained(0.0), x, y)["acc_drop"]
    drop_regularized = evaluate_snap(trained(None), x, y)["acc_drop"]
    assert drop_regularized < drop_plain - QAR_MARGIN, (drop_regularized, drop_plain)


def test_snap_needs_a_qar_model():
    with pytest.raises(UserError, match="'qar'.*'lsq'"):
        snap_to_codebook_(quantize_model(mlp(), 4, "lsq"))


def test_init_codebook_hand_worked_quantiles():
    # 10 sorted values, k = 4: positions (j + 1/2)/4 * 10 = 1.25, 3.75, 6.25, 8.75 -> 1, 3, 6, 8
    w = torch.tensor([9.0, 0.0, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])
    assert init_codebook(w, 4).tolist() == [1.0, 3.0, 6.0, 8.0]
    # as many values as representatives: each value once, the largest included
    assert init_codebook(torch.tensor([3.0, 1.0, 2.0, 0.0]), 4).tolist() == [0.0, 1.0, 2.0, 3.0]
