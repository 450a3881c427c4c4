"""The fast search's reading order, stratified by clean margin, against the plain random
order: every prefix is a stratified sample, the drop estimate keeps its expectation, its
spread shrinks, and the clean predictions it carries equal the plain evaluation."""

from __future__ import annotations

import pytest
import torch

from qgen_ray.measures import folded_weights
from qgen_ray.measures.forward import CleanPredictions, ForwardCounter, correct_predictions
from qgen_ray.measures.sampling import bit_reversed, pool_layout, stratified_positions
from tests.support.toy import digits, tiny_cnn, train_tiny


def test_bit_reversed():
    assert bit_reversed(3).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    assert bit_reversed(0).tolist() == [0]


@pytest.mark.parametrize(
    "m, expected", [(1347, (256, 1280)), (200, (128, 128)), (10_000, (256, 4096)), (1, (1, 1))]
)
def test_pool_layout(m, expected):
    assert pool_layout(m, 256, 4096) == expected


def test_every_power_of_two_prefix_takes_one_image_per_margin_slice():
    gen = torch.Generator().manual_seed(0)
    margins = torch.randn(1024, generator=gen)
    rank = torch.empty(1024, dtype=torch.long)
    rank[margins.argsort()] = torch.arange(1024)
    for seed in range(5):
        order = stratified_positions(margins, 256, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(1024))
        for n in (1, 2, 32, 64, 128, 256):
            slices = rank[order[:n]] // (1024 // n)
            assert sorted(slices.tolist()) == list(range(n)), n


def test_rejects_strata_that_do_not_slice_the_pool():
    with pytest.raises(ValueError, match="power of two"):
        stratified_positions(torch.zeros(100), 48, torch.Generator())
    with pytest.raises(ValueError, match="power of two"):  # divides 96, not a power of two
        stratified_positions(torch.zeros(96), 48, torch.Generator())
    with pytest.raises(ValueError, match="power of two"):  # a power of two, not dividing
        stratified_positions(torch.zeros(100), 64, torch.Generator())


def test_the_order_is_a_function_of_the_generator_alone():
    """Same margins and generator seed: the same order (every random draw goes through
    the generator); another seed: another order."""
    margins = torch.rand(256, generator=torch.Generator().manual_seed(3))

    def order(seed: int) -> torch.Tensor:
        return stratified_positions(margins, 32, torch.Generator().manual_seed(seed))

    torch.manual_seed(1)
    a = order(7)
    torch.manual_seed(2)  # the global stream must not matter
    assert torch.equal(a, order(7)) and not torch.equal(a, order(8))
    assert torch.equal(a.sort().values, torch.arange(256))  # a permutation


def _exact_prefix_sd(drops, margins, strata: int, n: int) -> tuple[float, float]:
    """(stratified, plain) standard deviation of the mean of the first n of a pool, from
    the pool itself: the stratified prefix takes slices j, j + b, j + 2b, ... (b = strata /
    n, j uniform in 0..b-1) of the margin ranking, one uniform image from each; the plain
    one n images without replacement."""
    pool = drops.shape[0]
    ranked = drops[margins.argsort(stable=True)].reshape(strata, pool // strata).double()
    means, variances = ranked.mean(1), ranked.var(1, unbiased=False)
    block = strata // n
    given_j_mean = torch.stack([means[j::block].mean() for j in range(block)])
    given_j_var = torch.stack([variances[j::block].sum() / n**2 for j in range(block)])
    stratified = given_j_var.mean() + given_j_mean.var(unbiased=False)
    plain = drops.double().var(unbiased=False) / n * (pool - n) / (pool - 1)
    return float(stratified.sqrt()), float(plain.sqrt())


def _sd_and_its_se(values: torch.Tensor) -> tuple[float, float]:
    """Sample sd of i.i.d. values and its standard error, sd · sqrt((kurtosis − 1) / 4D)."""
    v = values.double() - values.double().mean()
    m2, m4 = float(v.pow(2).mean()), float(v.pow(4).mean())
    return m2**0.5, m2**0.5 * ((m4 / m2**2 - 1) / (4 * len(values))) ** 0.5


@pytest.mark.statistical
def test_prefix_mean_is_unbiased_and_as_spread_as_stratification_predicts(stat_seed):
    """Per-image drops that live on the low-margin images, as on the demo's NiNs. Over
    4000 orders, against answers computed from the pool itself: every image is in a prefix
    with probability n / pool (within 5 binomial sd, a false alarm ~1e-4 over 256
    images); the prefix means of both orders have the pool's mean (within 5 standard
    errors); their spreads equal the exact sd of a stratified and of a plain random
    sample (within 5 standard errors of a sample sd, ~2.5% here), and the exact
    stratified sd is below the plain one (ratio 0.68-0.96 over the pools of seeds 0-7;
    0.74 at seed 0, where a plain random order in place of the stratified one misses the
    stratified sd by 36%, ~15 standard errors)."""
    pool, strata, n, draws = 256, 64, 16, 4000
    gen = torch.Generator().manual_seed(1 + stat_seed)
    margins = torch.rand(pool, generator=gen) * 5
    drops = (torch.rand(pool, generator=gen) < torch.exp(-2 * margins)).float()
    inclusion = torch.zeros(pool)
    stratified, plain = [], []
    for _ in range(draws):
        order = stratified_positions(margins, strata, gen)
        inclusion[order[:n]] += 1
        stratified.append(drops[order[:n]].mean())
        plain.append(drops[torch.randperm(pool, generator=gen)[:n]].mean())
    p = n / pool
    binomial_sd = (p * (1 - p) / draws) ** 0.5
    assert (inclusion / draws - p).abs().max() <= 5 * binomial_sd
    exact = _exact_prefix_sd(drops, margins, strata, n)
    for values, exact_sd in zip((torch.stack(stratified), torch.stack(plain)), exact):
        sd, sd_se = _sd_and_its_se(values)
        assert abs(float(values.mean()) - float(drops.mean())) <= 5 * exact_sd / draws**0.5
        assert abs(sd - exact_sd) <= 5 * sd_se, (sd, exact_sd, sd_se)
    assert exact[0] < exact[1]


def test_stratified_clean_predictions_equal_the_plain_evaluation():
    x, y = digits(300, seed=0)
    model = train_tiny(tiny_cnn(8, seed=0), x, y, epochs=3)[0]
    folded, layout, w = folded_weights(model)
    gen = torch.Generator().manual_seed(3)
    clean = CleanPredictions.stratified(folded, layout, w, x, y, gen, 256, 4096)
    assert sorted(clean.order.tolist()) == list(range(300))
    counter = ForwardCounter()
    first = clean.upto(100, counter)
    assert counter.images == 256  # the pool (256 of 300), paid once by the first caller
    everything = clean.upto(300, counter)
    assert counter.images == 300 and torch.equal(everything[:100], first)
    plain = correct_predictions(folded, layout, w[None], x, y, ForwardCounter(), index=clean.order)
    assert torch.equal(everything, plain[0])
