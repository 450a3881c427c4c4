"""Loss landscape: grid, filter normalization, zero bias/BN directions, eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qgen_ray.measures.landscape import filter_normalized_direction, loss_landscape
from tests.support.toy import digits, tiny_cnn, train_tiny


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
    # a float64 model gets a float64 direction, normalized to float64 precision (up to
    # FILTER_EPS = 1e-10 in the denominator; float32 would be off by ~1e-7)
    wide = {k: v.double() for k, v in params.items()}
    d64 = filter_normalized_direction(wide, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float64 for v in d64.values())
    for name in ("conv.weight", "fc.weight"):
        norms = d64[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, wide[name].flatten(1).norm(dim=1), rtol=1e-9, atol=0)


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


def test_off_centre_point_equals_the_model_moved_by_hand():
    """(x, y) = (0.5, -0.25) recomputed from scratch: two Gaussian directions drawn from
    the seeded generator in parameter order (nothing drawn for 1-D tensors, which stay
    put), each output filter rescaled to the weights' filter norm, the model moved by
    0.5·d1 − 0.25·d2 in place and evaluated in eval mode."""
    import copy

    x, y = digits(200, seed=5)
    model, _ = train_tiny(tiny_cnn(8, seed=5), x, y, epochs=5)
    df = loss_landscape(model, x, y, steps=5, span=0.5, seed=7)
    gen = torch.Generator().manual_seed(7)
    named = list(model.named_parameters())

    def direction():
        out = {}
        for name, p in named:
            if p.dim() > 1:
                d = torch.randn(p.shape, generator=gen)
                for f in range(p.shape[0]):
                    d[f] *= p[f].norm() / d[f].norm()
                out[name] = d
        return out

    d1, d2 = direction(), direction()
    moved = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in d1:
                p += 0.5 * d1[name] - 0.25 * d2[name]
        logits = moved(x)
    point = df[(df.x == 0.5) & (df.y == -0.25)].iloc[0]
    assert point.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert point.accuracy == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
