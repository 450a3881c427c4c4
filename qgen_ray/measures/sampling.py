"""The order in which the fast search reads the training set: stratified by clean margin.

A probe's accuracy drop is a mean over images of d_i = clean_i − mean_k perturbed_ki, and
almost all of it comes from the images the unperturbed model classifies with a small
margin: a uniformly random subset of n images carries the binomial noise of how many of
those it happened to catch. Reading the images in an order whose every prefix of 2^j
images holds exactly one image from each of 2^j equal slices of the margin ranking (a
stratified sample, proportional allocation) removes most of that noise (the measured
reduction of the drop estimate's spread: README, "Measured figures").

The estimate stays unbiased: every image of the pool has the same chance n / pool of
being in a prefix of n images (for n a power of two up to `strata`, and for every n past
it), and the pool is a uniformly random subset of the training set.
`tests/test_measures_sampling.py` checks both properties against the plain random order.
"""

from __future__ import annotations

import torch


def bit_reversed(bits: int, device: torch.device | None = None) -> torch.Tensor:
    """[2^bits]: i with its `bits` binary digits reversed (0, 4, 2, 6, 1, 5, 3, 7 for 3)."""
    i = torch.arange(2**bits, device=device)
    out = torch.zeros_like(i)
    for b in range(bits):
        out |= ((i >> b) & 1) << (bits - 1 - b)
    return out


def stratified_positions(
    margins: torch.Tensor, strata: int, generator: torch.Generator
) -> torch.Tensor:
    """A permutation of range(len(margins)) whose first `strata` entries are a nested
    stratified sample: for every power of two n ≤ `strata`, the first n hold exactly one
    position from each of n equal slices of the margin ranking. `strata` must be a power
    of two dividing len(margins). The rest follow in random order.

    Construction: rank by margin, cut into `strata` slices of k = len / strata, pick one
    position per slice at random, and visit the slices in bit-reversed order XOR a random
    offset (a prefix of n then takes one slice from each block of strata / n consecutive
    ones, the same randomly chosen slice within every block).
    """
    pool, device = margins.shape[0], margins.device
    bits = strata.bit_length() - 1
    if strata != 2**bits or pool % strata:
        raise ValueError(f"strata ({strata}) must be a power of two dividing the pool ({pool})")
    k = pool // strata
    slices = margins.argsort(stable=True).reshape(strata, k)
    pick = torch.randint(k, (strata,), generator=generator, device=device)
    offset = torch.randint(strata, (1,), generator=generator, device=device)
    visit = bit_reversed(bits, device) ^ offset
    first = slices[visit, pick[visit]]
    rest = torch.ones(pool, dtype=torch.bool, device=device)
    rest[first] = False
    others = rest.nonzero()[:, 0]
    others = others[torch.randperm(others.shape[0], generator=generator, device=device)]
    return torch.cat([first, others])


def pool_layout(m: int, strata: int, pool_max: int) -> tuple[int, int]:
    """(s, pool) for a training set of m images: s, the largest power of two ≤
    min(strata, m), slices a pool of min(m, pool_max) images rounded down to a multiple
    of s."""
    s = 2 ** (min(strata, m).bit_length() - 1)
    return s, s * (min(m, pool_max) // s)
