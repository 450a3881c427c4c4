"""ImageNet as an ImageFolder on disk: validation, the standard transforms, sharded loaders.

    <data-root>/train/<class>/<image>    <data-root>/val/<class>/<image>

Both splits must hold the same class folders (label i = i-th class name in sorted order,
torchvision's rule). Training images go through RandomResizedCrop + horizontal flip,
evaluation images through Resize + CenterCrop (the torchvision ImageNet recipe), at an
`image_size` of choice (224 for the paper, 32 in tests). Each rank reads a disjoint
shard: `DistributedSampler` with `drop_last=True` for training (the < world_size leftover
images of an epoch are skipped, a different few each epoch), a strided split without
padding for evaluation (so every image counts exactly once).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from qgen_ray.errors import UserError

SPLITS = ("train", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean of pixel/255 (torchvision)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # center crop / resized side: 224 of 256 (torchvision recipe)


def _classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(
            f"{folder} is not a folder; --data-root needs train/ and val/ subfolders, "
            "each with one folder of images per class"
        )
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path) -> bool:
    """Whether `folder` holds at least one image file (stops at the first one)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_imagefolder(root: str | Path | None) -> list[str]:
    """The class names of an ImageFolder root, or a one-line UserError saying what is wrong.

    Cheap on ImageNet: each class folder is read only up to its first image.
    """
    if root is None:
        raise UserError("pass --data-root DIR, the folder holding train/ and val/ ImageFolders")
    root = Path(root).expanduser()
    per_split = {split: _classes(root / split) for split in SPLITS}
    for split, classes in per_split.items():
        if not classes:
            raise UserError(
                f"{root / split} has no class folders; expected {root / split}/<class>/<image>"
            )
    train, val = per_split["train"], per_split["val"]
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(
            f"class folders differ between {root}/train and {root}/val (only in train: "
            f"{', '.join(only_train[:3]) or '-'}; only in val: {', '.join(only_val[:3]) or '-'}); "
            "both splits need the same class folders"
        )
    for split in SPLITS:
        empty = [c for c in train if not _has_image(root / split / c)]
        if empty:
            raise UserError(
                f"{root / split} has class folders without images ({', '.join(empty[:3])}"
                f"{' ...' if len(empty) > 3 else ''}); image files end in "
                f"{', '.join(IMG_EXTENSIONS[:3])}, ..."
            )
    return train


def train_transform(image_size: int) -> T.Compose:
    """RandomResizedCrop(image_size) + horizontal flip, then normalize (training)."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int) -> T.Compose:
    """Resize(image_size / 0.875) + CenterCrop(image_size), then normalize (evaluation)."""
    return T.Compose(
        [
            T.Resize(round(image_size / EVAL_CROP_FRACTION)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class IndexedImageFolder(ImageFolder):
    """An ImageFolder whose items are (image, label, index): the index lets a run record
    which images each rank saw."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image, label, index

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class folders `check_imagefolder` and ImageNet-C's labels count (hidden
        ones such as `.ipynb_checkpoints` left out), label i = i-th in sorted order."""
        classes = _classes(Path(directory))
        return classes, {name: i for i, name in enumerate(classes)}


def image_folder(
    root: str | Path, split: str, image_size: int, augment: bool, model: str | None = None
) -> ImageFolder:
    """One split of the ImageFolder with the training (augment) or evaluation transform:
    `model`'s library recipe when given (`imagenet.recipe`), else the standard one."""
    if model is not None:
        from qgen_ray.imagenet.recipe import model_transform

        transform = model_transform(model, image_size, train=augment)
    else:
        transform = train_transform(image_size) if augment else eval_transform(image_size)
    return IndexedImageFolder(str(Path(root).expanduser() / split), transform=transform)


class StridedShard(Sampler[int]):
    """Rank r of w reads items r, r + w, r + 2w, ...: disjoint shards covering every item
    once, without the padding `DistributedSampler` adds (evaluation)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_workers(cpus_per_worker: float) -> int:
    """DataLoader processes for a training worker holding `cpus_per_worker` CPUs: all but
    one (which runs the training step itself)."""
    return max(0, int(cpus_per_worker) - 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's loader. Training: a seeded shuffle per epoch (call
    `loader.sampler.set_epoch(epoch)`); evaluation: the strided shard, in order.

    Loader processes start afresh each epoch and draw their augmentation seeds from
    `loader.generator` (seed it per epoch), so a resumed run sees the same crops."""
    if train:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = StridedShard(len(dataset), rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IndexedImageFolder",
    "StridedShard",
    "check_imagefolder",
    "eval_transform",
    "image_folder",
    "loader_workers",
    "make_loader",
    "train_transform",
]
