"""The quantization-aware regularizer of Malchiodi et al. 2026, as reconstructed in
docs/method.md §1 from its abstract: per layer, k = 2^b learnable representatives c pull the
weights into clusters during training; afterwards every weight is snapped to its nearest
representative.

    R_l  = mean_i min_j (w_i - c_j)^2          the clustering penalty of layer l
    loss = CE + lambda * sum_l R_l

Training runs in full precision: the quantizer's forward is the identity and the penalty
does the pulling. `dequantized(w)` (and so `effective_weights`, `materialize`) gives the
snapped weights; `snap_to_codebook_` (qgen_ray.quant.snap) writes them into the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from qgen_ray.quant.base import PARAM_BITS, WeightQuantizer

# Weight lambda of the clustering penalty. Ours (the abstract gives no value): R_l is a mean
# over the layer, so its per-weight pull is 2 * lambda * (w - c) / N_l. Measured on sklearn
# digits (MLP 64-128-128-10, every layer at 2 bits, 30 epochs SGD 0.1): accuracy drop at
# the snap 0.13 with lambda = 0, 0.01-0.03 with lambda = 1 (3 seeds), ~0.02 with 3 or 10;
# lambda = 100 collapsed weights and codebook together (chance accuracy). Applied at every
# step, no ramp. Larger layers feel a weaker pull: raise it (quant_regularizer's `weight`)
# for models whose layers are much larger than ~1e4 weights.
QAR_LAMBDA = 1.0


def init_codebook(w: torch.Tensor, k: int) -> torch.Tensor:
    """k representatives at the (j + 1/2)/k quantiles of the weights, j = 0..k-1
    (docs/method.md §1.4, "init: quantiles"). Uses a sort, not torch.quantile, which
    refuses tensors > 16M."""
    values = w.detach().flatten().sort().values
    j = torch.arange(k, device=values.device)
    return values[(2 * j + 1) * values.numel() // (2 * k)]  # floor((j + 1/2) N / k), exact


def nearest_representative(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_{c_j} |w_i - c_j| for every weight, differentiable with respect to the
    codebook. Speed: O(N log k) by bucketing w between midpoints of the sorted codebook
    instead of the N x k distance matrix (equivalence tested against the latter)."""
    sorted_codebook = codebook.sort().values
    midpoints = (sorted_codebook[1:] + sorted_codebook[:-1]).detach() / 2
    index = torch.bucketize(w.detach(), midpoints)
    return sorted_codebook[index]


def cluster_penalty(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """R_l = mean_i min_j (w_i - c_j)^2 (docs/method.md §1.4)."""
    return (w - nearest_representative(w, codebook)).pow(2).mean()


class CodebookQuantizer(WeightQuantizer):
    """k = 2^bits learnable representatives `codebook` for one layer (QAR)."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.codebook = nn.Parameter(torch.zeros(2**self.bits))

    @torch.no_grad()
    def initialize(self, w: torch.Tensor) -> None:
        if self.codebook.device != w.device:
            self.to(w.device)
        self.codebook.copy_(init_codebook(w, self.codebook.numel()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        return nearest_representative(w, self.codebook).detach()

    def storage_bits(self, numel: int) -> int:
        return numel * self.bits + self.codebook.numel() * PARAM_BITS
