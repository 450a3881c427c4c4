"""VVTQ-style quantization of timm DeiT / Swin (small configs): q/k/v steps, 8-bit patch
embedding and head, MSE init, the bin regularizer and its lambda schedule."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
from torch import nn

from qgen_ray.quant import (
    LSQWeightQuantizer,
    QKVWeightQuantizer,
    quant_regularizer,
    quantize_model,
    quantized_layers,
    step_sizes,
    vvtq_lambda,
)
from qgen_ray.quant.lsq import lsq_init_step
from qgen_ray.quant.vvtq import MSE_INIT_RTOL, bin_regularizer, mse_step


def deit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
    )


def swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=4,
        window_size=4,
        depths=(1, 1),
        num_heads=(1, 2),
        embed_dim=16,
    )


VITS = {"deit": (deit, "patch_embed.proj", "head"), "swin": (swin, "patch_embed.proj", "head.fc")}


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vit", VITS)
def test_vvtq_splits_qkv_and_keeps_patch_embedding_and_head_at_8_bits(vit):
    build, first, last = VITS[vit]
    model = quantize_model(build(), 2, "vvtq")
    layers = dict(quantized_layers(model))
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in build().modules())
    qkv = [name for name in layers if name.endswith(".qkv")]
    assert qkv and all(isinstance(layers[n].weight_quantizer, QKVWeightQuantizer) for n in qkv)
    rows = {row["layer"]: row for row in step_sizes(model)}
    assert {f"{qkv[0]}.{p}" for p in "qkv"} <= set(rows)
    assert len({rows[f"{qkv[0]}.{p}"]["step"] for p in "qkv"}) == 3  # three separate steps
    assert rows[first]["bits"] == rows[last]["bits"] == 8
    assert {r["bits"] for name, r in rows.items() if name not in (first, last)} == {2}
    out = model(images())
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_qkv_thirds_each_quantize_on_their_own_grid():
    model = quantize_model(deit(), 4, "vvtq")
    layer = model.blocks[0].attn.qkv
    w_hat = layer.dequantized_weight()
    for third, part in zip(w_hat.chunk(3), layer.weight_quantizer.parts()):
        codes = third / part.step.detach()
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert len(torch.unique(third)) <= 16


def test_qkv_steps_get_gradients_scaled_per_third():
    q = QKVWeightQuantizer(4)
    w = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    q.initialize(w)
    q(w).sum().backward()
    for part, third in zip(q.parts(), w.chunk(3)):
        reference = LSQWeightQuantizer(4)
        reference.set_step(part.step.detach())
        reference(third).sum().backward()
        assert torch.allclose(part.step.grad, reference.step.grad)


@pytest.mark.statistical
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_init_is_a_fixed_point_with_lower_error_than_its_start_and_lsq_init(bits, stat_seed):
    w = torch.randn(4096, generator=torch.Generator().manual_seed(bits + 10 * stat_seed)) * 0.02
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1

    def error(s):
        return (torch.round(w / s).clamp(-Qn, Qp) * s - w).pow(2).sum()

    s = mse_step(w, Qn, Qp)
    q = torch.round(w * (1.0 / s)).clamp(-Qn, Qp)
    # The search stops once a step moves s by <= MSE_INIT_RTOL; one more step can still
    # move it a little (a few codes flip at 8 bits): at most 2.9x MSE_INIT_RTOL over 180
    # (seed, bits) cases, so 10x decides without a near-tie; a wrong update rule is off by
    # far more (<w, q> / <w, w> misses by ~100%).
    assert torch.dot(w, q) / torch.dot(q, q) == pytest.approx(s.item(), rel=10 * MSE_INIT_RTOL)
    assert error(s) < error(lsq_init_step(w, Qp))
    assert error(s) < error(w.abs().max() / Qp)  # VVTQ's starting point


def _bin_regularizer_loop(w, step, Qn, Qp):
    """VVTQ's formulation, one bin at a time (the reference for the vectorized version)."""
    clipped = torch.clamp(w, -Qn * step, Qp * step)
    codes = torch.round(w * (1.0 / step)).clamp(-Qn, Qp)
    total = ((codes * step).detach() - clipped).pow(2).mean()
    for level in range(-Qn, Qp + 1):
        in_bin = clipped[codes == level]
        if in_bin.numel() > 1:
            total = total + torch.var(in_bin)
    return total


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bin_regularizer_equals_the_per_bin_loop_with_gradients(bits):
    w = (torch.randn(3000, generator=torch.Generator().manual_seed(bits)) * 0.05).requires_grad_()
    step = torch.tensor([0.02])
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    fast = bin_regularizer(w, step, Qn, Qp)
    (grad_fast,) = torch.autograd.grad(fast, w)
    slow = _bin_regularizer_loop(w, step, Qn, Qp)
    (grad_slow,) = torch.autograd.grad(slow, w)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-4)
    assert torch.allclose(grad_fast, grad_slow, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("step", [2.0**-6, 0.0137])
def test_bin_regularizer_is_zero_on_the_grid_and_positive_off_it(step):
    s = torch.tensor([step])
    codes = torch.randint(-8, 8, (500,), generator=torch.Generator().manual_seed(0)).float()
    on_grid = codes * s
    assert bin_regularizer(on_grid, s, 8, 7).item() == 0.0
    off_grid = on_grid + 0.2 * s * torch.rand(500, generator=torch.Generator().manual_seed(1))
    assert bin_regularizer(off_grid, s, 8, 7).item() > 0.0


def test_lambda_schedule():
    assert vvtq_lambda(0.0) == vvtq_lambda(0.24) == 0.0
    assert vvtq_lambda(1.0) == pytest.approx(0.01)
    assert vvtq_lambda(0.625) == pytest.approx(0.005)  # half-way up the cosine ramp
    ramp = [vvtq_lambda(p) for p in torch.linspace(0.25, 1.0, 20).tolist()]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert vvtq_lambda(0.5) == pytest.approx(0.005 * (1 - math.cos(math.pi / 3)))


def test_regularizer_term_on_a_vit_trains_the_weights_not_the_steps():
    model = quantize_model(deit(), 4, "vvtq")
    assert quant_regularizer(model, 0.2).item() == 0.0
    reg = quant_regularizer(model, 1.0)
    assert reg.item() > 0.0
    reg.backward()
    layer = model.blocks[0].mlp.fc1
    assert layer.weight.grad.abs().sum() > 0
    assert layer.weight_quantizer.step.grad is None


@pytest.mark.parametrize("vit", VITS)
def test_vit_state_dict_round_trip(vit):
    build = VITS[vit][0]
    trained = quantize_model(build(seed=0), 2, "vvtq")
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    for i in range(2):
        loss = trained(images(i)).logsumexp(1).mean() + quant_regularizer(trained, 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantize_model(build(seed=1), 2, "vvtq")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    trained.eval(), fresh.eval()
    assert torch.equal(fresh(images(7)), trained(images(7)))


def test_bin_regularizer_hand_worked_two_weight_bin_in_float64():
    """2 bits, s = 1: w = [0.1, 0.3] both take code 0 (offsets d = w): mean d² = 0.05 and
    the bin's unbiased variance 0.02; a lone weight in a bin adds no variance. float64 in,
    float64 out."""
    s = torch.tensor([1.0], dtype=torch.float64)
    w = torch.tensor([0.1, 0.3], dtype=torch.float64)
    r = bin_regularizer(w, s, 2, 1)
    assert r.dtype == torch.float64 and r.item() == pytest.approx(0.07, abs=1e-15)
    lone = torch.tensor([0.1, 0.3, 0.8], dtype=torch.float64)  # 0.8 -> code 1 (d = -0.2), alone
    assert bin_regularizer(lone, s, 2, 1).item() == pytest.approx(
        (0.01 + 0.09 + 0.04) / 3 + 0.02, abs=1e-15
    )


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_step_stops_where_its_rule_says(bits):
    """The search written out: s <- <w,q>/<q,q> from max|w|/Qp until a change <= rtol * s.
    At 8 bits the iteration drifts on, so stopping late (or never) gives another step."""
    w = torch.randn(20000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = w.abs().max() / Qp
    for _ in range(200):
        q = torch.round(w * (1.0 / s)).clamp(-Qn, Qp)
        s_new = torch.dot(w, q) / torch.dot(q, q)
        settled = abs(float(s_new - s)) <= MSE_INIT_RTOL * float(s)
        s = s_new
        if settled:
            break
    assert mse_step(w, Qn, Qp).item() == s.item()


def test_mse_step_of_all_zero_weights_is_the_floor():
    from qgen_ray.quant import STEP_EPS

    assert mse_step(torch.zeros(10), 8, 7).item() == pytest.approx(STEP_EPS)


def test_lambda_refuses_progress_outside_0_1():
    for progress in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
            vvtq_lambda(progress)


def test_fused_qkv_storage_counts_three_steps():
    assert QKVWeightQuantizer(4).storage_bits(300) == 300 * 4 + 3 * 32
