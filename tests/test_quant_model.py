"""quantize_model and the model-level helpers on a small CNN: wrapping, policy, bad input,
state-dict round trip, step sizes, effective weights, materialize, optimizer helpers."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.quant import (
    METHODS,
    STEP_EPS,
    LSQWeightQuantizer,
    QConv2d,
    QLinear,
    QuantPolicy,
    clamp_steps_,
    compression_ratio,
    effective_weights,
    materialize,
    quant_regularizer,
    quantize_model,
    quantized_layers,
    quantizer_parameters,
    step_sizes,
)

QUANT_METHODS = ("lsq", "vvtq", "qar")


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


LAYERS = ["0", "3", "7", "9"]  # the quantizable layers of small_cnn, in order


def batch(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def train_a_few_steps(model: nn.Module, steps: int = 3, progress: float = 0.9) -> None:
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = batch(seed=i)
        loss = nn.functional.cross_entropy(model(x), y) + quant_regularizer(model, progress)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_steps_(model)


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_wraps_every_layer_keeping_types_and_parameters(method):
    model = small_cnn()
    weights = {name: m.weight for name, m in model.named_modules() if name in LAYERS}
    assert quantize_model(model, 4, method) is model
    layers = dict(quantized_layers(model))
    assert list(layers) == LAYERS
    assert isinstance(model[0], QConv2d) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[9], QLinear) and isinstance(model[9], nn.Linear)
    assert all(layers[name].weight is weights[name] for name in LAYERS)  # same Parameters
    assert model.qgen_quant["method"] == method and model.qgen_quant["bits"] == 4
    assert model.qgen_quant["layers"] == {"0": 8, "3": 4, "7": 4, "9": 8}
    json.dumps(model.qgen_quant)  # the record is JSON-serializable
    assert model(batch()[0]).shape == (32, 10)


@pytest.mark.parametrize("args", [dict(bits=32), dict(bits=32, method="fp32")])
def test_fp32_leaves_the_model_untouched(args):
    model, reference = small_cnn(), small_cnn()
    quantize_model(model, **args)
    assert model.qgen_quant["method"] == "fp32"
    assert not quantized_layers(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    x = batch()[0]
    assert torch.equal(model(x), reference(x))
    assert quant_regularizer(model, 0.5).item() == 0.0
    assert step_sizes(model) == [] and effective_weights(model) == {}
    assert compression_ratio(model) == 1.0
    assert torch.equal(materialize(model)(x), reference(x))


def test_lsq_forward_uses_the_fake_quantized_weight():
    model = quantize_model(small_cnn(), 4, "lsq")
    layer = model[3]
    s = layer.weight_quantizer.step.detach()
    w_hat = torch.fake_quantize_per_tensor_affine(
        layer.weight.detach(), s, torch.zeros(1, dtype=torch.int32), -8, 7
    )
    x = torch.randn(2, 8, 8, 8)
    expected = nn.functional.conv2d(x, w_hat, None, stride=2, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(effective_weights(model)["3"], w_hat)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_layer_takes_at_most_2_to_the_b_values(bits):
    model = quantize_model(small_cnn(), bits, "lsq", QuantPolicy.none())
    for name, w_hat in effective_weights(model).items():
        assert len(torch.unique(w_hat)) <= 2**bits, name


def test_policy_default_none_and_named_layers():
    none = quantize_model(small_cnn(), 2, "lsq", QuantPolicy.none())
    assert set(none.qgen_quant["layers"].values()) == {2}
    policy = QuantPolicy(first_last_bits=None, layer_bits={"7": 6, "9": 32})
    named = quantize_model(small_cnn(), 2, "lsq", policy)
    assert named.qgen_quant["layers"] == {"0": 2, "3": 2, "7": 6}
    assert type(named[9]) is nn.Linear  # 32 bits: left in FP32
    assert [row["bits"] for row in step_sizes(named)] == [2, 2, 6]
    assert QuantPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert QuantPolicy.from_dict({}) == QuantPolicy()
    assert QuantPolicy.from_name("first_last_8bit") == QuantPolicy()
    assert QuantPolicy.from_name("none") == QuantPolicy.none()


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda m: quantize_model(m, 4, "lsqq"), "valid names: fp32, lsq, qar, vvtq"),
        (lambda m: quantize_model(m, 9, "lsq"), "2..8"),
        (lambda m: quantize_model(m, 1, "qar"), "2..8"),
        (lambda m: quantize_model(m, 4, "fp32"), "needs bits=32"),
        (lambda m: quantize_model(m, 4, policy=QuantPolicy(layer_bits={"x": 8})), "0, 3, 7, 9"),
        (lambda m: quantize_model(quantize_model(m, 4), 4), "already"),
        (lambda m: quantize_model(nn.Linear(2, 2), 4), "container"),
        (lambda m: QuantPolicy(first_last_bits=16), "2..8 or 32"),
        (lambda m: QuantPolicy.from_dict({"first_last": 8}), "valid keys"),
        (lambda m: QuantPolicy.from_name("lsq"), "first_last_8bit, none"),
    ],
)
def test_bad_input_is_one_clear_user_error(call, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        call(small_cnn())
    assert "\n" not in str(err.value)


def test_subclassed_layers_are_refused_not_silently_changed():
    model = nn.Sequential(nn.MultiheadAttention(4, 1))
    with pytest.raises(UserError, match="NonDynamicallyQuantizableLinear"):
        quantize_model(model, 4)


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_state_dict_round_trip_into_a_freshly_built_model(method):
    trained = quantize_model(small_cnn(seed=0), 4, method)
    train_a_few_steps(trained)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantize_model(small_cnn(seed=1), 4, method)  # different init, fresh quantizers
    x = batch(seed=9)[0]
    trained.eval(), fresh.eval()
    assert not torch.equal(fresh(x), trained(x))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), trained(x))
    assert step_sizes(fresh) == step_sizes(trained)


def test_sgd_moves_steps_and_clamp_keeps_them_positive():
    model = quantize_model(small_cnn(), 2, "lsq")
    before = [row["step"] for row in step_sizes(model)]
    train_a_few_steps(model)
    after = [row["step"] for row in step_sizes(model)]
    assert all(a != b for a, b in zip(after, before))
    with torch.no_grad():
        model[3].weight_quantizer.step.fill_(-0.5)
    clamp_steps_(model)
    assert model[3].weight_quantizer.step.item() == STEP_EPS


def test_step_sizes_rows():
    model = quantize_model(small_cnn(), 2, "lsq")
    rows = step_sizes(model)
    assert [r["layer"] for r in rows] == LAYERS
    assert [r["layer_index"] for r in rows] == [0, 1, 2, 3]
    assert [r["bits"] for r in rows] == [8, 2, 2, 8]
    assert rows[1]["step"] == pytest.approx(model[3].weight_quantizer.step.item())


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_materialize_gives_plain_layers_that_compute_with_w_hat(method):
    model = quantize_model(small_cnn(), 2, method)
    train_a_few_steps(model)
    plain = materialize(model)
    assert not quantized_layers(plain) and quantized_layers(model)  # the original is kept
    weights = effective_weights(model)
    for name, module in plain.named_modules():
        if name in LAYERS:
            assert type(module) in (nn.Conv2d, nn.Linear)
            assert torch.equal(module.weight, weights[name])
    model.eval(), plain.eval()
    x = batch(seed=5)[0]
    if method != "qar":  # QAR trains in full precision: only the snap makes them equal
        assert torch.allclose(plain(x), model(x), atol=1e-6)
    # a perturbation of w_hat is not rounded away
    with torch.no_grad():
        plain[3].weight.add_(1e-4)
    assert not torch.equal(plain(x), materialize(model)(x))


def test_quantizer_parameters_are_the_steps_and_codebooks():
    lsq = quantize_model(small_cnn(), 4, "lsq")
    steps = quantizer_parameters(lsq)
    assert len(steps) == 4 and all(p.shape == (1,) for p in steps)
    others = {id(p) for name, p in lsq.named_parameters() if "weight_quantizer" not in name}
    assert not others & {id(p) for p in steps}
    qar = quantize_model(small_cnn(), 4, "qar")
    assert sorted(p.numel() for p in quantizer_parameters(qar)) == [16, 16, 256, 256]


def test_compression_ratio_counts_bits_and_overheads():
    model = quantize_model(small_cnn(), 2, "lsq")
    numels = [model[int(name)].weight.numel() for name in LAYERS]
    stored = numels[0] * 8 + numels[1] * 2 + numels[2] * 2 + numels[3] * 8 + 4 * 32
    assert compression_ratio(model) == pytest.approx(32 * sum(numels) / stored)


def test_regularizer_is_zero_for_lsq_and_progress_is_checked():
    model = quantize_model(small_cnn(), 4, "lsq")
    assert quant_regularizer(model, 1.0).item() == 0.0
    with pytest.raises(ValueError):
        quant_regularizer(model, 1.5)


def test_vvtq_on_a_cnn_falls_back_to_lsq_with_mse_init():
    model = quantize_model(small_cnn(), 4, "vvtq")
    lsq = quantize_model(small_cnn(), 4, "lsq")
    for (_, v), (_, s) in zip(quantized_layers(model), quantized_layers(lsq)):
        assert type(v.weight_quantizer) is LSQWeightQuantizer
        w = v.weight.detach()
        err_mse = (v.weight_quantizer(w) - w).pow(2).sum()
        err_lsq = (s.weight_quantizer(w) - w).pow(2).sum()
        assert err_mse <= err_lsq
    assert quant_regularizer(model, 0.1).item() == 0.0  # lambda = 0 in the first 25%
    assert quant_regularizer(model, 0.9).item() > 0.0


def test_registry_lists_the_four_methods():
    assert METHODS.names() == ["fp32", "lsq", "qar", "vvtq"]


def test_helpers_see_through_data_parallel_and_deepcopy():
    model = quantize_model(small_cnn(), 4, "lsq")
    wrapped = nn.DataParallel(model)  # stands in for DDP: both hold `.module`
    assert step_sizes(wrapped) == step_sizes(model)
    assert len(quantizer_parameters(wrapped)) == 4
    assert copy.deepcopy(model).qgen_quant == model.qgen_quant
    with pytest.raises(UserError, match="before DDP"):
        quantize_model(nn.DataParallel(small_cnn()), 4)


def test_numpy_integer_bits_from_a_dataframe_are_accepted():
    import numpy as np

    model = quantize_model(
        small_cnn(), np.int64(4), "lsq", QuantPolicy(layer_bits={"3": np.int64(2)})
    )
    assert json.loads(json.dumps(model.qgen_quant))["layers"] == {"0": 8, "3": 2, "7": 4, "9": 8}
    assert quantize_model(small_cnn(), np.int64(32)).qgen_quant["bits"] == 32
