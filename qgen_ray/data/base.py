"""`ImageData`: a dataset held in memory as uint8 tensors, with its normalization and
training augmentation. The training loop, the measures and the corruption job all take
their images from one of these, so "the images as the model saw them" is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qgen_ray.data.augment import random_crop_flip


@dataclass
class ImageData:
    """Train and test splits as uint8 [N, C, H, W] tensors plus int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]  # per-channel mean of pixel/255 (normalization)
    std: tuple[float, ...]  # per-channel std of pixel/255
    num_classes: int
    crop_padding: int = 0  # training augmentation: random crop with this zero padding
    flip: bool = False  # training augmentation: random horizontal flip

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def to(self, device: torch.device | str) -> ImageData:
        """A copy whose tensors live on `device` (the GPU when there is one)."""
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return ImageData(**{**self.__dict__, **moved})

    def with_validation(self, fraction: float, seed: int) -> ImageData:
        """The validation view of this dataset for a search: `fraction` of each class of
        the training set (seeded) is held out and becomes the held-out split; the test
        split is not in the returned object at all, so nothing downstream can read it."""
        generator = torch.Generator().manual_seed(seed)
        held = []
        for label in torch.unique(self.train_y).tolist():
            members = torch.nonzero(self.train_y == label).flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            held.append(members[: round(fraction * len(members))])
        val = torch.sort(torch.cat(held)).values
        keep = torch.ones(len(self.train_y), dtype=torch.bool)
        keep[val] = False
        return ImageData(**{
            **self.__dict__, "name": f"{self.name}[val{fraction:g}/{seed}]",
            "train_x": self.train_x[keep], "train_y": self.train_y[keep],
            "test_x": self.train_x[val], "test_y": self.train_y[val],
        })  # fmt: skip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float, (x / 255 - mean) / std, on x's device."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The dataset's training augmentation on a uint8 batch (batched, on x's device)."""
        if self.crop_padding == 0 and not self.flip:
            return x
        return random_crop_flip(x, self.crop_padding, self.flip, generator)

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """("train" | "test") -> (uint8 images, labels)."""
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        from qgen_ray.errors import UserError

        raise UserError(f"unknown split {split!r}; valid: train, test")
