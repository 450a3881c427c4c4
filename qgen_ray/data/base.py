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
