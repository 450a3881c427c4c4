"""Loss landscape: grid, filter normalization, zero bias/BN directions, eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qgen_ray.measures.landscape import filter_normalized_direction, loss_landscape
from qgen_ray.measures.toy import digits, tiny_cnn, train_tiny


def test_filter_normalized_direction():
    params = {
        "conv.weight": torch.randn(3, 2, 3, 3),
        "conv.bias": torch.randn(3),
        "bn.weight": torch.rand(3),
        "fc.weight": torch.randn(4, 5),
    }
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for name in ("conv.weight", "fc.weight"):
        p, v = params[name], d[name]
        torch.testing.assert_close(v.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
        assert not torch.allclose(v, p)  # random, not the weights themselves
    assert not d["conv.bias"].any() and not d["bn.weight"].any()


@pytest.mark.statistical
def test_loss_landscape_grid(stat_seed):
    x, y = digits(200, seed=4 + stat_seed)
    model, _ = train_tiny(tiny_cnn(8, seed=4 + stat_seed), x, y, epochs=15, seed=stat_seed)
    model.train()  # the landscape must switch to eval mode and restore this
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = loss_landscape(model, x, y, steps=5, span=0.5, seed=1 + stat_seed)
    assert list(df.columns) == ["x", "y", "loss", "accuracy"] and len(df) == 25
    assert sorted(set(df["x"])) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # no weight moved, no BN statistic updated
    with torch.no_grad():
        logits = model.eval()(x)
    center = df[(df.x == 0) & (df.y == 0)].iloc[0]
    assert abs(center.loss - float(F.cross_entropy(logits, y))) < 1e-5
    assert abs(center.accuracy - float((logits.argmax(-1) == y).double().mean())) < 1e-12
    # a trained model sits in a basin: the highest loss on the grid is 5.3-11x the
    # centre's over seeds 0-5; 2x leaves room for any seed and thread count
    assert df.loss.max() > 2 * center.loss
    again = loss_landscape(model, x, y, steps=5, span=0.5, seed=1 + stat_seed)
    assert again.equals(df)
    assert not loss_landscape(model, x, y, steps=5, span=0.5, seed=2 + stat_seed).equals(df)
