"""Independent answers the tests hold the package to, written from its primitives.

Not fixtures: plain functions that recompute a quantity the slow, obvious way.
"""

from __future__ import annotations

import torch

from qgen_ray.measures import folded_weights
from qgen_ray.measures.forward import ForwardCounter, correct_predictions
from qgen_ray.measures.perturb import FAMILIES, ascend

PAPER_ASCENT = dict(steps=20, batch=128, lr=1e-4)  # QGen App. B.2


def fresh_drops(model, x, y, family_name: str, radius: float, k: int, seed: int) -> torch.Tensor:
    """[k] training-accuracy drops of `k` fresh perturbations at `radius`, each on the
    whole of (x, y): what one step of the faithful protocol measures, one value per
    perturbation (sharpness: the paper's ascent from each random start, with mini-batches
    drawn per restart). Their mean is the drop at `radius`; sd / sqrt(k) its standard error."""
    folded, layout, w = folded_weights(model)
    family = FAMILIES[family_name]
    gen = torch.Generator().manual_seed(seed)
    scale = family.scale(radius, w)
    u = scale * family.directions(k, layout.numel, gen, w.device)
    if family.worst_case:
        steps, batch, lr = PAPER_ASCENT["steps"], PAPER_ASCENT["batch"], PAPER_ASCENT["lr"]
        starts = []
        for j in range(k):
            idx = torch.randint(0, x.shape[0], (steps, batch), generator=gen)
            batches = [(x[i], y[i]) for i in idx]
            starts.append(ascend(folded, layout, w, u[j : j + 1], scale, batches, lr,
                                 ForwardCounter()))  # fmt: skip
        u = torch.cat(starts)
    count = ForwardCounter()
    clean = correct_predictions(folded, layout, w[None], x, y, count)[0].float()
    perturbed = correct_predictions(folded, layout, w + u, x, y, count).float()
    return (clean[None] - perturbed).mean(1)


def reference_training(spec, data) -> dict:
    """`train(spec, data)` written out the plain way: python-float sums, the learning rate
    of each epoch computed from the schedule's closed form and set by hand, optimizers
    built here from torch.optim (steps and codebooks without weight decay). Returns the
    per-epoch history (lr = the rate the epoch trained at), the kept epoch, its weights,
    the initial weights and the kept model's loss / accuracy on both splits."""
    import copy
    import math

    import torch.nn.functional as F

    from qgen_ray.quant import clamp_steps_, quant_regularizer, quantizer_parameters
    from qgen_ray.train.build import build_model

    torch.manual_seed(spec.seed)
    model = build_model(spec, data.num_classes, data.in_channels, data.image_size)
    init = copy.deepcopy(model.state_dict())
    quant = {id(p) for p in quantizer_parameters(model)}
    net = [p for p in model.parameters() if id(p) not in quant]
    groups = [{"params": net}]
    if quant:
        groups.append({"params": [p for p in model.parameters() if id(p) in quant]})
        groups[1]["weight_decay"] = 0.0
    kw = {"lr": spec.lr, "weight_decay": spec.weight_decay}
    optimizer = {
        "sgd": lambda: torch.optim.SGD(groups, momentum=spec.momentum, **kw),
        "adam": lambda: torch.optim.Adam(groups, **kw),
        "adamw": lambda: torch.optim.AdamW(groups, **kw),
        "rmsprop": lambda: torch.optim.RMSprop(groups, **kw),
    }[spec.optimizer]()

    def epoch_lr(epoch: int) -> float:
        if spec.lr_schedule == "cosine":
            return spec.lr * (1 + math.cos(math.pi * (epoch - 1) / spec.epochs)) / 2
        return spec.lr * spec.gamma ** sum(m <= epoch - 1 for m in spec.milestones)

    generator = torch.Generator().manual_seed(spec.seed)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    steps = math.ceil(n / spec.batch_size)
    history, best_loss, best_epoch, best = [], math.inf, 0, None
    model.train()
    for epoch in range(1, spec.epochs + 1):
        lr = epoch_lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for step in range(steps):
            idx = order[step * spec.batch_size : (step + 1) * spec.batch_size]
            xb = data.augment(x[idx], generator) if spec.augment else x[idx]
            logits = model(data.normalize(xb))
            loss = F.cross_entropy(logits, y[idx])
            done = ((epoch - 1) * steps + step) / (spec.epochs * steps)
            optimizer.zero_grad()
            (loss + quant_regularizer(model, done)).backward()
            optimizer.step()
            clamp_steps_(model)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        history.append(
            {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n, "lr": lr}
        )
        if loss_sum / n < best_loss:
            best_loss, best_epoch, best = loss_sum / n, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    model.eval()
    out = {"history": history, "best_epoch": best_epoch, "best": best, "init": init}
    out["num_params"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for split, (xs, ys) in {"train": (x, y), "test": (data.test_x, data.test_y)}.items():
            logits = model(data.normalize(xs))
            out[f"{split}_loss"] = F.cross_entropy(logits, ys).item()
            out[f"{split}_acc"] = (logits.argmax(1) == ys).double().mean().item()
    return out
