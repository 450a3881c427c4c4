"""ImageNet-C evaluation of fine-tuned ImageNet models (docs/method.md §6, QGen §4.3).

The corrupt stage of an ImageNet study (`qgen corrupt <study> --corrupt-root IMAGENET-C
--data-root IMAGENET`, or `--stages corrupt` of an ImageNet study script) evaluates every
model on the published ImageNet-C, `<corrupt-root>/<corruption>/<severity>/<wnid>/*.JPEG`,
through the evaluation transform of the model's recipe at its own image size.
Labels follow the clean validation split's class folders (torchvision's sorted order, as
in training), so an ImageNet-C folder lacking some classes still lines up with the
model's outputs. Generating 50,000-image sets on the fly is out of scope for ImageNet:
the published set must be given.

Driver side: `check_imagenet_c` (every requested set readable before any work). Worker
side: `evaluate_imagenet_c` (one model on one set), called by the `corrupt_imagenet` job
of `qgen_ray.pipeline.jobs`, which `pipeline.followups.corrupt_study` fans out over the
models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qgen_ray.data.corruption_readers import IMAGENET_C_URL, read_imagenet_c
from qgen_ray.errors import UserError
from qgen_ray.imagenet.imagefolder import check_imagefolder, make_loader
from qgen_ray.train.finetune import evaluate_loader, fast_path

CORRUPT_BATCH = 128  # images per forward pass of the evaluation (memory only, not results)


def require_corrupt_root(corrupt_root: str | Path | None) -> Path:
    """The ImageNet-C folder as an absolute path; one line when it is not given or absent."""
    if corrupt_root is None:
        raise UserError(
            "ImageNet studies are evaluated on the published ImageNet-C: pass --corrupt-root "
            f"DIR holding <corruption>/<severity>/<wnid>/*.JPEG ({IMAGENET_C_URL}); on-the-fly "
            "corruptions are only generated for in-memory datasets"
        )
    root = Path(corrupt_root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(
            f"--corrupt-root {corrupt_root} is not a folder; point it at ImageNet-C "
            f"({IMAGENET_C_URL})"
        )
    return root


def clean_class_index(
    data_root: str | Path | None, num_classes: set[int] | None = None
) -> dict[str, int]:
    """wnid -> label of the clean ImageFolder the models were trained on (`--data-root`),
    checked against the models' output sizes `num_classes` when given."""
    classes = check_imagefolder(data_root)
    if num_classes is not None and num_classes != {len(classes)}:
        sizes = ", ".join(str(n) for n in sorted(num_classes))
        raise UserError(
            f"--data-root {data_root} has {len(classes)} classes but the models output "
            f"{sizes}; pass the ImageFolder the study was trained on"
        )
    return {wnid: index for index, wnid in enumerate(classes)}


def check_imagenet_c(
    corrupt_root: str | Path | None,
    data_root: str | Path | None,
    sets: list[list],
    num_classes: set[int] | None = None,
) -> tuple[str, dict[str, int]]:
    """(absolute ImageNet-C root, clean class_to_idx) once every (corruption, severity) in
    `sets` is a readable folder of known classes; otherwise one `UserError` line. Lists
    every set's files (seconds for the full ImageNet-C), so call it before any work.
    `num_classes`: the models' output sizes (None: whatever --data-root holds)."""
    root = require_corrupt_root(corrupt_root)
    class_to_idx = clean_class_index(data_root, num_classes)
    for corruption, severity in sets:
        read_imagenet_c(root, corruption, int(severity), class_to_idx)
    return str(root), class_to_idx


@torch.no_grad()
def evaluate_imagenet_c(
    model: nn.Module,
    corrupt_root: str,
    corruption: str,
    severity: int,
    class_to_idx: dict[str, int],
    model_name: str,
    image_size: int,
    device: torch.device,
    *,
    num_workers: int = 0,
    batch_size: int = CORRUPT_BATCH,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` (eval mode, on `device`) on one
    ImageNet-C set, every image once, through the evaluation transform of `model_name`'s
    recipe at `image_size` (`imagenet.recipe`, the transform its clean loss was taken with)."""
    from qgen_ray.imagenet.recipe import model_transform

    data = read_imagenet_c(
        corrupt_root,
        corruption,
        int(severity),
        class_to_idx,
        model_transform(model_name, image_size, train=False),
    )
    loader = make_loader(
        data,
        batch_size,
        rank=0,
        world_size=1,
        train=False,
        seed=0,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    if fast_path(device):
        model = model.to(memory_format=torch.channels_last)
    return evaluate_loader(model, loader, device)


__all__ = [
    "CORRUPT_BATCH",
    "check_imagenet_c",
    "clean_class_index",
    "evaluate_imagenet_c",
    "require_corrupt_root",
]
