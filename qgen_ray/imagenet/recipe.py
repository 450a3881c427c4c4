"""The ImageNet recipe as the libraries define it: a library model's transforms are the
ones its library publishes with its weights, at the study's image size.

- torchvision models: evaluation is `weights.transforms()` of the architecture's DEFAULT
  weights (resize, center crop, interpolation, mean and std as torchvision states them;
  e.g. ResNet-50's V2 weights resize to 232, not 256), with the crop at `image_size` and
  the resize scaled in the same proportion; training is torchvision's reference recipe,
  RandomResizedCrop(image_size) at the same interpolation + horizontal flip + the same
  normalization.
- timm models: `timm.data.create_transform` of the architecture's pretrained data config
  (bicubic, its crop_pct) at `image_size`, for training (`is_training=True`: random
  resized crop, flip, colour jitter as timm defaults) and evaluation.
- Other models (trained from scratch here): RandomResizedCrop + flip for training and
  Resize(image_size / 0.875) + CenterCrop for evaluation, ImageNet mean and std
  (`imagefolder.train_transform` / `eval_transform`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import transforms as T

from qgen_ray.imagenet.imagefolder import eval_transform, train_transform
from qgen_ray.models import model_library

Transform = Callable


def _torchvision(arch: str, image_size: int, train: bool) -> Transform:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    preset = weights.transforms()
    if not train:
        resize = round(image_size * preset.resize_size[0] / preset.crop_size[0])
        return weights.transforms(crop_size=image_size, resize_size=resize)
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, interpolation=preset.interpolation),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(preset.mean, preset.std),
        ]
    )


def timm_data_config(arch: str, image_size: int) -> dict:
    """timm's data config of `arch`'s pretrained weights, at `image_size`."""
    import timm

    config = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(arch).to_dict())
    return {**config, "input_size": (3, image_size, image_size)}


def _timm(arch: str, image_size: int, train: bool) -> Transform:
    import timm

    return timm.data.create_transform(**timm_data_config(arch, image_size), is_training=train)


def model_transform(model: str, image_size: int, train: bool) -> Transform:
    """The transform of `model`'s recipe: training (`train`) or evaluation."""
    library = model_library(model)
    if library is None:
        return train_transform(image_size) if train else eval_transform(image_size)
    kind, arch = library
    return (_torchvision if kind == "torchvision" else _timm)(arch, image_size, train)


__all__ = ["model_transform", "timm_data_config"]
