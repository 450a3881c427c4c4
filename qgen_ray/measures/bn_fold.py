"""Fold every BatchNorm into the conv/linear layer that feeds it (docs/method.md §3).

The measures perturb "the function the model computes", so an eval-mode BatchNorm
y = γ (z − μ) / sqrt(var + eps) + β that follows z = W x + b is merged into the layer:

    W' = W · s,   b' = (b − μ) · s + β,   s = γ / sqrt(var + eps)   (per output channel)

and replaced by `nn.Identity`. The eval-mode output is unchanged (up to float rounding).

How conv→BN pairs are found:
1. `torch.fx.symbolic_trace` of the model: a BatchNorm call whose only input is the output
   of a Conv1d/2d/3d or Linear call, where that output feeds nothing else and both modules
   are called exactly once. This follows the data flow, so it handles any forward code
   that fx can trace (nn.Sequential, NiN, ResNet, torchvision models).
2. If tracing fails (data-dependent control flow), the fallback pairs adjacent children of
   every nn.Sequential (conv at index i, BN at i+1): registration order equals data flow
   there by definition.
Limits: pairs fx cannot see through (a BN fed by a traced-away function, models fx cannot
trace and that are not Sequential) are left unfolded; so are BNs without running
statistics (`track_running_stats=False`, which normalize with batch statistics even in
eval mode) and BNs after ConvTranspose (output channels on dim 1). Unfolded BNs stay as
eval-mode affine layers and their γ, β count as weights (see `params.py`).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with each foldable BatchNorm merged into its conv/linear layer.

    The copy is returned in eval mode (folding is only valid there); `model` is untouched.
    A layer without a bias gets one.
    """
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in conv_bn_pairs(folded):
        layer = folded.get_submodule(layer_name)
        bn = folded.get_submodule(bn_name)
        if not _foldable(layer, bn):
            continue
        _fold_into(layer, bn)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name), attr, nn.Identity())
    return folded


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names (layer, batchnorm) of directly connected conv/linear → BN pairs."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure: fall back to nn.Sequential adjacency
        return _sequential_pairs(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BATCHNORMS):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], FOLDABLE_LAYERS)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, FOLDABLE_LAYERS) and isinstance(b, BATCHNORMS):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return bn.running_mean is not None and bn.num_features == layer.weight.shape[0]


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    weight = layer.weight
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift, dtype=weight.dtype))
    view = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight.copy_(weight * scale.reshape(view))
    layer.bias.copy_(layer.bias * scale + shift)
