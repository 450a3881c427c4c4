"""Which tensors the measures call "weights", and a flat view of them.

The one place that decides what `w`, `w0` and `ω` mean in docs/method.md §3:

    the weights are EVERY floating-point parameter of the BatchNorm-folded model:
    conv/linear weights AND biases (after folding, a bias carries the BN shift), plus the
    affine parameters of any BatchNorm that could not be folded. Buffers (BN running
    statistics of unfolded BNs) are never perturbed. ω = the number of those scalars.

Jiang et al.'s reference code skips biases; we perturb and count them because folding
moves the BatchNorm shift into them, so a perturbation that skipped them would leave part
of the function untouched. Every search, bound and norm reads the weights through
`ParamLayout`, so changing this choice means changing `measured_parameters` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qgen_ray.errors import UserError


def measured_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The perturbed / counted tensors of a (folded) model, by qualified name, detached."""
    return {name: p.detach() for name, p in model.named_parameters() if torch.is_floating_point(p)}


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the measured parameters: flattens them to one vector and back."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        params = measured_parameters(model)
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @property
    def numel(self) -> int:
        """ω, the number of weights."""
        return sum(s.numel() for s in self.shapes)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The measured parameters of `model` as one 1-D vector (a copy)."""
        params = measured_parameters(model)
        if tuple(params) != self.names or any(
            p.shape != s for p, s in zip(params.values(), self.shapes)
        ):
            raise UserError(
                "the initialization model does not match the trained model's parameters "
                "(names or shapes differ); pass the same architecture at step 0"
            )
        return torch.cat([p.reshape(-1) for p in params.values()]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` [..., ω] as named tensors [..., *shape] (leading dims kept)."""
        lead = flat.shape[:-1]
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = flat[..., start : start + n].reshape(*lead, *shape)
            start += n
        return out
