"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format under a local `--data-root`.

The files are parsed by torchvision's own classes (which also check their MD5 sums);
before that, we check that every expected file is there so a missing or incomplete
folder gets one clear line. Download happens only when the user asks (`--download`).
Images are held in memory as uint8 [N, 3, 32, 32]; training augmentation is the paper's
random crop with 4-pixel zero padding and horizontal flip (done batched, see augment.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qgen_ray.data.base import ImageData
from qgen_ray.errors import UserError

# Per-channel statistics of the CIFAR training sets (pixel/255), the usual constants.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CROP_PADDING = 4  # paper / torchvision RandomCrop(32, padding=4)


def _cifar(variant: str, root: str | None, download: bool) -> ImageData:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[variant]
    if root is None:
        raise UserError(
            f"{variant} needs --data-root DIR (the folder holding {cls.base_folder}); "
            "add --download to fetch it there"
        )
    if not download:
        missing = [
            name
            for name in [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
            if not (Path(root) / cls.base_folder / name).is_file()
        ]
        if missing:
            raise UserError(
                f"{variant} is missing or incomplete under {root} (no "
                f"{cls.base_folder}/{missing[0]}); point --data-root at the folder that "
                f"contains {cls.base_folder}, or add --download"
            )
    try:
        train, test = (cls(root, train=split, download=download) for split in (True, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise UserError(
            f"{variant} under {root} failed its integrity check ({err}); "
            "re-download it with --download into an empty folder"
        ) from None
    mean, std = (
        (CIFAR10_MEAN, CIFAR10_STD) if variant == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    )

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    train_x, train_y = tensors(train)
    test_x, test_y = tensors(test)
    return ImageData(
        name=variant,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mean=mean,
        std=std,
        num_classes=len(train.classes),
        crop_padding=CROP_PADDING,
        flip=True,
    )


def load_cifar10(root: str | None = None, download: bool = False) -> ImageData:
    return _cifar("cifar10", root, download)


def load_cifar100(root: str | None = None, download: bool = False) -> ImageData:
    return _cifar("cifar100", root, download)
