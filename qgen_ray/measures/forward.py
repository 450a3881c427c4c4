"""Run a model under many weight vectors and count the images pushed through it.

A weight vector is a flat tensor [ω] in `ParamLayout` order; a batch of them is [K, ω].
`correct_predictions` evaluates all K on the same images, either one at a time (the plain
loop, the reference) or all at once with `torch.func.vmap` over `functional_call` (the
speed trick; `tests/test_measures_perturb.py` checks both give the same answer).

Image accounting (`ForwardCounter`): every image of every forward pass counts once, every
image of every backward pass once more, per weight vector. Evaluating K perturbations on
n images costs K·n; one ascent step on a batch of b images costs 2·b per restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from qgen_ray.measures.params import ParamLayout
from qgen_ray.measures.sampling import pool_layout, stratified_positions


@dataclass
class ForwardCounter:
    """Images pushed through the network (forward and backward passes both count)."""

    images: int = 0

    def add(self, n: int) -> None:
        self.images += int(n)


def use_vmap(batched: bool | None, device: torch.device, ascent: bool = False) -> bool:
    """Resolve the `batched` knob: True / False as given; None (auto) vmaps the ascent
    everywhere and the evaluation on CUDA only: on a CPU the vmapped ascent (tiny
    mini-batches, where per-call overhead dominates) beats the loop while the vmapped
    evaluation of large image batches loses to it (README, "Measured figures"); on a GPU
    one batched call beats K small kernels for both.
    """
    if batched is not None:
        return bool(batched)
    return ascent or device.type == "cuda"


@torch.no_grad()
def correct_predictions(
    model: nn.Module,
    layout: ParamLayout,
    flat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    counter: ForwardCounter,
    batched: bool = False,
    eval_batch: int = 1024,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool [K, n]: whether weight vector k classifies image i correctly (eval mode).

    The images are `x[index]` (all of `x` when `index` is None), gathered one forward
    call at a time. `eval_batch` caps the images of one call per weight vector (plain
    loop) or the product K · images (vmap), i.e. it bounds activation memory.
    """
    k = flat.shape[0]
    index = torch.arange(x.shape[0], device=x.device) if index is None else index
    n = index.shape[0]
    out = torch.empty(k, n, dtype=torch.bool, device=x.device)
    if batched:
        step = max(1, eval_batch // k)

        def logits_of(p: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(model, layout.unflatten(p), (xb,))

        batched_logits = vmap(logits_of, in_dims=(0, None))
        for s in range(0, n, step):
            i = index[s : s + step]
            out[:, s : s + step] = batched_logits(flat, x[i]).argmax(-1) == y[i]
    else:
        for s in range(0, n, eval_batch):
            i = index[s : s + eval_batch]
            xb, yb = x[i], y[i]
            for j in range(k):
                logits = functional_call(model, layout.unflatten(flat[j]), (xb,))
                out[j, s : s + eval_batch] = logits.argmax(-1) == yb
    counter.add(k * n)
    return out


@torch.no_grad()
def clean_margins(
    model: nn.Module,
    layout: ParamLayout,
    w: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    eval_batch: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, correct) of the unperturbed model on x[index]: the true class's logit
    minus the largest other one, and whether the prediction is right (argmax, as
    `correct_predictions`). The caller counts the images."""
    margins, correct = [], []
    params = layout.unflatten(w)
    for s in range(0, index.shape[0], eval_batch):
        i = index[s : s + eval_batch]
        logits = functional_call(model, params, (x[i],))
        true = logits.gather(1, y[i, None])[:, 0]
        other = logits.scatter(1, y[i, None], float("-inf")).amax(1)
        margins.append(true - other)
        correct.append(logits.argmax(-1) == y[i])
    return torch.cat(margins), torch.cat(correct)


class CleanPredictions:
    """Correctness of the unperturbed model, computed lazily for a prefix of an order.

    `order` is a permutation of the training set (the fast search reads images in this
    order, the faithful search reads all of them); `upto(n)` returns the correctness of
    the first n images of `order`, evaluating only what was not evaluated before, and
    charges the new images to the caller's counter (`stratified` evaluates a pool up
    front: the first caller pays for it).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        w: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor,
        eval_batch: int = 1024,
        evaluated: torch.Tensor | None = None,
    ):
        self.model, self.layout, self.w = model, layout, w
        self.x, self.y, self.order, self.eval_batch = x, y, order, eval_batch
        empty = torch.empty(0, dtype=torch.bool, device=x.device)
        self._done = empty if evaluated is None else evaluated
        self._unpaid = self._done.shape[0]

    @classmethod
    def stratified(
        cls,
        model: nn.Module,
        layout: ParamLayout,
        w: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        strata: int,
        pool_max: int,
        eval_batch: int = 1024,
    ) -> CleanPredictions:
        """Clean predictions whose order reads a random pool of the training set
        stratified by clean margin (see `sampling`), then the rest at random."""
        m = x.shape[0]
        perm = torch.randperm(m, generator=generator, device=x.device)
        s, size = pool_layout(m, strata, pool_max)
        pool = perm[:size]
        margins, correct = clean_margins(model, layout, w, x, y, pool, eval_batch)
        positions = stratified_positions(margins, s, generator)
        order = torch.cat([pool[positions], perm[size:]])
        return cls(model, layout, w, x, y, order, eval_batch, evaluated=correct[positions])

    def upto(self, n: int, counter: ForwardCounter) -> torch.Tensor:
        counter.add(self._unpaid)
        self._unpaid = 0
        have = self._done.shape[0]
        if n > have:
            new = correct_predictions(
                self.model,
                self.layout,
                self.w[None],
                self.x,
                self.y,
                counter,
                eval_batch=self.eval_batch,
                index=self.order[have:n],
            )[0]
            self._done = torch.cat([self._done, new])
        return self._done[:n]
