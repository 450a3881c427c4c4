"""BatchNorm folding keeps the eval-mode function and removes every foldable BN."""

from __future__ import annotations

import torch
from torch import nn

from qgen_ray.measures.bn_fold import conv_bn_pairs, fold_batchnorm


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-4, atol=1e-5)


def test_sequential_cnn_folds_every_bn_and_keeps_outputs():
    torch.manual_seed(0)
    model = _randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 5, 3, bias=False),  # no bias: folding must create one
            nn.BatchNorm2d(5, affine=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 6 * 6, 7),
            nn.BatchNorm1d(7),
            nn.Linear(7, 3),
        )
    )
    folded = fold_batchnorm(model)
    _assert_same_function(model, folded, torch.randn(4, 3, 8, 8))
    assert _count(folded, nn.modules.batchnorm._BatchNorm) == 0
    assert _count(folded, nn.Identity) == 3
    assert folded[3].bias is not None and model[3].bias is None
    assert _count(model, nn.modules.batchnorm._BatchNorm) == 3  # the input is untouched


class _Residual(nn.Module):
    """Non-Sequential forward: fx follows the data flow. conv_b's output feeds a BN and a
    skip connection, so that BN cannot be folded and must stay."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.conv_a(x)))
        z = self.conv_b(h)
        return self.bn_b(z) + z


def test_fx_path_folds_only_direct_single_use_pairs():
    model = _randomize_bn(_Residual())
    assert conv_bn_pairs(model) == [("conv_a", "bn_a")]
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn_a, nn.Identity) and isinstance(folded.bn_b, nn.BatchNorm2d)
    _assert_same_function(model, folded, torch.randn(3, 2, 5, 5))


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; the Sequential fallback folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        h = self.body(x)
        return h if h.sum() > 0 else -h


def test_untraceable_model_falls_back_to_sequential_order():
    model = _randomize_bn(_Untraceable())
    assert conv_bn_pairs(model) == [("body.0", "body.1")]
    folded = fold_batchnorm(model)
    assert isinstance(folded.body[1], nn.Identity)
    _assert_same_function(model, folded, torch.randn(2, 1, 6, 6))
