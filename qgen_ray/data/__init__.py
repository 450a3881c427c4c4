"""Datasets by name. In-memory datasets (digits, CIFAR) load as `ImageData`; ImageNet
(too big for memory) is read from an ImageFolder (`qgen_ray.imagenet`) by the DDP
fine-tuning and the follow-up stages.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset, TensorDataset

from qgen_ray.data.base import ImageData
from qgen_ray.data.cifar import load_cifar10, load_cifar100
from qgen_ray.data.digits import load_digits_data
from qgen_ray.registry import Registry


def load_imagenet(root: str | None = None, download: bool = False) -> ImageData:
    """ImageNet has no in-memory form: its name is registered so studies can plan it."""
    from qgen_ray.errors import UserError

    raise UserError(
        "imagenet is read from an ImageFolder on disk (studies/imagenet_finetune.py, Ray "
        "Train DDP, and the follow-up stages), never loaded into memory; train it with "
        "studies/imagenet_finetune.py"
    )


DATASETS: Registry[Callable[..., ImageData]] = Registry("dataset")
DATASETS.add("digits", load_digits_data)
DATASETS.add("cifar10", load_cifar10)
DATASETS.add("cifar100", load_cifar100)
DATASETS.add("imagenet", load_imagenet)  # ImageFolder on disk: qgen_ray.imagenet.imagefolder


def load_image_data(name: str, root: str | None = None, download: bool = False) -> ImageData:
    """The whole dataset `name` in memory (uint8 tensors, CPU)."""
    return DATASETS.get(name)(root=root, download=download)


def load_dataset(name: str, split: str, root: str | None = None) -> Dataset:
    """A torch Dataset of normalized (image, label) pairs as the model saw them in
    evaluation (no augmentation). `load_dataset("digits", "train")` needs no root."""
    data = load_image_data(name, root)
    x, y = data.split(split)
    return TensorDataset(data.normalize(x), y)


__all__ = ["DATASETS", "ImageData", "load_dataset", "load_image_data"]
