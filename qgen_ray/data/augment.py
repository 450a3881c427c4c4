"""Batched training augmentation on uint8 image tensors, on whatever device they are.

`random_crop_flip` draws, per image, a crop offset uniformly from the (2p+1)^2 positions
of the zero-padded image and a horizontal flip with probability 1/2: the same
distribution as torchvision's `RandomCrop(size, padding=p)` followed by
`RandomHorizontalFlip()` (tests/test_data.py checks it), without a per-image Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with `padding` zero pixels per side, then random horizontal flip.

    x: [B, C, H, W] (any dtype). Random draws use `generator` (a CPU generator, so the
    same seed gives the same batch on CPU and GPU).
    """
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))  # zeros, like RandomCrop
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x
